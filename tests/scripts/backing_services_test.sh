#!/usr/bin/env bash
# scripts/backing-services on its own ports and state directory (it shares nothing with the
# services scripts/test started), in the conditions that once broke it:
#   1. root's umask 027 (the directories postgres must reach were made 0750 root:root) and the
#      caller's PG* variables (PGSSLMODE=require, PGSERVICE, PGOPTIONS, PGHOST...), which reached
#      the administrative psql, and the leftovers of a first setup cut short (initdb writes
#      PG_VERSION early, and a data directory with it once counted as set up for good): `start`
#      must still bring everything up;
#   2. a running PostgreSQL without the application's role and database (a first start cut
#      short after `pg_ctl start`): `start` must create them;
#   3. a memcached node frozen with SIGSTOP (by a test killed before it let go): `status` must
#      report it down, `start` must restart it, and `stop` must end it at once (no 10 s wait
#      for SIGKILL);
# and a stop that finds nothing running says only that (.ci/run's backstop relies on it).
# Usage: backing_services_test.sh REPO_ROOT
set -euo pipefail
repo_root=$1
# shellcheck source=tests/scripts/test_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/test_lib.sh"
backing=$repo_root/scripts/backing-services

# The test's own PostgreSQL client calls get none of the caller's settings either.
for var in $(compgen -e); do
  if [[ $var == PG[A-Z]* ]]; then
    unset "$var"
  fi
done
unset SL_STATE_DIR

tmp=$(mktemp -d /tmp/sessionledger-backing-test.XXXXXX)
# As root the services run as memcache/postgres, who must reach the state directory (otherwise
# the runtime files move to /tmp/sessionledger-<hash>, which this test would have to clean up).
chmod 0755 "$tmp"
# A quote, a comma and a space: each has its own meaning in postgresql.conf's socket list.
state="$tmp/o'brien, state"
# Made by the test, traversable: what the script makes inside it is under its umask.
mkdir -m 0755 "$state"
# For .ci/run, should ctest kill this test before its cleanup runs (test_lib.sh).
register_scratch "$repo_root" backing "$state"
frozen=()
cleanup() {
  local rc=$? pid stopped=1
  for pid in "${frozen[@]}"; do
    kill -CONT "$pid" 2>/dev/null || true
  done
  SL_STATE_DIR=$state "$backing" stop >/dev/null 2>&1 || stopped=0
  finish_scratch "$stopped" "$tmp"
  ((stopped)) || rc=1
  exit "$rc"
}
trap cleanup EXIT

base=$(free_port_block 3) || fail "found no 3 free ports in a row"
export SL_MEMCACHED_PORT_1=$base SL_MEMCACHED_PORT_2=$((base + 1)) SL_POSTGRES_PORT=$((base + 2))

# bs ARGS...: backing-services ARGS on this test's state directory, under umask 027 and with a
# caller's PostgreSQL settings that this cluster cannot serve; sets err and rc.
bs() {
  run_capturing_stderr env SL_STATE_DIR="$state" PGSSLMODE=require PGSERVICE=no-such-service \
    PGOPTIONS='-c default_transaction_read_only=on' PGHOST=/nonexistent PGUSER=nobody \
    PGDATABASE=nothing PGCONNECT_TIMEOUT=1 bash -c 'umask 027; exec "$@"' _ "$backing" "$@"
}
# psql_admin SQL...: runs each SQL as the cluster's superuser; prints the results unaligned.
psql_admin() {
  local args=() sql
  for sql in "$@"; do
    args+=(-c "$sql")
  done
  PGSSLMODE=disable psql -X -q -tA -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$SL_POSTGRES_PORT" \
    -U postgres -d postgres "${args[@]}"
}
# The pid `status` shows for memcached-N, up or not; nothing when it shows none.
memcached_pid_of() {
  { SL_STATE_DIR=$state "$backing" status 2>/dev/null || true; } |
    sed -nE "s/^memcached-$1 +(up|down) .* pid ([0-9]+)( .*)?\$/\\2/p"
}

