#!/usr/bin/env bash
# scripts/backing-services start when its ports are taken by somebody else: by an unrelated
# listener, and by another checkout's services (another state directory on the same ports). It
# must start nothing, leave those processes alone, and say which ports, held by whom, and how
# to choose others. Own state directories and free ports: it shares nothing with the services
# scripts/test started. Starts memcached only (no PostgreSQL).
# Usage: ports_test.sh REPO_ROOT
set -euo pipefail
repo_root=$1
# shellcheck source=tests/scripts/test_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/test_lib.sh"
backing=$repo_root/scripts/backing-services

tmp=$(mktemp -d /tmp/sessionledger-ports-test.XXXXXX)
chmod 0755 "$tmp" # memcached runs as `memcache` under root and writes its pid file in here
holders=()
other=$tmp/other-checkout
ours=$tmp/this-checkout
# For .ci/run, should ctest kill this test before its cleanup runs (test_lib.sh).
register_scratch "$repo_root" backing "$other"
register_scratch "$repo_root" backing "$ours"
cleanup() {
  local rc=$? stopped=1
  release_ports
  SL_STATE_DIR=$other "$backing" stop >/dev/null 2>&1 || stopped=0
  SL_STATE_DIR=$ours "$backing" stop >/dev/null 2>&1 || stopped=0
  finish_scratch "$stopped" "$tmp"
  ((stopped)) || rc=1
  exit "$rc"
}
trap cleanup EXIT

base=$(free_port_block 3) || fail "found no 3 free ports in a row"
unset SL_STATE_DIR
export SL_MEMCACHED_PORT_1=$base SL_MEMCACHED_PORT_2=$((base + 1)) SL_POSTGRES_PORT=$((base + 2))

# --- 1. memcached-2's and PostgreSQL's ports held by a listener that is nobody's service -------
hold_port "$SL_MEMCACHED_PORT_2"
hold_port "$SL_POSTGRES_PORT"
run_capturing_stderr env SL_STATE_DIR="$ours" "$backing" start
((rc == 1)) || fail "start with two ports taken: exit $rc, want 1: $err"
expect_in "$err" "the message" \
  "127.0.0.1:$SL_MEMCACHED_PORT_2 (SL_MEMCACHED_PORT_2, for memcached-2) is held by" \
  "127.0.0.1:$SL_POSTGRES_PORT (SL_POSTGRES_PORT, for postgres) is held by" \
  "not this checkout's memcached-2 (state directory $ours)" \
  "SL_MEMCACHED_PORT_1, SL_MEMCACHED_PORT_2 and SL_POSTGRES_PORT" "SL_STATE_DIR" \
  "nothing was started"
if [[ $err == *"127.0.0.1:$SL_MEMCACHED_PORT_1 ("* ]]; then
  fail "the message blames memcached-1's port, which is free: $err"
fi
# memcached-1's port was free, but nothing starts while the others are taken.
if port_listening "$SL_MEMCACHED_PORT_1"; then
  fail "memcached-1 was started although the set could not be"
fi
for pid in "${holders[@]}"; do
  kill -0 "$pid" 2>/dev/null || fail "a process holding a port (pid $pid) is gone"
done
# The suggested ports, if any, are free.
if [[ $err =~ For\ example\ \(free\ now\):\ export\ (.*) ]]; then
  for assignment in ${BASH_REMATCH[1]}; do
    port_listening "${assignment#*=}" && fail "suggested $assignment is taken"
  done
fi
release_ports

# --- 2. memcached-1's port held by another checkout's memcached -----------------------------------
# The pid `status` shows for memcached-1 of the state directory $1, or nothing. (status exits 1
# while PostgreSQL, never started here, is down.)
memcached_1_pid() {
  { SL_STATE_DIR=$1 "$backing" status 2>/dev/null || true; } |
    sed -nE 's/^memcached-1 +up .* pid ([0-9]+)$/\1/p'
}
SL_STATE_DIR=$other "$backing" start-memcached 1 2>/dev/null
other_pid=$(memcached_1_pid "$other")
[[ -n $other_pid ]] || fail "the other checkout's memcached-1 did not start"
run_capturing_stderr env SL_STATE_DIR="$ours" "$backing" start
((rc == 1)) || fail "start beside another checkout's memcached: exit $rc, want 1: $err"
expect_in "$err" "the message" \
  "127.0.0.1:$SL_MEMCACHED_PORT_1 (SL_MEMCACHED_PORT_1, for memcached-1) is held by" \
  "not this checkout's memcached-1 (state directory $ours)"
if command -v ss >/dev/null && [[ $EUID -eq 0 || $(stat -c %U "/proc/$other_pid") == "$USER" ]]; then
  expect_in "$err" "the message" "memcached (pid $other_pid)"
fi
[[ $(memcached_1_pid "$other") == "$other_pid" ]] ||
  fail "the other checkout's memcached-1 (pid $other_pid) is no longer running"
# Ours did not start either.
if port_listening "$SL_MEMCACHED_PORT_2"; then
  fail "memcached-2 was started although memcached-1's port is taken"
fi

# --- 3. our own memcached, started on another port than the one asked for now --------------------
SL_STATE_DIR=$other "$backing" stop-memcached 1 2>/dev/null
SL_STATE_DIR=$ours "$backing" start-memcached 2 2>/dev/null
run_capturing_stderr env SL_STATE_DIR="$ours" SL_MEMCACHED_PORT_2=$((base + 3)) \
  "$backing" start-memcached 2
((rc == 1)) || fail "start-memcached 2 on a new port while it runs on the old one: exit $rc: $err"
expect_in "$err" "the message" \
  "memcached-2 (state directory $ours) is running on 127.0.0.1:$SL_MEMCACHED_PORT_2, not on SL_MEMCACHED_PORT_2=$((base + 3))"
echo "ports_test: ok"
