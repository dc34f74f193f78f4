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

# Scratch services and .ci/run. A test that starts services of its own (scripts/backing-services
# or scripts/cluster on a scratch state directory) stops them in its EXIT trap, which never runs
# when ctest SIGKILLs the test for running past its timeout: the detached daemons (memcached,
# PostgreSQL, nginx, the replicas) would outlive CI. So such a test names each scratch state
# directory in a file under REPO_ROOT/.local/test-scratch/ before it starts anything, and
# removes the file once its cleanup has stopped them; .ci/run's EXIT trap stops what the files
# still there name (it reads the format written here), then removes them.
#
# register_scratch REPO_ROOT KIND STATE_DIR [BUILD_DIR]: adds a line to this test's file:
#   backing   scripts/backing-services with SL_STATE_DIR=STATE_DIR
#   cluster   scripts/cluster with SL_STATE_DIR=STATE_DIR and SL_CLUSTER_BUILD_DIR=BUILD_DIR
#             (its replicas count as its own only when run from that build), then
#             scripts/backing-services with the same SL_STATE_DIR
# as KIND, STATE_DIR and BUILD_DIR separated by tabs (absolute paths, which the test makes).
# A registry that cannot be written only costs the backstop: the test goes on, with a warning.
scratch_entry=
register_scratch() {
  local registry=$1/.local/test-scratch
  scratch_entry=$registry/${0##*/}.$$
  if ! { mkdir -p "$registry" && printf '%s\t%s\t%s\n' "$2" "$3" "${4-}" >>"$scratch_entry"; } \
    2>/dev/null; then
    printf '%s: warning: could not register %s in %s: .ci/run will not stop what it runs\n' \
      "${0##*/}" "$3" "$registry" >&2
  fi
}

# unregister_scratch: removes this test's file of scratch state directories (once they are
# stopped).
unregister_scratch() {
  if [[ -n $scratch_entry ]]; then
    rm -f "$scratch_entry"
  fi
}

# finish_scratch STOPPED DIR: the end of a cleanup that stopped its scratch services (STOPPED 1)
# or failed to (0). Stopped, DIR (the scratch tree) goes, and so does the registration. Not
# stopped, both stay, so that .ci/run's backstop stops the services and reports it; the caller
# fails the test.
finish_scratch() {
  if (($1)); then
    rm -rf "$2"
    unregister_scratch
  else
    printf '%s: cleanup: a stop failed; %s is left for .ci/run to stop\n' "${0##*/}" "$2" >&2
  fi
}