# --- 1. umask 027, the caller's PG* variables, an interrupted first setup ----------------------
# What a first start cut short during the cluster's setup leaves (see pg_init): a partial
# cluster in pg/data.new, PG_VERSION already in it, and pg/data without PG_VERSION, here with a
# stray file. Made 0700, so that only the script's own modes let postgres in.
mkdir -m 0700 "$state/pg" "$state/pg/data" "$state/pg/data.new" "$state/pg/data.new/base"
echo 15 >"$state/pg/data.new/PG_VERSION"
echo 'left over' >"$state/pg/data/left-over"
bs start
((rc == 0)) ||
  fail "start under umask 027, PGSSLMODE=require etc., after an interrupted setup: exit $rc: $err"
[[ ! -e $state/pg/data.new && ! -e $state/pg/data/left-over ]] ||
  fail "start left an interrupted setup's files behind: $(ls -A "$state/pg" "$state/pg/data")"
grep -qxF "include_if_exists = 'sessionledger.conf'" "$state/pg/data/postgresql.conf" ||
  fail "the cluster's postgresql.conf does not include sessionledger.conf"
run_capturing_stderr env SL_STATE_DIR="$state" "$backing" status
((rc == 0)) || fail "status after start: exit $rc: $err"
[[ $(psql_admin "SELECT count(*) FROM pg_database WHERE datname = 'sessionledger'") == 1 ]] ||
  fail "start did not create the database"

# --- 2. a running cluster without the role and the database ------------------------------------
psql_admin 'DROP DATABASE sessionledger' 'DROP ROLE sessionledger'
bs start
((rc == 0)) || fail "start with PostgreSQL running but no database: exit $rc: $err"
got=$(psql_admin "SELECT count(*) FROM pg_roles WHERE rolname = 'sessionledger'" \
  "SELECT count(*) FROM pg_database WHERE datname = 'sessionledger'")
[[ $got == $'1\n1' ]] || fail "start left PostgreSQL without the role or the database ($got): $err"

# --- 3. a frozen memcached node -----------------------------------------------------------------
pid=$(memcached_pid_of 1)
[[ -n $pid ]] || fail "no pid for memcached-1 in status"
kill -STOP "$pid"
frozen+=("$pid")
run_capturing_stderr env SL_STATE_DIR="$state" "$backing" status
((rc == 1)) || fail "status with memcached-1 frozen: exit $rc, want 1"
status_out=$(SL_STATE_DIR=$state "$backing" status 2>/dev/null || true)
grep -qE "^memcached-1 +down .*pid $pid" <<<"$status_out" ||
  fail "status shows the frozen memcached-1 (pid $pid) other than down:
$status_out"
bs start
((rc == 0)) || fail "start with memcached-1 frozen: exit $rc: $err"
new_pid=$(memcached_pid_of 1)
[[ -n $new_pid && $new_pid != "$pid" ]] ||
  fail "start reused the frozen memcached-1 (pid $pid, now '$new_pid'): $err"
run_capturing_stderr env SL_STATE_DIR="$state" "$backing" status
((rc == 0)) || fail "status after start restarted memcached-1: exit $rc"

kill -STOP "$new_pid"
frozen+=("$new_pid")
start=$SECONDS
bs stop
((rc == 0)) || fail "stop with memcached-1 frozen: exit $rc: $err"
((SECONDS - start < 8)) || fail "stop of a frozen memcached-1 took $((SECONDS - start)) s"
[[ $err != *"ignored SIGTERM"* ]] || fail "stop needed SIGKILL for the frozen memcached-1: $err"
# (A zombie has ended: whoever reaps the daemon's orphans may take a while.)
state_of_new=$(awk '{print $3}' "/proc/$new_pid/stat" 2>/dev/null || true)
if [[ -n $state_of_new && $state_of_new != Z ]]; then
  fail "memcached-1 (pid $new_pid) still runs after stop (state $state_of_new)"
fi
for port in "$SL_MEMCACHED_PORT_1" "$SL_MEMCACHED_PORT_2" "$SL_POSTGRES_PORT"; do
  if port_listening "$port"; then
    fail "127.0.0.1:$port still listens after stop"
  fi
done
# A stop that finds nothing running says only "... not running", a line per service: .ci/run's
# backstop drops those lines, to stay quiet after scripts/test has stopped everything.
run_capturing_stderr env SL_STATE_DIR="$state" "$backing" stop
((rc == 0)) || fail "a second stop: exit $rc: $err"
if [[ $(grep -c ' not running$' <<<"$err") != 3 ]] || grep -qv ' not running$' <<<"$err"; then
  fail "a stop with nothing running said more than '... not running' per service:
$err"
fi
echo "backing_services_test: ok"
