# apt.sh - shared by the scripts that install what the tests need (sourced, not run).
#
# The caller defines log() and die() first. Provides:
#   can_root    true if we are root or have password-less sudo
#   as_root     runs a command as root (directly, or with sudo -n), or dies
#   apt_retry   runs an apt/dpkg command; while it fails because another process holds an
#               apt/dpkg lock (a fresh machine's unattended upgrades, a parallel test), it
#               retries for up to MVMM_APT_LOCK_TIMEOUT seconds (default 120). The command's
#               output goes to stderr, so the caller's stdout stays machine readable. Returns
#               the command's status (the last one's, when the lock outlived the timeout).
#
# Environment: MVMM_APT_LOCK_TIMEOUT (seconds), MVMM_APT_RETRY_INTERVAL (seconds, default 5).

can_root() {
    ((EUID == 0)) || { command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; }
}

as_root() {
    if ((EUID == 0)); then
        "$@"
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo -n "$@"
    else
        die "root is needed to run '$*' (re-run as root, or run it yourself)"
    fi
}

apt_retry() {
    local timeout=${MVMM_APT_LOCK_TIMEOUT:-120} interval=${MVMM_APT_RETRY_INTERVAL:-5}
    [[ $timeout =~ ^[0-9]+$ ]] || die "MVMM_APT_LOCK_TIMEOUT must be a number of seconds"
    [[ $interval =~ ^[0-9]+$ ]] || die "MVMM_APT_RETRY_INTERVAL must be a number of seconds"
    local deadline=$((SECONDS + timeout)) errf rc
    errf=$(mktemp "${TMPDIR:-/tmp}/mvmm-apt.XXXXXX")
    while :; do
        rc=0
        "$@" 2>"$errf" >&2 || rc=$?
        if ((rc != 0)) &&
            grep -qE 'Could not get lock|Unable to acquire|Unable to lock|another process using it' "$errf"; then
            if ((SECONDS < deadline)); then
                log "apt/dpkg lock is held by another process; retrying in ${interval} s (gives up after ${timeout} s)"
                sleep "$interval"
                continue
            fi
            log "the apt/dpkg lock is still held after ${timeout} s (MVMM_APT_LOCK_TIMEOUT)"
        fi
        cat "$errf" >&2
        rm -f "$errf"
        return "$rc"
    done
}
