#!/usr/bin/env bash
# fetch-kernel.sh - fetch the pinned Debian cloud kernel for mvmm's real-kernel check.
#
# Downloads the kernel package named in kernel.pin (next to this script) with
# apt, checks its SHA-256 against the pin, unpacks /boot from it into a cache
# outside the repository and derives an uncompressed ELF vmlinux (the PVH entry
# point lives in its notes) from the bzImage. It also extracts the few kernel
# modules the guest test kit needs (virtio transports and drivers, fuse/
# virtiofs, vsock; see GUEST_MODULES below) plus their dependencies, and
# writes their load order to modules.load.
#
# Usage:
#   fetch-kernel.sh                 fetch/verify; stdout is three lines:
#                                   MODULES=<dir>, BZIMAGE=<path> and
#                                   VMLINUX=<path> (the last two are always
#                                   the last two lines)
#   fetch-kernel.sh --verify        same, but re-hash cached files even if the
#                                   stamp says they are complete
#   fetch-kernel.sh --print-version print the pinned package version
#   fetch-kernel.sh --update-pin    pin the newest linux-image-<flavour> that
#                                   apt knows about (rewrites kernel.pin)
#
# Environment:
#   MVMM_CACHE               cache root (default: $HOME/.cache/mvmm)
#   MVMM_APT_LOCK_TIMEOUT    seconds to keep retrying while apt/dpkg locks are
#                            held by someone else (default: 120)
#
# Only BZIMAGE=/VMLINUX= lines (or the version) go to stdout; everything else
# goes to stderr. A complete cache is detected from a stamp file, so repeated
# runs do not touch apt or the network.
set -euo pipefail

readonly LZ4_LEGACY_MAGIC=02214c18

# Kernel modules for the guest test kit (resources/guest/build-initramfs.sh),
# by module name. Modules they depend on (the depends= field of .modinfo) are
# added automatically. A name that the kernel has built in (modules.builtin)
# is skipped; any other missing name is an error.
GUEST_MODULES=(
    virtio_ring virtio virtio_mmio
    virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
    virtio_blk
    failover net_failover virtio_net
    fuse virtiofs
    vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport
)
# CONFIG_<symbol>:<module> pairs, extracted only if the kernel config has
# CONFIG_<symbol>=m: ext4 (its jbd2/mbcache/crc16 come in as dependencies),
# the crc32c that ext4 asks the crypto API for at mount time (not a modinfo
# dependency), AF_PACKET. Debian's cloud kernel builds them all in; the list
# keeps a future pin from silently losing them.
GUEST_MODULES_IF_MODULAR=(EXT4_FS:ext4 CRYPTO_CRC32C:crc32c_generic PACKET:af_packet)
# Recorded in the stamp: changing either list rebuilds the cache entry.
MODULES_SPEC="${GUEST_MODULES[*]} ${GUEST_MODULES_IF_MODULAR[*]}"
MODULES_SPEC=${MODULES_SPEC// /,}

log() { printf 'fetch-kernel: %s\n' "$*" >&2; }
die() {
    printf 'fetch-kernel: error: %s\n' "$*" >&2
    exit 1
}

usage() { # to stderr unless told otherwise
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}" >&"${1:-2}"
}

