#!/usr/bin/env bash
# Runs every test of mvmm on a fresh machine: installs what the tests need (idempotently),
# then formatting, lints, unit tests and the integration tests against the real binary.
# Needs root (it installs packages and the tests open /dev/kvm).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '== %s\n' "$*" >&2; }

# Host packages the build and tests use. Each is checked first so a prepared machine does no
# apt work at all.
need_pkgs=()
command -v gcc >/dev/null || need_pkgs+=(gcc)
command -v objcopy >/dev/null || need_pkgs+=(binutils)
command -v iasl >/dev/null || need_pkgs+=(acpica-tools)
command -v lz4 >/dev/null || need_pkgs+=(lz4)
command -v dpkg-deb >/dev/null || need_pkgs+=(dpkg)
command -v ip >/dev/null || need_pkgs+=(iproute2)
command -v qemu-system-x86_64 >/dev/null || need_pkgs+=(qemu-system-x86)
command -v qemu-storage-daemon >/dev/null || need_pkgs+=(qemu-system-common)
[[ -x /usr/sbin/e2fsck && -x /usr/sbin/debugfs ]] || need_pkgs+=(e2fsprogs)
command -v nix-instantiate >/dev/null || need_pkgs+=(nix-bin)
command -v systemd-analyze >/dev/null || need_pkgs+=(systemd)
if ((${#need_pkgs[@]})); then
    log "installing ${need_pkgs[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

if [[ ! -r /dev/kvm || ! -w /dev/kvm ]]; then
    echo "error: /dev/kvm is not usable by $(id -un); the integration tests boot real VMs" >&2
    exit 1
fi

# The pinned Debian kernel for the real-kernel check, cached outside the repo.
log "fetching the pinned Debian kernel (cached)"
bash resources/guest/fetch-kernel.sh >/dev/null
log "building the guest test kit's initramfs (cached)"
bash resources/guest/build-initramfs.sh >/dev/null

# virtiofsd for the virtio-fs tests (built once with cargo install, cached in ~/.cargo/bin).
log "installing virtiofsd (cached)"
bash resources/guest/install-virtiofsd.sh >/dev/null

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

log "release build, and the example configs and JSON schema against the real parser"
cargo build --release --locked
python3 resources/schema/check.py --builtin --mvmm target/release/mvmm

log "cargo test"
# Unit and integration tests (no doctests: there are none, and their empty summary would be
# the last word). The totals of every test binary close the run.
results=$(mktemp)
trap 'rm -f "$results"' EXIT
status=0
cargo test --workspace --locked --no-fail-fast --lib --bins --tests 2>&1 | tee "$results" || status=$?
awk '/^test result:/ { p += $4; f += $6 } END { printf "%d passed, %d failed\n", p, f }' "$results"
exit "$status"
