#!/usr/bin/env bash
# build-initramfs.sh - build the guest test kit's initramfs for mvmm.
#
# The initramfs boots the pinned Debian kernel (fetch-kernel.sh) into a busybox
# userland that loads the virtio modules, runs one test script from
# resources/guest/tests/ (chosen with mvmm.test=<name> on the kernel command
# line) and powers off. See resources/guest/README.md.
#
# Contents: static busybox and its applet symlinks, the kernel modules that
# fetch-kernel.sh extracted, /init, the test scripts, and a few Debian tools
# busybox lacks (mkfs.ext4, e2fsck, dumpe2fs, fstrim, blkdiscard, ethtool)
# with the shared libraries they need. All of it comes from the Debian
# packages pinned in initramfs.pin, never from the host's installed files.
#
# Usage:
#   build-initramfs.sh              build if needed; stdout is two lines,
#                                   BZIMAGE=<path> and INITRAMFS=<path> (last)
#   build-initramfs.sh --force      rebuild even if an up-to-date one exists
#   build-initramfs.sh --update-pin pin the versions apt offers now (rewrites
#                                   initramfs.pin)
#
# Environment:
#   MVMM_CACHE               cache root (default: $HOME/.cache/mvmm)
#   MVMM_APT_LOCK_TIMEOUT    seconds to keep retrying while apt/dpkg locks are
#                            held by someone else (default: 120)
#
# The output is deterministic (sorted newc cpio, all mtimes 0, owner 0:0,
# gzip -n) and named after a hash of its inputs: this script, the pin, /init,
# the tests and the kernel cache stamp. An existing output for the same inputs
# is reused without any apt calls.
set -euo pipefail

log() { printf 'build-initramfs: %s\n' "$*" >&2; }
die() {
    printf 'build-initramfs: error: %s\n' "$*" >&2
    exit 1
}
usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}" >&"${1:-2}"
}

script_dir=${BASH_SOURCE[0]%/*}
[[ $script_dir == "${BASH_SOURCE[0]}" ]] && script_dir=.
script_dir=$(cd "$script_dir" && pwd -P)
PIN_FILE=$script_dir/initramfs.pin
INIT_SRC=$script_dir/init
TESTS_SRC=$script_dir/tests

# Debian binaries copied into /usr/local/sbin (first in the guest's PATH, so
# they win over busybox applets of the same name): <package>:<path in package>
TOOLS=(
    e2fsprogs:sbin/mke2fs e2fsprogs:sbin/e2fsck e2fsprogs:sbin/dumpe2fs
    util-linux:sbin/fstrim util-linux:sbin/blkdiscard
    ethtool:sbin/ethtool
)
# Extra symlinks in /usr/local/sbin: <name>:<target>
TOOL_LINKS=(mkfs.ext4:mke2fs fsck.ext4:e2fsck)
# Plain files: <path in package>:<path in the initramfs>
DATA_FILES=(etc/mke2fs.conf:etc/mke2fs.conf)
# Where ld.so looks without an ld.so.cache on Debian (multiarch directories).
LIB_DIRS=(lib/x86_64-linux-gnu usr/lib/x86_64-linux-gnu lib64 usr/lib64 lib usr/lib)
readonly OUT_KEEP=8 # initramfs images kept in the cache (newest first)

mode=build
force=0
while (($#)); do
    case $1 in
    --force) force=1 ;;
    --update-pin) mode=update-pin ;;
    -h | --help)
        usage 1
        exit 0
        ;;
    *)
        usage
        die "unknown argument '$1'"
        ;;
    esac
    shift
done

# --------------------------------------------------------------------------
# Pin: "<package> <version> <sha256>" lines.
# --------------------------------------------------------------------------
PIN_PKGS=() PIN_VERS=() PIN_SUMS=()
declare -A PIN_IDX=()
read_pin() {
    [[ -r $PIN_FILE ]] || die "pin file $PIN_FILE not found"
    local line n=0 p v s rest
    while IFS= read -r line || [[ -n $line ]]; do
        n=$((n + 1))
        line=${line%%#*}
        [[ -z ${line//[[:space:]]/} ]] && continue
        read -r p v s rest <<<"$line"
        [[ -z ${rest:-} && -n ${s:-} ]] || die "$PIN_FILE:$n: expected '<package> <version> <sha256>'"
        [[ $p =~ ^[a-z0-9][a-z0-9+.-]+$ ]] || die "$PIN_FILE:$n: bad package name '$p'"
        [[ $v =~ ^([0-9]+:)?[0-9][A-Za-z0-9.+~-]*$ ]] || die "$PIN_FILE:$n: bad version '$v'"
        [[ $s =~ ^[0-9a-f]{64}$ ]] || die "$PIN_FILE:$n: SHA-256 must be 64 lowercase hex digits"
        [[ -z ${PIN_IDX[$p]:-} ]] || die "$PIN_FILE:$n: $p is pinned twice"
        PIN_IDX[$p]=${#PIN_PKGS[@]}
        PIN_PKGS+=("$p") PIN_VERS+=("$v") PIN_SUMS+=("$s")
    done <"$PIN_FILE"
    ((${#PIN_PKGS[@]})) || die "$PIN_FILE pins no packages"
    local t
    for t in busybox-static "${TOOLS[@]%%:*}"; do
        [[ -n ${PIN_IDX[$t]:-} ]] || die "$PIN_FILE does not pin $t"
    done
}

if [[ -n ${MVMM_CACHE:-} ]]; then
    CACHE=$MVMM_CACHE
else
    [[ -n ${HOME:-} ]] || die "neither MVMM_CACHE nor HOME is set"
    CACHE=$HOME/.cache/mvmm
fi
[[ $CACHE == /* ]] || CACHE=$PWD/$CACHE

# --------------------------------------------------------------------------
# Fast path: kernel cache (fetch-kernel.sh has its own fast path), input hash,
# existing output.
# --------------------------------------------------------------------------
sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

kernel_out=$("$script_dir/fetch-kernel.sh") || die "fetch-kernel.sh failed"
MODDIR=$(sed -n 's/^MODULES=//p' <<<"$kernel_out")
BZIMAGE=$(sed -n 's/^BZIMAGE=//p' <<<"$kernel_out")
[[ -n $MODDIR && -n $BZIMAGE ]] || die "fetch-kernel.sh printed no MODULES=/BZIMAGE= line"
KSTAMP=${BZIMAGE%/*}/.complete
[[ -f $KSTAMP && -f $MODDIR/modules.load ]] || die "kernel cache $KSTAMP / $MODDIR is incomplete"
KREL=${MODDIR##*/}