script_dir=${BASH_SOURCE[0]%/*}
[[ $script_dir == "${BASH_SOURCE[0]}" ]] && script_dir=.
PIN_FILE=$script_dir/kernel.pin

# --------------------------------------------------------------------------
# Pin file: KEY=VALUE lines, comments and blank lines ignored. Parsed, never
# sourced.
# --------------------------------------------------------------------------
KERNEL_ABI='' KERNEL_FLAVOUR='' KERNEL_VERSION='' KERNEL_DEB_SHA256=''
read_pin() {
    [[ -r $PIN_FILE ]] || die "pin file $PIN_FILE not found"
    local line key val n=0
    while IFS= read -r line || [[ -n $line ]]; do
        n=$((n + 1))
        line=${line%%#*}
        line=${line//[[:space:]]/}
        [[ -z $line ]] && continue
        [[ $line == *=* ]] || die "$PIN_FILE:$n: expected KEY=VALUE"
        key=${line%%=*} val=${line#*=}
        case $key in
        KERNEL_ABI | KERNEL_FLAVOUR | KERNEL_VERSION | KERNEL_DEB_SHA256)
            printf -v "$key" '%s' "$val"
            ;;
        *) die "$PIN_FILE:$n: unknown key '$key'" ;;
        esac
    done <"$PIN_FILE"
    [[ $KERNEL_ABI =~ ^[0-9]+\.[0-9]+\.[0-9]+-[0-9]+$ ]] ||
        die "$PIN_FILE: KERNEL_ABI '$KERNEL_ABI' is not like 6.1.0-56"
    [[ $KERNEL_FLAVOUR =~ ^[a-z0-9][a-z0-9-]*$ ]] ||
        die "$PIN_FILE: KERNEL_FLAVOUR '$KERNEL_FLAVOUR' is invalid"
    [[ $KERNEL_VERSION =~ ^[0-9][A-Za-z0-9.+~-]*$ ]] ||
        die "$PIN_FILE: KERNEL_VERSION '$KERNEL_VERSION' is invalid"
    [[ $KERNEL_DEB_SHA256 =~ ^[0-9a-f]{64}$ ]] ||
        die "$PIN_FILE: KERNEL_DEB_SHA256 must be 64 lowercase hex digits"
}

mode=fetch
verify=0
while (($#)); do
    case $1 in
    --print-version) mode=print-version ;;
    --update-pin) mode=update-pin ;;
    --verify) verify=1 ;;
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

if [[ $mode == print-version ]]; then
    read_pin
    printf '%s\n' "$KERNEL_VERSION"
    exit 0
fi

if [[ -n ${MVMM_CACHE:-} ]]; then
    CACHE=$MVMM_CACHE
else
    [[ -n ${HOME:-} ]] || die "neither MVMM_CACHE nor HOME is set"
    CACHE=$HOME/.cache/mvmm
fi
[[ $CACHE == /* ]] || CACHE=$PWD/$CACHE

# --------------------------------------------------------------------------
# Fast path: a complete, stamped cache for the pinned version. Only builtins
# and one stat(1) call, no apt, no hashing (unless --verify).
# --------------------------------------------------------------------------
set_paths() {
    KREL=$KERNEL_ABI-$KERNEL_FLAVOUR
    PKG=linux-image-$KREL
    KDIR=$CACHE/kernel/$KREL
    BZIMAGE=$KDIR/bzImage
    VMLINUX=$KDIR/vmlinux
    MODDIR=$KDIR/modules/lib/modules/$KREL
    STAMP=$KDIR/.complete
}

# Hash over the extracted module tree (relative path + content of every
# file), for the stamp and --verify.
modules_hash() { # <modules root containing lib/>
    (cd "$1" && find lib -type f -print0 | LC_ALL=C sort -z | xargs -0r sha256sum) |
        sha256sum | cut -d' ' -f1
}

cache_ok() { # [--verify]
    [[ -f $STAMP && -f $BZIMAGE && -f $VMLINUX && -f $MODDIR/modules.load ]] || return 1
    local -A st=()
    local k v
    while IFS='=' read -r k v; do
        [[ -n $k && $k != \#* ]] && st[$k]=$v
    done <"$STAMP" || return 1
    [[ ${st[version]:-} == "$KERNEL_VERSION" && ${st[deb_sha256]:-} == "$KERNEL_DEB_SHA256" ]] ||
        return 1
    [[ ${st[modules_spec]:-} == "$MODULES_SPEC" ]] || return 1
    local sizes
    sizes=$(stat -Lc %s "$BZIMAGE" "$VMLINUX" 2>/dev/null) || return 1
    [[ $sizes == "${st[bzimage_size]:-}"$'\n'"${st[vmlinux_size]:-}" ]] || return 1
    if [[ ${1:-} == --verify ]]; then
        local sums
        sums=$(sha256sum "$BZIMAGE" "$VMLINUX" | cut -d' ' -f1) || return 1
        [[ $sums == "${st[bzimage_sha256]:-}"$'\n'"${st[vmlinux_sha256]:-}" ]] || return 1
        [[ $(modules_hash "$KDIR/modules") == "${st[modules_sha256]:-}" ]] || return 1
    fi
    return 0
}

emit_paths() {
    printf 'MODULES=%s\nBZIMAGE=%s\nVMLINUX=%s\n' "$MODDIR" "$BZIMAGE" "$VMLINUX"
}

if [[ $mode == fetch ]]; then
    read_pin
    set_paths
    if ((verify == 0)) && cache_ok; then
        emit_paths
        exit 0
    fi
fi

# --------------------------------------------------------------------------
# Slow path helpers.
# --------------------------------------------------------------------------
source "$(dirname "${BASH_SOURCE[0]}")/apt.sh"

# tool -> Debian package providing it
declare -A TOOL_PKG=(
    [apt-cache]=apt [dpkg-deb]=dpkg [lz4]=lz4 [readelf]=binutils [sha256sum]=coreutils
    [od]=coreutils [dd]=coreutils [stat]=coreutils [flock]=util-linux
    [tar]=tar [grep]=grep [awk]=mawk [mktemp]=coreutils
)
ensure_tools() { # <tool>...
    local t missing=() pkgs=()
    command -v apt-get >/dev/null 2>&1 ||
        die "apt-get not found: this script needs a Debian-like host with apt (missing: apt)"
    for t in "$@"; do
        command -v "$t" >/dev/null 2>&1 && continue
        missing+=("$t")
        pkgs+=("${TOOL_PKG[$t]:-$t}")
    done
    ((${#missing[@]} == 0)) && return 0
    log "installing missing tools (${missing[*]}): apt-get install ${pkgs[*]}"
    if ! can_root; then
        die "missing tools: ${missing[*]}; install them with: apt-get install ${pkgs[*]}"
    fi
    apt_retry as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${pkgs[@]}" ||
        die "could not install ${pkgs[*]}; install them manually: apt-get install ${pkgs[*]}"
    for t in "${missing[@]}"; do
        command -v "$t" >/dev/null 2>&1 || die "'$t' still missing after installing ${TOOL_PKG[$t]:-$t}"
    done
}

apt_dl_opts=(-q)
# apt normally drops privileges to _apt for downloads; a cache under /root is
# not reachable by _apt, so apt would fall back to root with a warning anyway.
((EUID == 0)) && apt_dl_opts+=(-o APT::Sandbox::User=root)

# Make sure apt's lists know <pkg>=<version>; run apt-get update once if not.
ensure_known() { # <pkg> <version>
    apt-cache show "$1=$2" >/dev/null 2>&1 && return 0
    log "apt does not know $1=$2; running apt-get update"
    apt_retry as_root apt-get update -q || die "apt-get update failed"
    apt-cache show "$1=$2" >/dev/null 2>&1 ||
        die "$1=$2 is not available from the configured apt sources (Debian drops superseded kernels); pick a current one with: $0 --update-pin"
}

# Download <pkg>=<version> into directory <dir>; prints the .deb path.
download_deb() { # <pkg> <version> <dir>
    (cd "$3" && apt_retry apt-get "${apt_dl_opts[@]}" download "$1=$2") ||
        die "apt-get download $1=$2 failed"
    local debs=("$3"/*.deb)
    [[ ${#debs[@]} == 1 && -f ${debs[0]} ]] || die "apt-get download did not produce exactly one .deb in $3"
    printf '%s\n' "${debs[0]}"
}

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

# Unsigned little-endian integer of <bytes> bytes at <offset> in <file>.
le_uint() { # <file> <offset> <bytes>
    local v
    v=$(od -An --endian=little -tu"$3" -j "$2" -N"$3" "$1") || return 1
    v=${v//[[:space:]]/}
    [[ $v =~ ^[0-9]+$ ]] || return 1
    printf '%s' "$v"
}
hex_at() { # <file> <offset> <bytes>
    local v
    v=$(od -An -tx1 -j "$2" -N"$3" "$1") || return 1
    printf '%s' "${v//[[:space:]]/}"
}

# Locate the compressed payload in a bzImage. Prints "<offset> <length> <size>":
# byte offset of the LZ4 stream, number of compressed bytes, and the expected
# uncompressed size (0 if unknown).
locate_payload() { # <bzImage>
    local bz=$1 fsize
    fsize=$(stat -Lc %s "$bz")
    if [[ $(hex_at "$bz" $((0x202)) 4) == 48647253 ]]; then # "HdrS"
        # Boot protocol >= 2.08 setup header: setup_sects at 0x1f1,
        # payload_offset/payload_length at 0x248/0x24c (relative to the
        # protected-mode code, which follows the (setup_sects + 1) sectors).
        local setup_sects pm off len
        setup_sects=$(le_uint "$bz" $((0x1f1)) 1)
        ((setup_sects == 0)) && setup_sects=4
        pm=$(((setup_sects + 1) * 512))
        off=$(le_uint "$bz" $((0x248)) 4)
        len=$(le_uint "$bz" $((0x24c)) 4)
        off=$((pm + off))
        if ((len > 8 && off + len <= fsize)) &&
            [[ $(hex_at "$bz" "$off" 4) == "$LZ4_LEGACY_MAGIC" ]]; then
            # The kernel build appends the uncompressed size (le32) to the
            # compressed stream; it is not part of the LZ4 data.
            printf '%s %s %s\n' "$off" $((len - 4)) "$(le_uint "$bz" $((off + len - 4)) 4)"
            return 0
        fi
        log "setup header does not point at an LZ4 payload; searching for the LZ4 magic instead"
    else
        log "no boot-protocol setup header found; searching for the LZ4 magic instead"
    fi
    local hit
    hit=$(LC_ALL=C grep -obUaP '\x02\x21\x4c\x18' "$bz" | head -n1) || true
    [[ -n $hit ]] || die "$bz: no LZ4 legacy frame (02 21 4c 18) found; is this kernel LZ4-compressed?"
    hit=${hit%%:*}
    printf '%s %s 0\n' "$hit" $((fsize - hit))
}

# Check that <file> is an ELF64 x86-64 executable with a Xen PVH entry note
# (type 0x12, XEN_ELFNOTE_PHYS32_ENTRY). Prints the PVH entry address.
check_vmlinux() { # <file>
    local f=$1 hdr notes entry
    hdr=$(LC_ALL=C readelf -h "$f" 2>/dev/null) || {
        log "$f is not an ELF file"
        return 1
    }
    grep -q 'Class:[[:space:]]*ELF64' <<<"$hdr" || { log "$f: not ELF64"; return 1; }
    grep -q 'Machine:[[:space:]]*Advanced Micro Devices X86-64' <<<"$hdr" || { log "$f: not x86-64"; return 1; }
    grep -q 'Type:[[:space:]]*EXEC' <<<"$hdr" || { log "$f: not an executable (ET_EXEC)"; return 1; }
    notes=$(LC_ALL=C readelf -n "$f" 2>/dev/null) || { log "$f: readelf -n failed"; return 1; }
    entry=$(awk '
        want && /description data:/ {
            sub(/.*description data:[[:space:]]*/, "")
            n = split($0, b, /[[:space:]]+/); v = ""
            for (i = n; i >= 1; i--) v = v b[i]
            sub(/^0+/, "", v); print "0x" (v == "" ? "0" : v); exit
        }
        $1 == "Xen" && ($0 ~ /\(0x0*12\)/ || $0 ~ /PHYS32/) { want = 1 }
    ' <<<"$notes")
    [[ -n $entry ]] || { log "$f: no Xen PHYS32_ENTRY (0x12) note, kernel lacks PVH support"; return 1; }
    printf '%s\n' "$entry"
}

