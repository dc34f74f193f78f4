#!/usr/bin/env bash
# scripts/lib/common.sh's sl_apt_get, which every apt-get of the scripts goes through: a run
# that fails on a lock another apt or dpkg run holds (cloud-init's or apt-daily's `apt-get
# update` on a fresh machine; -o DPkg::Lock::Timeout covers dpkg's lock only) is tried again
# until SL_APT_LOCK_WAIT seconds have gone by, each wait logged; any other failure is returned
# at once. A stub apt-get on PATH: nothing is installed.
# Usage: apt_retry_test.sh REPO_ROOT
set -euo pipefail
repo_root=$1
# shellcheck source=tests/scripts/test_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/test_lib.sh"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/bin"
# Fails on the package lists' lock, as apt-get 2.6 does, until its LOCKED_RUNS-th run; then
# fails as OTHER_ERROR says, or succeeds. Records each run's arguments.
cat >"$tmp/bin/apt-get" <<STUB
#!/usr/bin/env bash
echo "\$*" >>"$tmp/calls"
runs=\$(wc -l <"$tmp/calls")
echo "stdout of run \$runs"
if ((runs <= \${LOCKED_RUNS:-0})); then
  echo 'E: Could not get lock /var/lib/apt/lists/lock. It is held by process 4242 (apt-get)' >&2
  echo 'E: Unable to lock directory /var/lib/apt/lists/' >&2
  exit 100
fi
if [[ -n \${OTHER_ERROR-} ]]; then
  echo "E: \$OTHER_ERROR" >&2
  exit 100
fi
exit 0
STUB
chmod +x "$tmp/bin/apt-get"

# apt ARGS...: sl_apt_get ARGS with the stub, 1 s between attempts; sets out, err, rc, calls.
apt() {
  : >"$tmp/calls"
  rc=0
  # shellcheck disable=SC2016 # expanded by the inner shell
  PATH=$tmp/bin:$PATH SL_APT_RETRY_INTERVAL=1 bash -c '
    set -euo pipefail
    source "$1/scripts/lib/common.sh"
    shift
    sl_apt_get "$@"' _ "$repo_root" "$@" >"$tmp/out" 2>"$tmp/err" || rc=$?
  out=$(<"$tmp/out")
  err=$(<"$tmp/err")
  calls=$(<"$tmp/calls")
}

# --- 1. the lists' lock is free on the third attempt ------------------------------------------
LOCKED_RUNS=2 apt update
((rc == 0)) || fail "update, locked twice: exit $rc, want 0: $err"
[[ $(wc -l <<<"$calls") == 3 ]] || fail "update, locked twice: apt-get ran other than 3 times: $calls"
[[ $(head -n 1 <<<"$calls") == "-q -o DPkg::Lock::Timeout=300 update" ]] ||
  fail "update: apt-get's arguments: $calls"
expect_in "$err" "the log" "Could not get lock /var/lib/apt/lists/lock" \
  "apt-get update: another apt or dpkg run holds a lock (see above); attempt 1 failed, trying again in 1 s" \
  "attempt 2 failed"
expect_in "$out" "stdout" "stdout of run 1" "stdout of run 3"

# --- 2. still locked when SL_APT_LOCK_WAIT is up: a clear failure -------------------------------
start=$SECONDS
LOCKED_RUNS=1000 SL_APT_LOCK_WAIT=2 apt -y install jq
((rc == 100)) || fail "install, always locked: exit $rc, want apt-get's 100: $err"
((SECONDS - start < 10)) || fail "install, always locked: gave up after $((SECONDS - start)) s, not ~2"
(($(wc -l <<<"$calls") >= 2)) || fail "install, always locked: not tried again: $calls"
expect_in "$err" "the log" "apt-get install: another apt or dpkg run" \
  "still held its lock after 2 s" "giving up"
# The dpkg lock's own timeout is what is left of the wait, never more: at most the 2 s, and
# never growing. (Not "0 on the last try": whole seconds tick during a try, so the last one
# may have started with 1 s left.)
previous=2
while read -r call; do
  [[ $call =~ ^-q\ -o\ DPkg::Lock::Timeout=([0-9]+)\ -y\ install\ jq$ ]] ||
    fail "install, always locked: an attempt's arguments: $call"
  timeout=${BASH_REMATCH[1]}
  ((timeout <= previous)) ||
    fail "install, always locked: the dpkg lock timeout grew to $timeout s: $calls"
  previous=$timeout
done <<<"$calls"

# --- 3. any other failure is not waited out --------------------------------------------------
OTHER_ERROR='Unable to locate package no-such-package' apt -y install no-such-package
((rc == 100)) || fail "install of a missing package: exit $rc, want 100: $err"
[[ $(wc -l <<<"$calls") == 1 ]] || fail "install of a missing package was tried again: $calls"
expect_in "$err" "the log" "Unable to locate package no-such-package"
[[ $err != *"trying again"* ]] || fail "install of a missing package: waited for a lock: $err"

# --- 4. no apt-get of the scripts bypasses sl_apt_get -----------------------------------------
# The lines of FILES... that run apt or apt-get as a command, wherever it stands on the line
# (`if ! apt-get`, `sudo apt-get`, `"${sudo[@]}" apt install`, `out="$(apt-get ...)"`); comments
# and quoted text (log messages) are not commands, but a command substitution inside quotes is.
# sl_apt_get's own line is the one allowed.
direct_apt_calls() {
  grep -Hn '' "$@" | grep -vE '^[^:]+:[0-9]+:[[:space:]]*#' |
    perl -pe 's/"(?:(?!\$\()[^"])*"//g; s/\x27[^\x27]*\x27//g' |
    grep -E '(^[^:]+:[0-9]+:|[[:space:];&|(!{`])apt(-get)?([[:space:]]|$)' |
    grep -v 'LC_ALL=C apt-get -q -o DPkg::Lock::Timeout= ' || true
}
# The check itself: each of these runs apt, none of those does.
cat >"$tmp/runs_apt" <<'LINES'
if ! apt-get -y install x; then
  sudo apt-get update
"${sudo[@]}" apt-get install -y x
apt install x
x && apt-get install y
out="$(apt-get -y install x)"
sl_log "installing: $(apt-get install "x" 2>&1)"
LINES
cat >"$tmp/runs_no_apt" <<'LINES'
# apt-get install x
sl_log "install them as root (apt-get install x) and run again"
local what=apt-get
die 'apt-get install nginx-light'
apt-cache policy x
LINES
[[ $(direct_apt_calls "$tmp/runs_apt" | wc -l) == 7 ]] ||
  fail "the check missed a run of apt: $(direct_apt_calls "$tmp/runs_apt")"
[[ -z $(direct_apt_calls "$tmp/runs_no_apt") ]] ||
  fail "the check took text for a run of apt: $(direct_apt_calls "$tmp/runs_no_apt")"
mapfile -t scripts < <(find "$repo_root/scripts" "$repo_root/.ci" -type f)
direct=$(direct_apt_calls "${scripts[@]}")
[[ -z $direct ]] || fail "apt-get run without sl_apt_get:
$direct"
echo "apt_retry_test: ok"
