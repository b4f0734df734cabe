# shellcheck shell=bash
# Shared helpers for scripts/lab/*.sh. Sourced, never run.
# Messages go to stderr so that scripts can print results (paths) on stdout.

lab_say() { printf 'lab: %s\n' "$*" >&2; }
lab_warn() { printf 'lab: WARNING: %s\n' "$*" >&2; }
lab_die() {
    printf 'lab: error: %s\n' "$*" >&2
    exit 1
}

# The repository root (scripts/lab/ is two levels below it).
lab_repo() { (cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd); }

# The project's shared/ folder, beside the repository unless IOASID_SHARED_DIR says otherwise.
# Only the prebuilt kernel there is ever used, and only as a cache seed.
lab_shared_dir() { printf '%s\n' "${IOASID_SHARED_DIR:-$(lab_repo)/../shared}"; }

lab_cache_dir() { printf '%s\n' "${IOASID_LAB_CACHE:-${HOME:-/root}/.cache/ioasid-vmm}"; }

lab_sha256() { sha256sum "$1" | cut -d' ' -f1; }

# --- apt ---------------------------------------------------------------------------------

# lab_apt_has_suite APT_ETC SUITE: true when an enabled "deb" source for SUITE exists, in
# one-line (.list) or deb822 (.sources) form.
lab_apt_has_suite() {
    local etc=$1 suite=$2 f
    for f in "$etc/sources.list" "$etc"/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        if grep -Eqs "^[[:space:]]*deb[[:space:]]+(\[[^]]*\][[:space:]]+)?[^[:space:]]+[[:space:]]+${suite}([[:space:]]|$)" "$f"; then
            return 0
        fi
    done
    for f in "$etc"/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        if awk -v s="$suite" '
            function flush() { if (hit && deb && on) found = 1; hit = 0; deb = 0; on = 1 }
            BEGIN { on = 1 }
            /^[ \t]*$/ { flush(); next }
            /^[ \t]*#/ { next }
            tolower($1) == "suites:" { for (i = 2; i <= NF; i++) if ($i == s) hit = 1 }
            tolower($1) == "types:" { for (i = 2; i <= NF; i++) if ($i == "deb") deb = 1 }
            tolower($1) == "enabled:" { if (tolower($2) == "no") on = 0 }
            END { flush(); exit(found ? 0 : 1) }' "$f"; then
            return 0
        fi
    done
    return 1
}

# lab_apt_debian_origin APT_ETC: prints two lines, the URIs and the Signed-By of the
# machine's Debian "bookworm" source (deb822 debian.sources first, then sources.list),
# falling back to the standard mirror and keyring.
lab_apt_debian_origin() {
    local etc=$1 uris="" signed=""
    local f=$etc/sources.list.d/debian.sources
    if [ -f "$f" ]; then
        # The first stanza whose Suites has "bookworm" exactly.
        local out
        out=$(awk '
            function flush() {
                if (hit && uris != "" && !done) { print uris; print signed; done = 1 }
                hit = 0; uris = ""; signed = ""
            }
            /^[ \t]*$/ { flush(); next }
            /^[ \t]*#/ { next }
            tolower($1) == "suites:" { for (i = 2; i <= NF; i++) if ($i == "bookworm") hit = 1 }
            tolower($1) == "uris:" { $1 = ""; sub(/^[ \t]+/, ""); uris = $0 }
            tolower($1) == "signed-by:" { $1 = ""; sub(/^[ \t]+/, ""); signed = $0 }
            END { flush() }' "$f")
        uris=$(printf '%s\n' "$out" | sed -n 1p)
        signed=$(printf '%s\n' "$out" | sed -n 2p)
    fi
    if [ -z "$uris" ] && [ -f "$etc/sources.list" ]; then
        local line
        line=$(grep -Em1 '^[[:space:]]*deb[[:space:]]+(\[[^]]*\][[:space:]]+)?[^[:space:]]+[[:space:]]+bookworm([[:space:]]|$)' \
            "$etc/sources.list" || true)
        if [ -n "$line" ]; then
            uris=$(printf '%s\n' "$line" | sed -E 's/^[[:space:]]*deb[[:space:]]+(\[[^]]*\][[:space:]]+)?([^[:space:]]+).*/\2/')
            signed=$(printf '%s\n' "$line" | sed -nE 's/.*signed-by=([^] ]+).*/\1/p')
        fi
    fi
    printf '%s\n%s\n' "${uris:-http://deb.debian.org/debian}" \
        "${signed:-/usr/share/keyrings/debian-archive-keyring.gpg}"
}

# lab_apt_add_suite APT_ETC SUITE DRY_RUN: writes a deb822 source for SUITE with the
# machine's Debian URIs and Signed-By.
lab_apt_add_suite() {
    local etc=$1 suite=$2 dry=$3 origin uris signed file
    origin=$(lab_apt_debian_origin "$etc")
    uris=$(printf '%s\n' "$origin" | sed -n 1p)
    signed=$(printf '%s\n' "$origin" | sed -n 2p)
    file=$etc/sources.list.d/ioasid-lab-$suite.sources
    local body
    body=$(printf 'Types: deb\nURIs: %s\nSuites: %s\nComponents: main\nSigned-By: %s\n' \
        "$uris" "$suite" "$signed")
    if [ "$dry" = 1 ]; then
        lab_say "would write $file:"
        printf '%s\n' "$body" | sed 's/^/    /' >&2
        return 0
    fi
    mkdir -p "$etc/sources.list.d"
    printf '%s\n' "$body" >"$file"
    lab_say "added apt source $file ($suite)"
}

# lab_apt_lists_present SUITE: true when apt has downloaded package lists for SUITE.
lab_apt_lists_present() {
    compgen -G "/var/lib/apt/lists/*_dists_${1}_*Packages*" >/dev/null
}

lab_apt_update() {
    lab_say "apt-get update"
    local log
    log=$(mktemp)
    if ! apt-get -q update >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        lab_die "apt-get update failed"
    fi
    rm -f "$log"
}

# lab_apt_install [apt-get install args...]: quiet unless it fails; retries once after an
# apt-get update (stale lists give 404s).
lab_apt_install() {
    lab_say "apt-get install $*"
    local log
    log=$(mktemp)
    if ! DEBIAN_FRONTEND=noninteractive apt-get -q -y --no-install-recommends install "$@" \
        </dev/null >"$log" 2>&1; then
        lab_say "install failed; retrying after apt-get update"
        lab_apt_update
        if ! DEBIAN_FRONTEND=noninteractive apt-get -q -y --no-install-recommends install "$@" \
            </dev/null >"$log" 2>&1; then
            cat "$log" >&2
            rm -f "$log"
            lab_die "apt-get install $* failed"
        fi
    fi
    rm -f "$log"
}