prepare_cache() {
    # Refuse a cache inside the repository before creating anything.
    local repo
    repo=$(realpath -e "$script_dir/../..") || die "cannot resolve the repository root"
    CACHE=$(realpath -m "$CACHE") || die "cannot resolve cache path $CACHE"
    case $CACHE/ in
    "$repo"/*) die "cache $CACHE is inside the repository $repo; set MVMM_CACHE to a directory outside it" ;;
    esac
    mkdir -p "$CACHE/kernel" "$CACHE/debs" || die "cannot create cache directory $CACHE"
    TMP=$(mktemp -d "$CACHE/tmp.XXXXXX")
    trap 'rm -rf "$TMP"' EXIT
}

sha_mismatch() { # <what> <expected> <actual>
    die "SHA-256 mismatch for $1
    expected (kernel.pin): $2
    actual:                $3
  If Debian rebuilt/replaced the package or you meant to change the kernel,
  update the pin: run '$0 --update-pin' (or edit KERNEL_DEB_SHA256 in $PIN_FILE)
  after checking the new package is genuine, then commit kernel.pin."
}

# --------------------------------------------------------------------------
# --update-pin
# --------------------------------------------------------------------------
if [[ $mode == update-pin ]]; then
    read_pin
    ensure_tools apt-cache sha256sum mktemp
    prepare_cache
    if can_root; then
        log "running apt-get update"
        apt_retry as_root apt-get update -q || die "apt-get update failed"
    else
        log "not root: using apt's current package lists without apt-get update"
    fi
    meta=linux-image-$KERNEL_FLAVOUR
    pkg=$(apt-cache depends "$meta" 2>/dev/null |
        awk -v f="$KERNEL_FLAVOUR" '$1 == "Depends:" && $2 ~ ("^linux-image-[0-9.]+-[0-9]+-" f "$") { print $2; exit }')
    [[ -n $pkg ]] || die "apt-cache depends $meta names no linux-image-<abi>-$KERNEL_FLAVOUR package"
    abi=${pkg#linux-image-}
    abi=${abi%-"$KERNEL_FLAVOUR"}
    ver=$(apt-cache policy "$pkg" | awk '$1 == "Candidate:" { print $2; exit }')
    [[ -n $ver && $ver != "(none)" ]] || die "apt-cache policy $pkg shows no candidate version"
    log "newest: $pkg $ver; downloading to compute its SHA-256"
    mkdir "$TMP/dl"
    deb=$(download_deb "$pkg" "$ver" "$TMP/dl")
    sum=$(sha256_of "$deb")
    mv -f "$deb" "$CACHE/debs/${pkg}_${ver}.deb"
    newpin=$TMP/kernel.pin
    {
        sed -n '/^#/p' "$PIN_FILE"
        printf 'KERNEL_ABI=%s\nKERNEL_FLAVOUR=%s\nKERNEL_VERSION=%s\nKERNEL_DEB_SHA256=%s\n' \
            "$abi" "$KERNEL_FLAVOUR" "$ver" "$sum"
    } >"$newpin"
    if cmp -s "$newpin" "$PIN_FILE"; then
        log "pin unchanged: $pkg $ver"
    else
        cp "$newpin" "$PIN_FILE.new" && mv -f "$PIN_FILE.new" "$PIN_FILE"
        log "pinned $pkg $ver (was linux-image-$KERNEL_ABI-$KERNEL_FLAVOUR $KERNEL_VERSION)"
        log "sha256 $sum"
    fi
    exit 0
fi

# --------------------------------------------------------------------------
# Slow path: (re)build the cache entry under a lock.
# --------------------------------------------------------------------------
ensure_tools apt-cache dpkg-deb tar lz4 readelf sha256sum od dd stat flock grep awk mktemp
prepare_cache
set_paths

exec 9>"$CACHE/kernel/.lock"
flock -w 900 9 || die "timed out waiting for another fetch-kernel.sh ($CACHE/kernel/.lock)"
if [[ $verify == 0 ]] && cache_ok; then # someone else finished it meanwhile
    emit_paths
    exit 0
fi
if [[ $verify == 1 ]] && [[ -f $STAMP ]] && cache_ok --verify; then
    log "cache verified: $KDIR"
    emit_paths
    exit 0
fi

# 1. The .deb: reuse a cached copy if its checksum still matches the pin.
DEB=$CACHE/debs/${PKG}_${KERNEL_VERSION}.deb
if [[ -f $DEB ]] && [[ $(sha256_of "$DEB") == "$KERNEL_DEB_SHA256" ]]; then
    log "using cached $DEB"
else
    rm -f "$DEB"
    ensure_known "$PKG" "$KERNEL_VERSION"
    log "downloading $PKG=$KERNEL_VERSION"
    mkdir "$TMP/dl"
    dl=$(download_deb "$PKG" "$KERNEL_VERSION" "$TMP/dl")
    actual=$(sha256_of "$dl")
    [[ $actual == "$KERNEL_DEB_SHA256" ]] || sha_mismatch "$(basename "$dl")" "$KERNEL_DEB_SHA256" "$actual"
    mv -f "$dl" "$DEB"
fi

# 2. Unpack /boot and the guest test kit's modules (not the other ~100 MB of
#    modules).
stage=$TMP/stage
mkdir -p "$stage"
log "listing $(basename "$DEB")"
members=$TMP/members
dpkg-deb --fsys-tarfile "$DEB" | tar -t >"$members" || die "could not list the contents of $DEB"
moddir_rel=./lib/modules/$KREL
extra=()
grep -qxF "$moddir_rel/modules.builtin" "$members" && extra+=("$moddir_rel/modules.builtin")
log "unpacking /boot from $(basename "$DEB")"
dpkg-deb --fsys-tarfile "$DEB" | tar -x -C "$stage" ./boot "${extra[@]}" ||
    die "could not unpack ./boot from $DEB"
vmlinuz=$stage/boot/vmlinuz-$KREL
[[ -f $vmlinuz ]] || die "$DEB contains no boot/vmlinuz-$KREL"
ln "$vmlinuz" "$stage/bzImage" 2>/dev/null || cp "$vmlinuz" "$stage/bzImage"

# Module name (as modinfo/lsmod spell it) -> member path in the package.
declare -A MOD_PATH=()
while IFS= read -r m; do
    n=${m##*/}
    n=${n%.ko}
    MOD_PATH[${n//-/_}]=$m
done < <(grep -E "^${moddir_rel//./\.}/kernel/.*\.ko$" "$members")
((${#MOD_PATH[@]} > 0)) || {
    grep -qE "^${moddir_rel//./\.}/kernel/.*\.ko\.(xz|zst|gz)$" "$members" &&
        die "$DEB has compressed kernel modules; the guest test kit only handles plain .ko files"
    die "$DEB contains no kernel modules under $moddir_rel/kernel"
}
declare -A MOD_BUILTIN=()
if [[ -f $stage/lib/modules/$KREL/modules.builtin ]]; then
    while IFS= read -r m; do
        n=${m##*/}
        n=${n%.ko}
        MOD_BUILTIN[${n//-/_}]=1
    done <"$stage/lib/modules/$KREL/modules.builtin"
fi
kconfig=$stage/boot/config-$KREL
[[ -f $kconfig ]] || die "$DEB contains no boot/config-$KREL"

# The .modinfo strings of a module file, one per line.
modinfo_of() { # <file>
    LC_ALL=C readelf -p .modinfo "$1" 2>/dev/null | sed -n 's/^ *\[ *[0-9a-f]*\] *//p'
}

want=("${GUEST_MODULES[@]}")
for pair in "${GUEST_MODULES_IF_MODULAR[@]}"; do
    sym=${pair%%:*} mod=${pair#*:}
    if grep -qx "CONFIG_$sym=m" "$kconfig"; then
        want+=("$mod")
    else
        log "CONFIG_$sym is not modular ($(grep -E "^(# )?CONFIG_${sym}[= ]" "$kconfig" || echo unset)); no $mod module needed"
    fi
done
declare -A MOD_DEPS=() # name -> space-separated dependencies
mod_names=()           # extracted modules, in the order first needed
modroot=$stage/modules
mkdir -p "$modroot"
while ((${#want[@]})); do
    batch=() new=()
    for n in "${want[@]}"; do
        n=${n//-/_}
        [[ -n ${MOD_DEPS[$n]+x} ]] && continue
        if [[ -z ${MOD_PATH[$n]:-} ]]; then
            [[ -n ${MOD_BUILTIN[$n]:-} ]] && { log "module $n is built into the kernel"; continue; }
            die "$DEB has no module '$n' (not in $moddir_rel/kernel, not in modules.builtin)"
        fi
        MOD_DEPS[$n]=''
        batch+=("${MOD_PATH[$n]}")
        new+=("$n")
    done
    ((${#batch[@]})) || break
    log "extracting modules: ${new[*]}"
    dpkg-deb --fsys-tarfile "$DEB" | tar -x -C "$modroot" "${batch[@]}" ||
        die "could not unpack modules from $DEB"
    want=()
    for n in "${new[@]}"; do
        f=$modroot/${MOD_PATH[$n]#./}
        info=$(modinfo_of "$f")
        vermagic=$(sed -n 's/^vermagic=//p' <<<"$info")
        [[ $vermagic == "$KREL "* ]] || die "$f: vermagic '$vermagic' does not match $KREL"
        deps=$(sed -n 's/^depends=//p' <<<"$info")
        deps=${deps//,/ }
        MOD_DEPS[$n]=$deps
        mod_names+=("$n")
        # shellcheck disable=SC2206 # word splitting wanted
        want+=($deps)
    done
done

# Dependency order (dependencies first), ties in the order of GUEST_MODULES.
declare -A MOD_STATE=()
mod_order=()
visit_mod() { # <name> [chain]
    local n=$1 d
    case ${MOD_STATE[$n]:-} in
    "done") return 0 ;;
    active) die "module dependency cycle: $2 $n" ;;
    esac
    MOD_STATE[$n]=active
    for d in ${MOD_DEPS[$n]}; do
        d=${d//-/_}
        [[ -n ${MOD_DEPS[$d]+x} ]] || continue # built in
        visit_mod "$d" "${2:-} $n"
    done
    MOD_STATE[$n]="done"
    mod_order+=("$n")
}
for n in "${mod_names[@]}"; do visit_mod "$n"; done
for n in "${mod_order[@]}"; do
    printf '%s\n' "${MOD_PATH[$n]#"$moddir_rel"/}"
done >"$modroot/lib/modules/$KREL/modules.load"
[[ -f $stage/lib/modules/$KREL/modules.builtin ]] &&
    cp "$stage/lib/modules/$KREL/modules.builtin" "$modroot/lib/modules/$KREL/"
rm -rf "${stage:?}/lib"
log "modules (load order): ${mod_order[*]}"

# 3. vmlinux = LZ4-decompressed bzImage payload.
payload=$(locate_payload "$stage/bzImage")
read -r p_off p_len p_size <<<"$payload"
log "decompressing LZ4 payload (offset $p_off, $p_len bytes)"
lz4_rc=0
dd if="$stage/bzImage" iflag=skip_bytes,count_bytes skip="$p_off" count="$p_len" bs=1M status=none |
    lz4 -dc >"$stage/vmlinux" 2>"$TMP/lz4.err" || lz4_rc=$?
if ((p_size != 0)) && [[ $(stat -c %s "$stage/vmlinux") != "$p_size" ]]; then
    cat "$TMP/lz4.err" >&2
    die "decompressed vmlinux is $(stat -c %s "$stage/vmlinux") bytes, the bzImage says $p_size"
fi
if ! pvh_entry=$(check_vmlinux "$stage/vmlinux"); then
    cat "$TMP/lz4.err" >&2
    die "the payload extracted from $vmlinuz is not a usable PVH vmlinux"
fi
# Without an exact length lz4 runs into the bytes after the stream and may
# complain even though the output is complete; the checks above decide.
((lz4_rc == 0)) || log "note: lz4 exited with $lz4_rc but the output is a valid vmlinux"

# 4. Stamp (written last, lands atomically with the directory rename).
bz_size=$(stat -c %s "$stage/bzImage")
vm_size=$(stat -c %s "$stage/vmlinux")
{
    printf '# written by fetch-kernel.sh; delete to force a rebuild\n'
    printf 'package=%s\nversion=%s\ndeb_sha256=%s\n' "$PKG" "$KERNEL_VERSION" "$KERNEL_DEB_SHA256"
    printf 'bzimage_size=%s\nbzimage_sha256=%s\n' "$bz_size" "$(sha256_of "$stage/bzImage")"
    printf 'vmlinux_size=%s\nvmlinux_sha256=%s\n' "$vm_size" "$(sha256_of "$stage/vmlinux")"
    printf 'pvh_entry=%s\n' "$pvh_entry"
    printf 'modules_spec=%s\nmodules=%s\nmodules_sha256=%s\n' "$MODULES_SPEC" \
        "${mod_order[*]}" "$(modules_hash "$modroot")"
} >"$stage/.complete"

rm -rf "$KDIR"
mv "$stage" "$KDIR"
cache_ok || die "internal error: freshly built cache at $KDIR does not verify"
log "kernel $KREL ($KERNEL_VERSION): bzImage $bz_size bytes, vmlinux $vm_size bytes, PVH entry $pvh_entry, ${#mod_order[@]} modules"
emit_paths
