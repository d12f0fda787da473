#!/usr/bin/env bash
# verify-blk-image.sh - host-side check of a disk image after the guest's blk
# test (tests/blk.sh) wrote to it.
#
# Usage: verify-blk-image.sh IMG
#
# Runs `e2fsck -fn IMG` (read-only, forced) and compares the files in the
# image with the SHA-256 list the guest left in /MANIFEST, reading them with
# debugfs (no mount, no root needed). Prints one line per check,
#   RESULT host-blk-fsck PASS|FAIL <detail>
#   RESULT host-blk-manifest PASS|FAIL <detail>
# and exits non-zero if a check failed. Needs e2fsprogs on the host.
set -euo pipefail

img=${1:?usage: verify-blk-image.sh IMG}
[[ -f $img || -b $img ]] || { echo "verify-blk-image: $img not found" >&2; exit 2; }
for t in e2fsck debugfs sha256sum; do
    command -v "$t" >/dev/null || { echo "verify-blk-image: $t missing (apt-get install e2fsprogs coreutils)" >&2; exit 2; }
done

fail=0
if out=$(e2fsck -fn "$img" 2>&1); then
    echo "RESULT host-blk-fsck PASS $(tail -n1 <<<"$out")"
else
    echo "RESULT host-blk-fsck FAIL rc=$? $(tail -n3 <<<"$out" | tr '\n' ' ')"
    fail=1
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/verify-blk.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
debugfs -R "dump /MANIFEST $tmp/MANIFEST" "$img" 2>/dev/null
if [[ ! -s $tmp/MANIFEST ]]; then
    echo "RESULT host-blk-manifest FAIL no /MANIFEST in $img"
    exit 1
fi
# Every directory named in the manifest, dumped recursively.
mapfile -t dirs < <(awk '{ p = $2; sub(/\/[^\/]*$/, "", p); print p }' "$tmp/MANIFEST" | sort -u)
for d in "${dirs[@]}"; do
    mkdir -p "$tmp/fs/$(dirname "$d")"
    debugfs -R "rdump /$d $tmp/fs/$(dirname "$d")" "$img" 2>/dev/null
done
n=$(wc -l <"$tmp/MANIFEST")
if out=$(cd "$tmp/fs" && sha256sum -c --quiet "$tmp/MANIFEST" 2>&1); then
    echo "RESULT host-blk-manifest PASS $n files match /MANIFEST (sha256=$(sha256sum <"$tmp/MANIFEST" | cut -d' ' -f1))"
else
    echo "RESULT host-blk-manifest FAIL $(head -n3 <<<"$out" | tr '\n' ' ')"
    fail=1
fi
exit $fail
