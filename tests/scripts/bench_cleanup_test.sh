#!/usr/bin/env bash
# scripts/bench stops a server it started when the run ends inside start_server: here the
# server answers the first health check and then reports SessionService NOT_SERVING, which ends
# the run under set -e. No real server or backing service: a copy of scripts/ whose
# backing-services is a stub, and a build directory holding stub binaries (the server records
# its pid and sleeps). The run must leave that server stopped.
# Usage: bench_cleanup_test.sh REPO_ROOT
set -euo pipefail
repo_root=$1
# shellcheck source=tests/scripts/test_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/test_lib.sh"

tmp=$(mktemp -d)
server_pid_file=$tmp/server.pid
cleanup() {
  local rc=$? pid
  # A server the bench left behind is the test's to stop (it is the stub this test made).
  if [[ -s $server_pid_file ]]; then
    pid=$(<"$server_pid_file")
    kill "$pid" 2>/dev/null || true
  fi
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
echo "bench_cleanup_test: ok"
