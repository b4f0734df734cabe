#!/usr/bin/env bash
# Builds the lab's L2 initramfs (gzip'd newc cpio) and prints its path.
#
# Usage: scripts/lab/initramfs.sh [--out FILE] [--init FILE] [--bin-name NAME] LAB_BIN
#                                 [--add SRC:DEST]...
#   LAB_BIN         the lab test binary; installed as /bin/NAME (default /bin/ioasid-lab).
#   --init FILE     the /init script (default scripts/lab/init, the L2 init; the L3 guest's
#                   initramfs uses scripts/lab/l3-init).
#   --bin-name NAME install LAB_BIN as /bin/NAME.
#   --add SRC:DEST  also install SRC (a file or a directory) at DEST (an absolute path) in
#                   the guest, e.g. --add target/release/ioasid-vmm:/bin/ioasid-vmm.
#   --out FILE      where to write the archive (default ./initramfs.cpio.gz).
# Contents: busybox (from busybox-static) and its applet links, /init (scripts/lab/init),
# the binaries, and the shared libraries (and dynamic loader) that ldd finds for every
# dynamically linked executable, at the same paths as on the host.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/lab/lib.sh
. "$here/lib.sh"

out=$PWD/initramfs.cpio.gz
lab_bin=""
init=$here/init
bin_name=ioasid-lab
adds=()
while [ $# -gt 0 ]; do
    case "$1" in
    --out)
        [ $# -ge 2 ] || lab_die "initramfs: --out needs a file"
        out=$2
        shift
        ;;
    --init)
        [ $# -ge 2 ] || lab_die "initramfs: --init needs a file"
        init=$2
        shift
        ;;
    --bin-name)
        [ $# -ge 2 ] || lab_die "initramfs: --bin-name needs a name"
        bin_name=$2
        shift
        ;;
    --add)
        [ $# -ge 2 ] || lab_die "initramfs: --add needs SRC:DEST"
        adds+=("$2")
        shift
        ;;
    -h | --help)
        sed -n '2,16p' "$0"
        exit 0
        ;;
    -*) lab_die "initramfs: unknown option '$1'" ;;
    *)
        [ -z "$lab_bin" ] || lab_die "initramfs: more than one LAB_BIN ('$lab_bin', '$1')"
        lab_bin=$1
        ;;
    esac
    shift
done
[ -n "$lab_bin" ] || lab_die "initramfs: usage: initramfs.sh [--out FILE] LAB_BIN [--add SRC:DEST]..."
[ -f "$lab_bin" ] || lab_die "initramfs: lab binary '$lab_bin' not found"

busybox=${IOASID_LAB_BUSYBOX:-/bin/busybox}
[ -x "$busybox" ] || lab_die "initramfs: no $busybox (apt-get install busybox-static; scripts/lab/setup.sh does it)"
if ldd "$busybox" >/dev/null 2>&1; then
    lab_die "initramfs: $busybox is dynamically linked; the lab needs busybox-static"
fi

stage=$(mktemp -d "${TMPDIR:-/tmp}/ioasid-lab-initramfs.XXXXXX")
trap 'rm -rf "$stage"' EXIT

is_elf() { [ "$(head -c4 "$1" 2>/dev/null | od -An -c | tr -d ' ')" = '177ELF' ]; }

# copy_libs FILE: copies the shared libraries and loader FILE needs into the stage.
copy_libs() {
    local f=$1 line lib
    is_elf "$f" || return 0
    local deps
    if ! deps=$(ldd "$f" 2>&1); then
        # "not a dynamic executable" (static binaries, or not an executable at all).
        return 0
    fi
    if grep -q 'not found' <<<"$deps"; then
        lab_die "initramfs: $f needs libraries that are missing on this host: $(grep 'not found' <<<"$deps" | tr -s ' \t' ' ')"
    fi
    while IFS= read -r line; do
        lib=""
        case "$line" in
        *"=> /"*) lib=${line#*=> } ;;
        [[:space:]]/* | /*) lib=${line#"${line%%[![:space:]]*}"} ;;
        esac
        lib=${lib%% (*}
        [ -n "$lib" ] || continue
        if [ ! -e "$stage$lib" ]; then
            mkdir -p "$stage$(dirname "$lib")"
            cp -L "$lib" "$stage$lib"
        fi
    done <<<"$deps"
}

# install_path SRC DEST: copies SRC (file or directory) to DEST in the stage, with libraries.
install_path() {
    local src=$1 dest=$2 f
    case "$dest" in /*) ;; *) lab_die "initramfs: destination '$dest' must be absolute" ;; esac
    [ -e "$src" ] || lab_die "initramfs: '$src' not found"
    mkdir -p "$stage$(dirname "$dest")"
    rm -rf "${stage:?}$dest"
    if [ -d "$src" ]; then
        cp -a -L "$src" "$stage$dest"
        while IFS= read -r -d '' f; do
            if [ -x "$f" ]; then copy_libs "$f"; fi
        done < <(find "$stage$dest" -type f -print0)
    else
        cp -L "$src" "$stage$dest"
        copy_libs "$src"
    fi
}

mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,root,etc}
chmod 1777 "$stage/tmp"
cp "$busybox" "$stage/bin/busybox"
while IFS= read -r applet; do
    [ -n "$applet" ] || continue
    [ -e "$stage/$applet" ] || [ -L "$stage/$applet" ] || ln -s /bin/busybox "$stage/$applet"
done < <("$busybox" --list-full)
[ -e "$stage/bin/sh" ] || ln -s /bin/busybox "$stage/bin/sh"
# The kernel opens /dev/console before /init mounts devtmpfs; /init copes without it too.
mknod -m 600 "$stage/dev/console" c 5 1 2>/dev/null || true

[ -f "$init" ] || lab_die "initramfs: init script '$init' not found"
install -m 0755 "$init" "$stage/init"
install_path "$lab_bin" "/bin/$bin_name"
chmod 0755 "$stage/bin/$bin_name"
for a in "${adds[@]}"; do
    case "$a" in *:*) ;; *) lab_die "initramfs: --add wants SRC:DEST, got '$a'" ;; esac
    install_path "${a%:*}" "${a##*:}"
done

mkdir -p "$(dirname "$out")"
(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort |
    cpio -o -H newc -R 0:0 --quiet) | gzip -6 >"$out.tmp.$$"
mv -f "$out.tmp.$$" "$out"
printf '%s\n' "$(cd "$(dirname "$out")" && pwd)/$(basename "$out")"
