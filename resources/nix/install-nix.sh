#!/usr/bin/env bash
# install-nix.sh - make sure nix-instantiate (Debian's nix-bin) is installed, for the
# evaluation tests of the microvm.nix runner in resources/nix/ (tests/packaging_nix.rs).
#
# If nix-instantiate already works, nothing is done. Otherwise `apt-get install nix-bin`
# (as root, or through password-less sudo), retrying while another process holds the apt/dpkg
# lock and running `apt-get update` once if the package is not found. The tests evaluate
# self-contained expressions with `--store dummy://`: no daemon, no nixpkgs, no network.
#
# Usage:
#   install-nix.sh        last stdout line: NIX_INSTANTIATE=<absolute path>
#
# Environment:
#   MVMM_APT_LOCK_TIMEOUT    seconds to keep retrying while apt/dpkg locks are held by
#                            someone else (default: 300)
#
# Only the NIX_INSTANTIATE= line goes to stdout; progress and errors go to stderr.
set -euo pipefail

log() { printf 'install-nix: %s\n' "$*" >&2; }
die() {
    printf 'install-nix: error: %s\n' "$*" >&2
    exit 1
}

case ${1:-} in
'') ;;
-h | --help)
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
    exit 0
    ;;
*) die "unknown argument '$1' (try --help)" ;;
esac

found() {
    local path
    path=$(command -v nix-instantiate 2>/dev/null) || return 1
    "$path" --version >/dev/null 2>&1 || return 1
    printf '%s\n' "$path"
}

if path=$(found); then
    printf 'NIX_INSTANTIATE=%s\n' "$path"
    exit 0
fi

# A fresh machine's first apt run can wait long for unattended upgrades: 300 s here.
export MVMM_APT_LOCK_TIMEOUT=${MVMM_APT_LOCK_TIMEOUT:-300}
source "$(dirname "${BASH_SOURCE[0]}")/../guest/apt.sh"

command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install Nix (nix-instantiate) yourself"
install() { as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q nix-bin; }
log "installing nix-bin with apt-get"
if ! apt_retry install; then
    log "apt-get install failed; running apt-get update and trying again"
    apt_retry as_root apt-get update -q || die "apt-get update failed"
    apt_retry install || die "apt-get install nix-bin failed"
fi

path=$(found) || die "nix-bin was installed but 'nix-instantiate --version' does not work"
log "installed $("$path" --version)"
printf 'NIX_INSTANTIATE=%s\n' "$path"
