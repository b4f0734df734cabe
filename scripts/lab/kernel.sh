#!/usr/bin/env bash
# Prints the path of a lab kernel bzImage built from exactly scripts/lab/kernel/config (the L2
# kernel, flavor l2) or scripts/lab/kernel/l3-config (the small L3 guest kernel, flavor l3).
#
# Usage:
#   scripts/lab/kernel.sh [--flavor l2|l3] [--config FILE] [--dry-run]
#       Print the bzImage path (stdout; all messages go to stderr). In order:
#       1. the cache, $IOASID_LAB_CACHE/kernel/<sha256 of config>/bzImage
#          (IOASID_LAB_CACHE defaults to ~/.cache/ioasid-vmm);
#       2. the prebuilt kernel in shared/lab/ (beside the repository, or $IOASID_SHARED_DIR),
#          only when its config is byte-identical to ours and both files match SHA256SUMS;
#          it is copied into the cache;
#       3. a build: installs linux-source-X.Y from trixie-backports (pinned so that nothing
#          else comes from trixie) and the build tools, unpacks it under the cache,
#          `make olddefconfig` with our config, `make bzImage` (about 20 min on 2 cores;
#          the object tree is kept, so a later config change is an incremental build).
#       --flavor l2|l3 l2 (default): the L2 lab kernel (defconfig-based, reusable from
#                      shared/lab); l3: the L3 guest kernel (tinyconfig-based, no prebuilt:
#                      built once, a few minutes, then cached). Each flavor keeps its own
#                      object tree.
#       --config FILE  use FILE instead of the flavor's config (for experiments).
#       --dry-run      say what would be done; install, unpack and build nothing.
#   scripts/lab/kernel.sh --flavor l3 --module DIR [--dry-run]
#       Build the external module in DIR (its Kbuild/Makefile; e.g. tests/l3-module) against
#       the L3 kernel's object tree and print the path of its .ko, cached beside the bzImage
#       as <cache>/kernel/<config sha256>/modules/<sha256 of DIR's files>/NAME.ko. The object
#       tree is (re)built first when it holds another config or no Module.symvers.
#   scripts/lab/kernel.sh --flavor l3 --vmlinux
#       Print the path of the uncompressed ELF vmlinux of the same build (PVH entry), cached
#       beside the bzImage as <cache>/kernel/<config sha256>/vmlinux (debug info stripped),
#       for the boot-overhead bench; taken from the object tree when it holds exactly this
#       config, else the tree is rebuilt first.
#   scripts/lab/kernel.sh [--flavor l2|l3] --regen-config [--dry-run]
#       Regenerate the flavor's config from its fragment: l2: defconfig + kvm_guest.config +
#       kernel/lab.fragment; l3: tinyconfig + kernel/l3.fragment; merged with
#       merge_config.sh, then olddefconfig. Needs the kernel source (installed as above).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/lab/lib.sh
. "$here/lib.sh"

config=""
flavor=l2
dry_run=0
regen=0
module_dir=""
want_vmlinux=0
while [ $# -gt 0 ]; do
    case "$1" in
    --flavor)
        [ $# -ge 2 ] || lab_die "kernel: --flavor needs l2 or l3"
        flavor=$2
        shift
        ;;
    --config)
        [ $# -ge 2 ] || lab_die "kernel: --config needs a file"
        config=$2
        shift
        ;;
    --dry-run) dry_run=1 ;;
    --regen-config) regen=1 ;;
    --vmlinux) want_vmlinux=1 ;;
    --module)
        [ $# -ge 2 ] || lab_die "kernel: --module needs a directory"
        module_dir=$2
        shift
        ;;
    -h | --help)
        sed -n '2,36p' "$0"
        exit 0
        ;;
    *) lab_die "kernel: unknown argument '$1'" ;;
    esac
    shift
done
case "$flavor" in
l2)
    [ -n "$config" ] || config=$here/kernel/config
    fragment=$here/kernel/lab.fragment
    base_targets=(defconfig kvm_guest.config)
    obj_suffix=""
    ;;
l3)
    [ -n "$config" ] || config=$here/kernel/l3-config
    fragment=$here/kernel/l3.fragment
    base_targets=(tinyconfig)
    obj_suffix=-l3
    ;;