[[ -f $INIT_SRC ]] || die "$INIT_SRC not found"
test_files=()
while IFS= read -r -d '' f; do test_files+=("${f#"$script_dir"/}"); done < <(
    find "$TESTS_SRC" -type f \( -name '*.sh' -o -path '*/lib/*' \) -print0 | LC_ALL=C sort -z
)
((${#test_files[@]})) || die "no test scripts in $TESTS_SRC"

input_key() {
    {
        printf 'mvmm-initramfs-v1\n'
        (cd "$script_dir" && sha256sum build-initramfs.sh initramfs.pin init "${test_files[@]}")
        printf 'kernel-stamp %s\n' "$(sha256_of "$KSTAMP")"
    } | sha256sum | cut -c1-16
}
KEY=$(input_key)
OUT_DIR=$CACHE/initramfs
OUT=$OUT_DIR/initramfs-$KEY.cpio.gz

emit() { printf 'BZIMAGE=%s\nINITRAMFS=%s\n' "$BZIMAGE" "$OUT"; }

if [[ $mode == build && $force == 0 && -f $OUT ]]; then
    emit
    exit 0
fi

# --------------------------------------------------------------------------
# Slow path helpers.
# --------------------------------------------------------------------------
source "$(dirname "${BASH_SOURCE[0]}")/apt.sh"
declare -A TOOL_PKG=(
    [apt-get]=apt [apt-cache]=apt [dpkg-deb]=dpkg [cpio]=cpio [gzip]=gzip [readelf]=binutils
    [sha256sum]=coreutils [flock]=util-linux [find]=findutils [touch]=coreutils [mktemp]=coreutils
)
ensure_tools() {
    local t missing=() pkgs=()
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found: this script needs a Debian-like host with apt"
    for t in "$@"; do
        command -v "$t" >/dev/null 2>&1 && continue
        missing+=("$t") pkgs+=("${TOOL_PKG[$t]:-$t}")
    done
    ((${#missing[@]} == 0)) && return 0
    can_root || die "missing tools: ${missing[*]}; install them with: apt-get install ${pkgs[*]}"
    log "installing missing tools (${missing[*]}): apt-get install ${pkgs[*]}"
    apt_retry as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${pkgs[@]}" ||
        die "could not install ${pkgs[*]}"
}
apt_dl_opts=(-q)
((EUID == 0)) && apt_dl_opts+=(-o APT::Sandbox::User=root)

prepare_cache() {
    local repo
    repo=$(realpath -e "$script_dir/../..") || die "cannot resolve the repository root"
    CACHE=$(realpath -m "$CACHE")
    case $CACHE/ in
    "$repo"/*) die "cache $CACHE is inside the repository $repo; set MVMM_CACHE to a directory outside it" ;;
    esac
    OUT_DIR=$CACHE/initramfs
    OUT=$OUT_DIR/initramfs-$KEY.cpio.gz
    mkdir -p "$OUT_DIR" "$CACHE/debs" || die "cannot create cache directory $CACHE"
    TMP=$(mktemp -d "$CACHE/tmp.XXXXXX")
    trap 'rm -rf "$TMP"' EXIT
}

deb_path() { # <pkg> <version> -> cached .deb path (apt's file name, epoch ':' as %3a)
    printf '%s/debs/%s_%s_amd64.deb\n' "$CACHE" "$1" "${2//:/%3a}"
}

# Download <pkg>=<version> into <dir>; prints the .deb's path.
download_deb() { # <pkg> <version> <dir>
    if ! apt-cache show "$1=$2" >/dev/null 2>&1; then
        log "apt does not know $1=$2; running apt-get update"
        apt_retry as_root apt-get update -q || die "apt-get update failed"
        apt-cache show "$1=$2" >/dev/null 2>&1 ||
            die "$1=$2 is not available from the configured apt sources; pin current versions with: $0 --update-pin"
    fi
    mkdir -p "$3"
    (cd "$3" && apt_retry apt-get "${apt_dl_opts[@]}" download "$1=$2") || die "apt-get download $1=$2 failed"
    local debs=("$3/$1"_*.deb)
    [[ ${#debs[@]} == 1 && -f ${debs[0]} ]] || die "apt-get download $1=$2 did not produce one .deb in $3"
    printf '%s\n' "${debs[0]}"
}

# --------------------------------------------------------------------------
# --update-pin
# --------------------------------------------------------------------------
if [[ $mode == update-pin ]]; then
    read_pin
    ensure_tools apt-get apt-cache sha256sum mktemp
    prepare_cache
    if can_root; then
        log "running apt-get update"
        apt_retry as_root apt-get update -q || die "apt-get update failed"
    fi
    new=$TMP/initramfs.pin
    sed -n '/^#/p' "$PIN_FILE" >"$new"
    for i in "${!PIN_PKGS[@]}"; do
        p=${PIN_PKGS[$i]}
        v=$(apt-cache policy "$p" | awk '$1 == "Candidate:" { print $2; exit }')
        [[ -n $v && $v != "(none)" ]] || die "apt-cache policy $p shows no candidate version"
        if [[ $v == "${PIN_VERS[$i]}" ]]; then
            s=${PIN_SUMS[$i]}
        else
            deb=$(download_deb "$p" "$v" "$TMP/dl")
            s=$(sha256_of "$deb")
            mv -f "$deb" "$(deb_path "$p" "$v")"
            log "$p: ${PIN_VERS[$i]} -> $v"
        fi
        printf '%s %s %s\n' "$p" "$v" "$s" >>"$new"
    done
    if cmp -s "$new" "$PIN_FILE"; then
        log "pin unchanged"
    else
        cp "$new" "$PIN_FILE.new" && mv -f "$PIN_FILE.new" "$PIN_FILE"
        log "rewrote $PIN_FILE; review with git diff"
    fi
    exit 0
fi

# --------------------------------------------------------------------------
# Build.
# --------------------------------------------------------------------------
read_pin
ensure_tools apt-get apt-cache dpkg-deb cpio gzip readelf sha256sum flock find touch mktemp
prepare_cache
exec 9>"$OUT_DIR/.lock"
flock -w 900 9 || die "timed out waiting for another build-initramfs.sh ($OUT_DIR/.lock)"
if [[ $force == 0 && -f $OUT ]]; then # someone else built it meanwhile
    emit
    exit 0
fi

# 1. The pinned packages, unpacked together into one sysroot (cached by pin).
pin_key=$(sha256_of "$PIN_FILE" | cut -c1-16)
SYSROOT=$OUT_DIR/sysroot-$pin_key
if [[ ! -f $SYSROOT/.complete ]]; then
    stage=$TMP/sysroot
    mkdir -p "$stage"
    for i in "${!PIN_PKGS[@]}"; do
        p=${PIN_PKGS[$i]} v=${PIN_VERS[$i]} s=${PIN_SUMS[$i]}
        deb=$(deb_path "$p" "$v")
        if [[ -f $deb ]] && [[ $(sha256_of "$deb") == "$s" ]]; then
            :
        else
            rm -f "$deb"
            log "downloading $p=$v"
            dl=$(download_deb "$p" "$v" "$TMP/dl-$p")
            actual=$(sha256_of "$dl")
            [[ $actual == "$s" ]] || die "SHA-256 mismatch for $p=$v
    expected (initramfs.pin): $s
    actual:                   $actual
  If Debian rebuilt/replaced the package, check it and update the pin
  ($0 --update-pin, or edit $PIN_FILE)."
            mv -f "$dl" "$deb"
        fi
        dpkg-deb -x "$deb" "$stage" || die "dpkg-deb -x $deb failed"
    done
    printf 'pin_sha256=%s\n' "$(sha256_of "$PIN_FILE")" >"$stage/.complete"
    rm -rf "$SYSROOT"
    mv "$stage" "$SYSROOT"
    log "unpacked ${#PIN_PKGS[@]} packages into $SYSROOT"
fi

# Path of <abs path> inside the sysroot with symlinks resolved (they may be
# absolute, i.e. relative to the sysroot); fails if it does not exist.
sys_resolve() { # <abs path>
    local p=$1 t n=0
    while [[ -L $SYSROOT$p ]]; do
        ((n++ < 40)) || return 1
        t=$(readlink "$SYSROOT$p")
        if [[ $t == /* ]]; then p=$t; else p=${p%/*}/$t; fi
    done
    [[ -f $SYSROOT$p ]] || return 1
    realpath -s "$SYSROOT$p"
}
elf_needed() { LC_ALL=C readelf -d "$1" | sed -n 's/.*(NEEDED).*\[\(.*\)\]$/\1/p'; }
elf_interp() { LC_ALL=C readelf -l "$1" | sed -n 's/.*\[Requesting program interpreter: \(.*\)\]$/\1/p'; }

ROOT=$TMP/root
mkdir -p "$ROOT"
(cd "$ROOT" && mkdir -p bin sbin usr/bin usr/sbin usr/local/sbin lib lib64 \
    "lib/x86_64-linux-gnu" etc proc sys dev tmp mnt run root tests)
chmod 1777 "$ROOT/tmp"

# 2. busybox and its applet links (absolute symlinks to /bin/busybox).
bb=$(sys_resolve /bin/busybox) || die "busybox-static has no /bin/busybox"
install -m 0755 "$bb" "$ROOT/bin/busybox"
napplets=0
while IFS= read -r a; do
    [[ -n $a && $a != bin/busybox ]] || continue
    [[ -e $ROOT/$a || -L $ROOT/$a ]] && continue
    [[ $a == */* ]] && mkdir -p "$ROOT/${a%/*}"
    ln -s /bin/busybox "$ROOT/$a"
    napplets=$((napplets + 1))
done < <("$ROOT/bin/busybox" --list-full | LC_ALL=C sort)
((napplets > 100)) || die "busybox --list-full listed only $napplets applets"

# 3. Debian tools and the shared libraries they need.
declare -A LIB_DONE=()
copy_libs_of() { # <elf file>
    local f=$1 so d src interp
    interp=$(elf_interp "$f")
    if [[ -n $interp && -z ${LIB_DONE[$interp]:-} ]]; then
        LIB_DONE[$interp]=1
        src=$(sys_resolve "$interp") || die "interpreter $interp of $f is not in the pinned packages"
        mkdir -p "$ROOT${interp%/*}"
        install -m 0755 "$src" "$ROOT$interp"
    fi
    while IFS= read -r so; do
        [[ -n ${LIB_DONE[$so]:-} ]] && continue
        LIB_DONE[$so]=1
        src=''
        for d in "${LIB_DIRS[@]}"; do
            src=$(sys_resolve "/$d/$so") && break
        done
        [[ -n $src ]] || die "$so (needed by ${f##*/}) is in none of the pinned packages; add its package to $PIN_FILE"
        [[ ${interp##*/} == "$so" ]] && continue # ld.so itself (already at its path)
        install -m 0644 "$src" "$ROOT/lib/x86_64-linux-gnu/$so"
        copy_libs_of "$src"
    done < <(elf_needed "$f")
}
for t in "${TOOLS[@]}"; do
    src=$(sys_resolve "/${t#*:}") || die "${t%%:*} has no /${t#*:}"
    dst=$ROOT/usr/local/sbin/${t##*/}
    install -m 0755 "$src" "$dst"
    copy_libs_of "$src"
done
for l in "${TOOL_LINKS[@]}"; do
    ln -s "${l#*:}" "$ROOT/usr/local/sbin/${l%%:*}"
done
for fl in "${DATA_FILES[@]}"; do
    src=$(sys_resolve "/${fl%%:*}") || die "/${fl%%:*} is in none of the pinned packages"
    install -D -m 0644 "$src" "$ROOT/${fl#*:}"
done

# 4. Kernel modules (fetch-kernel.sh extracted them and wrote modules.load).
mkdir -p "$ROOT/lib/modules"
cp -r "$MODDIR" "$ROOT/lib/modules/$KREL"
while IFS= read -r m; do
    [[ -f $ROOT/lib/modules/$KREL/$m ]] || die "modules.load names $m, which is missing"
done <"$ROOT/lib/modules/$KREL/modules.load"

# 5. /init, tests, a minimal /etc.
install -m 0755 "$INIT_SRC" "$ROOT/init"
for f in "${test_files[@]}"; do
    install -D -m 0755 "$script_dir/$f" "$ROOT/$f"
done
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$ROOT/etc/passwd"
printf 'root:x:0:\n' >"$ROOT/etc/group"
printf '127.0.0.1 localhost\n' >"$ROOT/etc/hosts"
printf '%s\n' "$KEY" >"$ROOT/etc/mvmm-initramfs"

# Smoke test the dynamic tools against the copied libraries where the host
# can run them (the host's own libraries are kept out of the way).
if [[ -x /usr/sbin/chroot || -x /sbin/chroot ]] && ((EUID == 0)); then
    for t in mke2fs e2fsck fstrim blkdiscard ethtool; do
        chroot "$ROOT" "/usr/local/sbin/$t" -V >/dev/null 2>&1 ||
            chroot "$ROOT" "/usr/local/sbin/$t" --version >/dev/null 2>&1 ||
            die "/usr/local/sbin/$t does not run inside the initramfs tree (missing library?)"
    done
fi

# 6. Deterministic archive: fixed mtimes and owners, sorted names, no hard
#    links, gzip without name/time. /dev/console is a character device node,
#    which an unprivileged build could not create on disk, so it is appended
#    as a second, hand-written newc archive (the kernel unpacks concatenated
#    archives).
find "$ROOT" -exec touch -h -d @0 {} +
newc_entry() { # <name> <mode (octal)> <rdevmajor> <rdevminor> <ino>
    local name=$1 namesize=$((${#1} + 1)) pad
    printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
        "$5" "$((8#$2))" 0 0 1 0 0 0 0 "$3" "$4" "$namesize" 0
    printf '%s\0' "$name"
    pad=$(((4 - (110 + namesize) % 4) % 4))
    ((pad)) && head -c "$pad" /dev/zero
    return 0
}
img=$TMP/initramfs.cpio.gz
{
    (cd "$ROOT" && find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort |
        cpio -o -H newc -R 0:0 --reproducible --quiet) || exit 1
    newc_entry dev/console 020600 5 1 999999
    newc_entry 'TRAILER!!!' 0 0 0 0
} | gzip -n -9 >"$img" || die "creating the cpio archive failed"
(cd "$ROOT" && find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort) >"$TMP/list"
mv -f "$TMP/list" "$OUT_DIR/initramfs-$KEY.txt"
mv -f "$img" "$OUT"

# Keep only the newest few images.
mapfile -t old < <(ls -1t "$OUT_DIR"/initramfs-*.cpio.gz 2>/dev/null | tail -n +$((OUT_KEEP + 1)))
for f in "${old[@]}"; do rm -f "$f" "${f%.cpio.gz}.txt"; done
for d in "$OUT_DIR"/sysroot-*; do
    [[ -d $d && $d != "$SYSROOT" ]] && rm -rf "$d"
done

log "built $OUT ($(stat -c %s "$OUT") bytes, $(wc -l <"$OUT_DIR/initramfs-$KEY.txt") files, kernel $KREL)"
emit
