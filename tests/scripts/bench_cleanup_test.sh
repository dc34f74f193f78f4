#!/usr/bin/env bash
# scripts/bench without a real server or backing service: a copy of scripts/ whose
# backing-services is a stub, and build directories holding stub binaries. Two runs:
#   1. It stops a server it started when the run ends inside start_server: here the server
#      answers the first health check and then reports SessionService NOT_SERVING, which ends
#      the run under set -e. The run must leave that server stopped.
#   2. The main server passes the start-up checks and then dies (writing its "crash" to its
#      log). The run must still print its table (the RSS it could no longer read as "-"), then
#      the end of that server's log on stderr, and exit non-zero; before, the RSS read failed
#      under set -e and the cleanup deleted the log with the crash in it. memcaslap, psql,
#      pgbench and h2load are stubs that fail, so the run needs none installed and reaches no
#      real service.
# Usage: bench_cleanup_test.sh REPO_ROOT
set -euo pipefail
repo_root=$1
# shellcheck source=tests/scripts/test_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/test_lib.sh"

tmp=$(mktemp -d)
server_pid_file=$tmp/server.pid
dying_pid_file=$tmp/dying-server.pid
pooled_pid_file=$tmp/pooled-server.pid
cleanup() {
  local rc=$? file pid
  # A server the bench left behind is the test's to stop (it is a stub this test made).
  for file in "$server_pid_file" "$dying_pid_file" "$pooled_pid_file"; do
    if [[ -s $file ]]; then
      pid=$(<"$file")
      kill "$pid" 2>/dev/null || true
    fi
  done
  rm -rf "$tmp"
  exit "$rc"
}
trap cleanup EXIT

checkout=$tmp/checkout
mkdir -p "$checkout" "$tmp/build/server" "$tmp/build/client"
cp -R "$repo_root/scripts" "$checkout/scripts"
# Nothing listens on this port: the bench's memcached statistics read "unreadable", which it
# tolerates.
nobody=$(free_port_block 1) || fail "found no free port"
cat >"$checkout/scripts/backing-services" <<STUB
#!/usr/bin/env bash
case \$1 in
  status) exit 0 ;;
  env) printf 'export %s\n' SL_MEMCACHED_PORT_1=$nobody SL_MEMCACHED_PORT_2=$nobody \
         MEMCACHED_URL=memcached://127.0.0.1:$nobody DATABASE_URL=postgres://127.0.0.1:$nobody/x ;;
  *) echo "backing-services stub: unexpected \$*" >&2; exit 1 ;;
esac
STUB
cat >"$tmp/build/server/sessionledger-server" <<STUB
#!/usr/bin/env bash
[[ \${1-} == migrate ]] && exit 0
echo \$\$ >"$server_pid_file"
exec sleep 300
STUB
# The first health check (the wait for the server) passes; the check of SessionService that
# follows fails, as for a server whose Memcached is down.
cat >"$tmp/build/client/sessionledger-cli" <<'STUB'
#!/usr/bin/env bash
[[ " $* " == *" sessionledger.v1.SessionService "* ]] && exit 1
exit 0
STUB
chmod +x "$checkout/scripts/backing-services" "$tmp/build/server/sessionledger-server" \
  "$tmp/build/client/sessionledger-cli"

# --- 1. the run ends inside start_server ------------------------------------------------------
run_capturing_stderr timeout 60 "$checkout/scripts/bench" --no-build --build-dir "$tmp/build" \
  --smoke
((rc != 0 && rc != 124)) || fail "bench: exit $rc, want a failure of its own: $err"
[[ -s $server_pid_file ]] || fail "the stub server never started: $err"
pid=$(<"$server_pid_file")
for _ in $(seq 50); do
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.1
done
if kill -0 "$pid" 2>/dev/null; then
  fail "bench exited ($rc) and left its server (pid $pid) running: $err"
fi

# --- 2. the main server dies after the start-up checks ----------------------------------------
dying=$tmp/build-dying
crash=$tmp/crash-now
mkdir -p "$dying/server" "$dying/client" "$tmp/bin"
# The main server logs 50 lines and waits; once the CLI has made the last start-up check, it
# writes its crash and exits as abort() would. The second server (MEMCACHED_PIPELINE=0, for the
# libmemcached row) stays up until the bench stops it.
cat >"$dying/server/sessionledger-server" <<STUB
#!/usr/bin/env bash
[[ \${1-} == migrate ]] && exit 0
if [[ \${MEMCACHED_PIPELINE-} == 0 ]]; then
  echo \$\$ >"$pooled_pid_file"
  exec sleep 300
fi
echo \$\$ >"$dying_pid_file"
for i in \$(seq 50); do echo "stub server log line \$i"; done
until [[ -e "$crash" ]]; do sleep 0.05; done
echo "stub server: fatal: the crash the bench must show" >&2
exit 134
STUB
# Every health check passes; the check of TransactionService, the last before the bench
# measures, lets the main server crash. Every call after that fails as against a server that is
# gone: bench reports UNAVAILABLE for each call (and some calls stuck at the end), and creating
# a session fails.
cat >"$dying/client/sessionledger-cli" <<STUB
#!/usr/bin/env bash
case " \$* " in
  *" bench "*)
    echo '{"rpc":"stub","seconds":1.0,"calls":0,"throughput":0.0,"cpu_us_per_call":{"client":null,"server":null},"errors":{"UNAVAILABLE":16},"unfinished":3,"oldest_unfinished_ms":4500.0}' ;;
  *" health sessionledger.v1.TransactionService "*) touch "$crash" ;;
  *" health "*) ;;
  *) echo "UNAVAILABLE: connection refused" >&2; exit 14 ;;
esac
STUB
for tool in memcaslap psql pgbench h2load; do
  printf '#!/usr/bin/env bash\necho "%s stub: not available" >&2\nexit 1\n' "$tool" \
    >"$tmp/bin/$tool"
  chmod +x "$tmp/bin/$tool"
done
chmod +x "$dying/server/sessionledger-server" "$dying/client/sessionledger-cli"

rc=0
err=$(PATH=$tmp/bin:$PATH timeout 60 "$checkout/scripts/bench" --no-build --build-dir "$dying" \
  --smoke 2>&1 >"$tmp/table.md") || rc=$?
table=$(<"$tmp/table.md")
[[ -s $dying_pid_file ]] || fail "the dying stub server never started: $err"
((rc != 0 && rc != 124)) || fail "bench: exit $rc after its server died, want a failure of its own:
$err"
expect_in "$table" "the table (stdout) of a run whose server died" \
  "| measurement | tool |" "| GetSession | sessionledger-cli |" \
  "| at the end of the whole run | - | - | - |" "UNAVAILABLE=16, 3 unfinished, the oldest 4.5 s"
expect_in "$err" "stderr of a run whose server died" \
  "stub server log line 50" "stub server: fatal: the crash the bench must show"
# Its last 40 lines: log lines 12 to 50 and the crash.
[[ $err == *"stub server log line 12"$'\n'* && $err != *"stub server log line 11"$'\n'* ]] ||
  fail "stderr shows other than the log's last 40 lines: $err"
if [[ -s $pooled_pid_file ]] && kill -0 "$(<"$pooled_pid_file")" 2>/dev/null; then
  fail "bench exited ($rc) and left its second server running: $err"
fi
echo "bench_cleanup_test: ok"