*) lab_die "kernel: --flavor must be l2 or l3, got '$flavor'" ;;
esac

apt_etc=${IOASID_LAB_APT_ETC:-/etc/apt}
cache=$(lab_cache_dir)/kernel
build_deps=(build-essential flex bison bc libelf-dev libssl-dev xz-utils cpio kmod)

# "7.3" from the "# Linux/x86 7.3.4 Kernel Configuration" header of a full config.
config_series() {
    sed -n 's/^# Linux\/[^ ]* \([0-9]*\)\.\([0-9]*\)[.0-9]* Kernel Configuration.*/\1.\2/p' "$1" |
        head -n1
}

# --- kernel source ---------------------------------------------------------------------

# ensure_source SERIES: installs linux-source-SERIES and the build tools, unpacks the source
# under the cache and prints the source tree's path.
ensure_source() {
    local series=$1 pkg=linux-source-$1
    local tarball=/usr/src/$pkg.tar.xz
    local missing=() p
    for p in "${build_deps[@]}"; do
        [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" = installed ] ||
            missing+=("$p")
    done
    local need_pkg=0
    [ -f "$tarball" ] || need_pkg=1

    if [ "$need_pkg" = 1 ] || [ ${#missing[@]} != 0 ]; then
        if [ "$dry_run" = 0 ] && [ "$(id -u)" != 0 ]; then
            lab_die "kernel: building needs root to install ${missing[*]:-} $([ $need_pkg = 1 ] && echo "$pkg")"
        fi
    fi
    if [ "$need_pkg" = 1 ]; then
        local pin=$apt_etc/preferences.d/ioasid-lab-trixie-backports
        local need_update=0
        if ! lab_apt_has_suite "$apt_etc" trixie-backports; then
            lab_apt_add_suite "$apt_etc" trixie-backports "$dry_run"
            need_update=1
        fi
        if [ ! -f "$pin" ]; then
            # Nothing comes from trixie-backports unless asked for by name/release.
            local body
            body=$(printf '%s\n' \
                "# Added by ioasid-vmm scripts/lab/kernel.sh: only $pkg is taken from" \
                "# trixie-backports (requested as $pkg/trixie-backports); nothing else." \
                "Package: *" "Pin: release n=trixie-backports" "Pin-Priority: 1")
            if [ "$dry_run" = 1 ]; then
                lab_say "would write $pin:"
                printf '%s\n' "$body" | sed 's/^/    /' >&2
            else
                mkdir -p "$(dirname "$pin")"
                printf '%s\n' "$body" >"$pin"
                lab_say "added apt pin $pin"
            fi
        fi
        lab_apt_lists_present trixie-backports || need_update=1
        if [ "$dry_run" = 1 ]; then
            [ "$need_update" = 1 ] && lab_say "would run: apt-get update"
            lab_say "would run: apt-get install $pkg/trixie-backports ${missing[*]:-}"
        else
            [ "$need_update" = 1 ] && lab_apt_update
            lab_apt_install "$pkg/trixie-backports" "${missing[@]}"
            [ -f "$tarball" ] || lab_die "kernel: $pkg installed but $tarball is missing"
        fi
    elif [ ${#missing[@]} != 0 ]; then
        if [ "$dry_run" = 1 ]; then
            lab_say "would run: apt-get install ${missing[*]}"
        else
            lab_apt_install "${missing[@]}"
        fi
    fi

    local src=$cache/src/$pkg
    local version
    version=$(dpkg-query -W -f='${Version}' "$pkg" 2>/dev/null || echo unknown)
    local stamp=$cache/src/.unpacked-$pkg-$version
    if [ ! -f "$stamp" ] || [ ! -f "$src/Makefile" ]; then
        if [ "$dry_run" = 1 ]; then
            lab_say "would unpack $tarball into $cache/src/"
        else
            lab_say "kernel: unpacking $tarball into $cache/src/"
            rm -rf "$src" "$cache"/src/.unpacked-"$pkg"-*
            mkdir -p "$cache/src"
            tar -C "$cache/src" -xf "$tarball"
            [ -f "$src/Makefile" ] || lab_die "kernel: $tarball did not unpack to $src"
            touch "$stamp"
        fi
    fi
    printf '%s\n' "$src"
}

# --- regenerate the config from the fragment --------------------------------------------

regen_config() {
    local series
    series=$(config_series "$config")
    [ -n "$series" ] || lab_die "kernel: cannot read the kernel version from $config's header"
    local src obj=$cache/regen$obj_suffix
    src=$(ensure_source "$series")
    if [ "$dry_run" = 1 ]; then
        lab_say "would run in $obj: make ${base_targets[*]};" \
            "merge_config.sh -m .config $fragment; make olddefconfig; copy .config to $config"
        return 0
    fi
    rm -rf "$obj"
    mkdir -p "$obj"
    local log=$obj/regen.log
    (
        for t in "${base_targets[@]}"; do
            make -C "$src" O="$obj" "$t" || exit 1
        done
        (cd "$obj" && "$src/scripts/kconfig/merge_config.sh" -m -O "$obj" "$obj/.config" "$fragment") &&
            make -C "$src" O="$obj" olddefconfig
    ) >"$log" 2>&1 || {
        tail -n 40 "$log" >&2
        lab_die "kernel: regenerating the config failed (log: $log)"
    }
    # Every option the fragment asks for must have survived olddefconfig.
    local bad=0 line sym
    while IFS= read -r line; do
        case "$line" in
        CONFIG_*=*)
            grep -qxF "$line" "$obj/.config" || {
                lab_warn "fragment asks for '$line' but the result has '$(grep -E "^(# )?${line%%=*}[= ]" "$obj/.config" || echo unset)'"
                bad=1
            }
            ;;
        "# CONFIG_"*" is not set")
            sym=${line#\# }
            sym=${sym%% *}
            if grep -q "^$sym=" "$obj/.config"; then
                lab_warn "fragment asks for '$line' but the result has '$(grep "^$sym=" "$obj/.config")'"
                bad=1
            fi
            ;;
        esac
    done <"$fragment"
    if cmp -s "$obj/.config" "$config"; then
        lab_say "kernel: $config is unchanged"
    else
        cp "$obj/.config" "$config"
        lab_say "kernel: wrote $config (sha256 $(lab_sha256 "$config")); review with git diff"
    fi
    [ "$bad" = 0 ] || lab_warn "some fragment options did not take effect (dependencies?); see above"
}

# --- the bzImage -------------------------------------------------------------------------

# try_prebuilt SHA OUT: copies the shared prebuilt bzImage into OUT when its config has
# hash SHA and both files match shared/lab/SHA256SUMS.
# shellcheck disable=SC2094 # $sums is only read
try_prebuilt() {
    local want=$1 out=$2
    local dir
    dir=$(lab_shared_dir)/lab
    local sums=$dir/SHA256SUMS
    [ -f "$sums" ] || return 1
    local hash name suffix bz_hash
    while read -r hash name; do
        name=${name#\*}
        case "$name" in config-*) ;; *) continue ;; esac
        [ "$hash" = "$want" ] || continue
        suffix=${name#config-}
        [ -f "$dir/$name" ] || continue
        if [ "$(lab_sha256 "$dir/$name")" != "$hash" ]; then
            lab_warn "$dir/$name does not match $sums; not reusing it"
            continue
        fi
        bz_hash=$(awk -v n="bzImage-$suffix" '$2 == n || $2 == "*" n { print $1 }' "$sums")
        if [ -z "$bz_hash" ] || [ ! -f "$dir/bzImage-$suffix" ]; then
            continue
        fi
        if [ "$(lab_sha256 "$dir/bzImage-$suffix")" != "$bz_hash" ]; then
            lab_warn "$dir/bzImage-$suffix does not match $sums; not reusing it"
            continue
        fi
        if [ "$dry_run" = 1 ]; then
            lab_say "would copy the prebuilt $dir/bzImage-$suffix into $out"
            return 0
        fi
        mkdir -p "$(dirname "$out")"
        cp "$dir/bzImage-$suffix" "$out.tmp.$$"
        [ "$(lab_sha256 "$out.tmp.$$")" = "$bz_hash" ] ||
            lab_die "kernel: copy of $dir/bzImage-$suffix is corrupt"
        cp "$config" "$(dirname "$out")/config"
        chmod 0644 "$out.tmp.$$"
        mv -f "$out.tmp.$$" "$out"
        lab_say "kernel: reused the prebuilt bzImage-$suffix (config sha256 $want)"
        return 0
    done <"$sums"
    return 1
}

# build_kernel OUT: builds bzImage from $config into OUT.
build_kernel() {
    local out=$1 series
    series=$(config_series "$config")
    [ -n "$series" ] || lab_die "kernel: cannot read the kernel version from $config's header"
    local minutes="about 20 min"
    [ "$flavor" = l3 ] && minutes="about 4 min"
    lab_say "kernel: no cached or prebuilt $flavor kernel for this config; building linux $series" \
        "($minutes on 2 cores from scratch)"
    local src obj=$cache/build/obj-$series$obj_suffix
    src=$(ensure_source "$series")
    if [ "$dry_run" = 1 ]; then
        lab_say "would run: cp $config $obj/.config; make -C $src O=$obj olddefconfig;" \
            "compare with $config; make -j$(nproc) bzImage; copy arch/x86/boot/bzImage to $out"
        return 0
    fi
    mkdir -p "$obj"
    cp "$config" "$obj/.config"
    local log=$cache/build/build-$series$obj_suffix.log
    make -C "$src" O="$obj" olddefconfig >"$log" 2>&1 || {
        tail -n 40 "$log" >&2
        lab_die "kernel: make olddefconfig failed (log: $log)"
    }
    if ! cmp -s "$obj/.config" "$config"; then
        lab_warn "################################################################"
        lab_warn "make olddefconfig CHANGED the config: the kernel will NOT be built"
        lab_warn "from exactly $config. Regenerate it (kernel.sh --regen-config)"
        lab_warn "or fix it. Differences (< ours, > olddefconfig):"
        diff "$config" "$obj/.config" | grep '^[<>]' | head -n 40 >&2 || true
        lab_warn "################################################################"
    fi

    local jobs
    jobs=$(nproc)
    # With loadable modules, `modules` also writes Module.symvers, which --module needs.
    local targets=(bzImage)
    grep -qx 'CONFIG_MODULES=y' "$config" && targets+=(modules)
    lab_say "kernel: make -j$jobs ${targets[*]} (log: $log)"
    make -C "$src" O="$obj" -j"$jobs" "${targets[@]}" >>"$log" 2>&1 &
    local pid=$! start=$SECONDS last=$SECONDS
    # shellcheck disable=SC2064
    trap "kill $pid 2>/dev/null || true" EXIT INT TERM
    while kill -0 "$pid" 2>/dev/null; do
        sleep 5
        if [ $((SECONDS - last)) -ge 45 ]; then
            last=$SECONDS
            lab_say "kernel build: $(((SECONDS - start) / 60))m$(((SECONDS - start) % 60))s," \
                "$(grep -c '^  CC' "$log" || true) files compiled, last: $(tail -n1 "$log" | cut -c1-80)"
        fi
    done
    local rc=0
    wait "$pid" || rc=$?
    trap - EXIT INT TERM
    if [ "$rc" != 0 ]; then
        tail -n 60 "$log" >&2
        lab_die "kernel: make bzImage failed with status $rc (log: $log)"
    fi
    lab_say "kernel: built in $(((SECONDS - start) / 60))m$(((SECONDS - start) % 60))s"
    mkdir -p "$(dirname "$out")"
    cp "$obj/arch/x86/boot/bzImage" "$out.tmp.$$"
    cp "$obj/.config" "$(dirname "$out")/config"
    save_vmlinux "$obj" "$(dirname "$out")/vmlinux"
    mv -f "$out.tmp.$$" "$out"
}

# save_vmlinux OBJ OUT: the object tree's vmlinux without debug info (the PVH note stays).
save_vmlinux() {
    strip --strip-debug -o "$2.tmp.$$" "$1/vmlinux" 2>/dev/null || cp "$1/vmlinux" "$2.tmp.$$"
    mv -f "$2.tmp.$$" "$2"
}

# --- an external module against the flavor's object tree ---------------------------------

# build_module DIR SHA: prints the path of DIR's .ko built against the object tree of the
# config with hash SHA (rebuilding the tree first when it holds another config).
build_module() {
    local dir=$1 sha=$2 series
    [ -d "$dir" ] || lab_die "kernel: no module directory $dir"
    grep -qx 'CONFIG_MODULES=y' "$config" || lab_die "kernel: $config has no CONFIG_MODULES=y"
    series=$(config_series "$config")
    local obj=$cache/build/obj-$series$obj_suffix
    local src_hash name
    src_hash=$(cd "$dir" && find . -type f \( -name '*.[ch]' -o -name Kbuild -o -name Makefile \) |
        LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-64)
    name=$(sed -n 's/^obj-m[[:space:]]*[+:]*=[[:space:]]*\([A-Za-z0-9_-]*\)\.o.*/\1/p' "$dir/Kbuild" | head -n1)
    [ -n "$name" ] || lab_die "kernel: $dir/Kbuild names no obj-m module"
    local out=$cache/$sha/modules/$src_hash/$name.ko
    if [ -s "$out" ]; then
        printf '%s\n' "$out"
        return 0
    fi
    if [ "$dry_run" = 1 ]; then
        lab_say "would build $dir against $obj (rebuilding the tree if it holds another config)" \
            "and copy $name.ko to $out"
        return 0
    fi
    # The object tree is shared by every config of the flavor: it must hold exactly ours.
    if ! cmp -s "$obj/.config" "$config" || [ ! -s "$obj/Module.symvers" ]; then
        lab_say "kernel: the $flavor object tree holds another config or no Module.symvers; rebuilding it"
        build_kernel "$cache/$sha/bzImage"
    fi
    local work=$cache/build/mod-$name$obj_suffix log
    log=$work.log
    rm -rf "$work"
    mkdir -p "$work"
    cp -r "$dir"/. "$work"/
    lab_say "kernel: building module $name against $obj (log: $log)"
    make -C "$obj" M="$work" modules >"$log" 2>&1 || {
        tail -n 40 "$log" >&2
        lab_die "kernel: building module $name failed (log: $log)"
    }
    [ -s "$work/$name.ko" ] || lab_die "kernel: no $name.ko after the build (log: $log)"
    mkdir -p "$(dirname "$out")"
    cp "$work/$name.ko" "$out.tmp.$$"
    mv -f "$out.tmp.$$" "$out"
    printf '%s\n' "$out"
}

[ -f "$config" ] || lab_die "kernel: no config at $config"

if [ "$regen" = 1 ]; then
    [ -f "$fragment" ] || lab_die "kernel: no fragment at $fragment"
    regen_config
    exit 0
fi

sha=$(lab_sha256 "$config")
out=$cache/$sha/bzImage
# One build per flavor at a time (several lab runs may start together).
if [ "$dry_run" = 0 ] && command -v flock >/dev/null 2>&1; then
    mkdir -p "$cache"
    exec 9>"$cache/.lock-$flavor"
    flock 9
fi
if [ -n "$module_dir" ]; then
    [ "$flavor" = l3 ] || lab_die "kernel: --module needs --flavor l3"
    build_module "$module_dir" "$sha"
    exit 0
fi
if [ "$want_vmlinux" = 1 ]; then
    vmlinux=$cache/$sha/vmlinux
    if [ ! -s "$vmlinux" ] && [ "$dry_run" = 0 ]; then
        series=$(config_series "$config")
        tree=$cache/build/obj-$series$obj_suffix
        if cmp -s "$tree/.config" "$config" && [ -s "$tree/vmlinux" ]; then
            mkdir -p "$cache/$sha"
            save_vmlinux "$tree" "$vmlinux"
        else
            lab_say "kernel: the $flavor object tree holds another config; rebuilding it for vmlinux"
            build_kernel "$out"
        fi
    fi
    printf '%s
' "$vmlinux"
    exit 0
fi
if [ -s "$out" ]; then
    printf '%s\n' "$out"
    exit 0
fi
if try_prebuilt "$sha" "$out"; then
    [ "$dry_run" = 1 ] || printf '%s\n' "$out"
    exit 0
fi
build_kernel "$out"
[ "$dry_run" = 1 ] || printf '%s\n' "$out"
