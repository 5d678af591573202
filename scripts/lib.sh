# Shared by the scripts: progress on stderr, one line per step; the tools' own output goes to
# log files under var/setup/, shown only when a step fails. Source it, don't run it.

say() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

SETUP_LOGS=${SETUP_LOGS:-var/setup}

# quietly LOG CMD...: run CMD with its output in var/setup/LOG; on failure show the log's tail.
quietly() {
  local log="$SETUP_LOGS/$1"
  shift
  mkdir -p "$SETUP_LOGS"
  if ! "$@" >>"$log" 2>&1; then
    tail -n 30 "$log" >&2
    say "failed: $* (full log: $log)"
    return 1
  fi
}

# apt_install WHAT USUAL PACKAGE...: install Debian packages with one line of progress.
apt_install() {
  local what=$1 usual=$2
  shift 2
  local started=$SECONDS
  say "installing $what (Debian packages: $*; usually $usual; log: $SETUP_LOGS/apt.log)"
  if [ -z "${_APT_UPDATED:-}" ]; then
    quietly apt.log as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q || return 1
    _APT_UPDATED=1
  fi
  quietly apt.log as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" || return 1
  say "installed $what in $((SECONDS - started))s"
}
