# shellcheck shell=bash
# Helpers shared by the tests of scripts/ in this directory. Source it; it runs nothing.

fail() {
  printf '%s: FAIL %s\n' "${0##*/}" "$*" >&2
  exit 1
}

# scratch_checkout REPO_ROOT: sets `tmp`, a scratch directory removed on exit, and in it
# `checkout`, holding a copy of the repo's scripts/ (whose backing-services a test replaces with
# a stub), and `calls`, the file such a stub appends its arguments to.
scratch_checkout() {
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  checkout=$tmp/checkout
  # shellcheck disable=SC2034 # read by the sourcing test and its stub
  calls=$tmp/backing-calls
  mkdir -p "$checkout"
  cp -R "$1/scripts" "$checkout/scripts"
}

# True if something accepts TCP connections on 127.0.0.1:PORT.
port_listening() {
  # shellcheck disable=SC2016 # expanded by the inner shell
  timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$1" 2>/dev/null
}

# free_port_block N: prints a port P such that nothing listens on P..P+N-1. Below 32768, the
# start of Linux's ephemeral range, so that no outgoing connection takes one of them meanwhile.
free_port_block() {
  local n=$1 base port tries
  for ((tries = 0; tries < 100; tries++)); do
    base=$((10000 + RANDOM % 20000))
    for ((port = base; port < base + n; port++)); do
      if port_listening "$port"; then
        continue 2
      fi
    done
    echo "$base"
    return 0
  done
  return 1
}

# hold_port PORT: starts a listener on 127.0.0.1:PORT, a process of the test's own that stands
# for "somebody else's service", and appends its pid to the global array `holders`.
hold_port() {
  local tries=50
  python3 -c '
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen()
time.sleep(3600)' "$1" &
  holders+=("$!")
  until port_listening "$1"; do
    ((--tries > 0)) || fail "could not listen on 127.0.0.1:$1"
    sleep 0.1
  done
}

# Stops the listeners hold_port started (by pid: they are ours).
release_ports() {
  local pid
  for pid in "${holders[@]}"; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  holders=()
}

# Runs "$@" with its stderr captured in the global `err` and its exit status in `rc`; stdout is
# thrown away.
run_capturing_stderr() {
  # shellcheck disable=SC2034 # read by the caller
  rc=0
  # shellcheck disable=SC2034 # read by the caller
  err=$("$@" 2>&1 >/dev/null) || rc=$?
}

# expect_in TEXT WHAT NEEDLE...: fails unless every NEEDLE occurs in TEXT.
expect_in() {
  local text=$1 what=$2 needle
  shift 2
  for needle in "$@"; do
    [[ $text == *"$needle"* ]] || fail "$what lacks '$needle':
$text"
  done
}
