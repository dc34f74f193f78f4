#!/usr/bin/env bash
# Which backing services `scripts/cluster stop` stops: only the ones `start` found down and
# started, even when that start failed half-way; never the ones that were up already (somebody
# else's, for other work). A copy of scripts/ whose backing-services is a stub that reports
# memcached-1 up and the others down, fails its `start`, and records every command; stub server
# and nginx binaries, never run. Nothing real is started or stopped.
# Usage: cluster_backing_test.sh REPO_ROOT
set -euo pipefail
repo_root=$1
# shellcheck source=tests/scripts/test_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/test_lib.sh"

scratch_checkout "$repo_root"
mkdir -p "$checkout/deploy" "$tmp/build/server" "$tmp/bin"
cp -R "$repo_root/deploy/nginx" "$checkout/deploy/nginx"
cat >"$checkout/scripts/backing-services" <<STUB
#!/usr/bin/env bash
echo "\$*" >>"$calls"
case \$1 in
  status)
    printf '%-12s up    127.0.0.1:%-5s pid %s\n' memcached-1 21211 1
    printf '%-12s down  127.0.0.1:%s\n' memcached-2 21212 postgres 25432
    exit 1 ;;
  start)
    [[ \${STUB_START_FAILS-} == 1 ]] || exit 0
    echo "backing-services stub: memcached-2 started, postgres failed" >&2
    exit 1 ;;
esac
STUB
printf '#!/bin/sh\nexit 1\n' >"$tmp/build/server/sessionledger-server"
printf '#!/bin/sh\nexit 1\n' >"$tmp/bin/nginx"
chmod +x "$checkout/scripts/backing-services" "$tmp/build/server/sessionledger-server" \
  "$tmp/bin/nginx"

base=$(free_port_block 3) || fail "found no 3 free ports in a row"
unset SL_CLUSTER_METRICS_BASE_PORT
export SL_STATE_DIR=$tmp/state SL_CLUSTER_BUILD_DIR=$tmp/build
export SL_CLUSTER_LB_PORT=$base SL_CLUSTER_BASE_PORT=$((base + 1))
export PATH=$tmp/bin:$PATH

# start_then_stop CASE: `cluster start 2` (which fails: at backing-services start, or at the
# stub server's migrate), then `cluster stop`; the commands backing-services got must be the
# status, the start, and a stop of memcached-2 and postgres alone (`env`, which only prints,
# left out).
start_then_stop() {
  rm -f "$calls"
  run_capturing_stderr "$checkout/scripts/cluster" start 2
  ((rc != 0)) || fail "$1: cluster start succeeded with stub binaries: $err"
  run_capturing_stderr "$checkout/scripts/cluster" stop
  ((rc == 0)) || fail "$1: cluster stop: exit $rc: $err"
  local got want
  got=$(grep -vx env "$calls")
  want=$(printf '%s\n' status start stop-memcached\ 2 stop-postgres)
  [[ $got == "$want" ]] || fail "$1: backing-services was asked:
$got
want
$want"
  [[ ! -e $SL_STATE_DIR/cluster/started-backing-services ]] ||
    fail "$1: stop left the list of started services behind"
}
STUB_START_FAILS=1 start_then_stop "a backing-services start that failed half-way"
STUB_START_FAILS=0 start_then_stop "memcached-1 up before the start"

# An empty list, left by an older `cluster start`, means every service: a later start must not
# shrink it to the services it finds down, or `stop` would leave the others running.
mkdir -p "$SL_STATE_DIR/cluster"
: >"$SL_STATE_DIR/cluster/started-backing-services"
rm -f "$calls"
STUB_START_FAILS=0 run_capturing_stderr "$checkout/scripts/cluster" start 2
run_capturing_stderr "$checkout/scripts/cluster" stop
((rc == 0)) || fail "an older empty list: cluster stop: exit $rc: $err"
got=$(grep -vx env "$calls")
want=$(printf '%s\n' status start stop)
[[ $got == "$want" ]] || fail "an older empty list: backing-services was asked:
$got
want
$want"
echo "cluster_backing_test: ok"
