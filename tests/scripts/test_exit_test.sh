#!/usr/bin/env bash
# What scripts/test and .ci/run leave behind and report, with stubs in place of everything they
# run (nothing is installed, built, started or stopped):
#   scripts/test  gives ctest no_grpc_proxy naming loopback when http_proxy/https_proxy are set
#                 (a proxy cannot reach the tests' servers on 127.0.0.1); names the tests that
#                 skipped themselves inside a binary ctest ran whole; exits non-zero when the
#                 tests passed but `backing-services stop` failed, and keeps ctest's own failure
#                 code when both failed; with --build-only, builds and touches nothing else;
#   .ci/run       stops the backing services on exit as a backstop, quietly when there was
#                 nothing left to stop, and turns a 0 into 1 when that stop fails, never
#                 changing a step's failure code; and, before that, those of the scratch state
#                 directories that tests registered and did not unregister (a test ctest killed),
#                 skipping directories that are gone; runs the sanitizer build beside step 1's
#                 tests at SCHED_IDLE, fails on its failure, and ends it when step 1 fails.
# Usage: test_exit_test.sh REPO_ROOT
set -euo pipefail
repo_root=$1
# shellcheck source=tests/scripts/test_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/test_lib.sh"

scratch_checkout "$repo_root"
mkdir -p "$checkout/.ci" "$checkout/build-test/server" "$tmp/bin" "$tmp/state"
cp "$repo_root/.ci/run" "$checkout/.ci/run"

# backing-services: every service down until `start`; `stop` as STUB_STOP says (ok: it stops
# them; fail: it cannot; clean: nothing was running, as after scripts/test's own stop). A call
# on another state directory than the main one ($tmp/state) is recorded with it.
cat >"$checkout/scripts/backing-services" <<STUB
#!/usr/bin/env bash
if [[ \$SL_STATE_DIR == "$tmp/state" ]]; then
  echo "\$*" >>"$calls"
else
  echo "\$* in \$SL_STATE_DIR" >>"$calls"
fi
case \$1 in
  status) echo 'memcached-1  down  127.0.0.1:21211'; exit 1 ;;
  start) exit 0 ;;
  env) echo 'export SL_MEMCACHED_PORT_1=1' ;;
  stop)
    case \${STUB_STOP:-ok} in
      ok) echo 'backing-services: memcached-1 stopped' >&2 ;;
      clean) printf 'backing-services: %s not running\n' memcached-1 memcached-2 postgres >&2 ;;
      fail) echo 'backing-services: error: could not stop memcached-1 (pid 4242)' >&2; exit 1 ;;
    esac ;;
  *) echo "backing-services stub: unexpected \$*" >&2; exit 1 ;;
esac
STUB
# ctest records the proxy settings it was given, writes a log in which one test of a binary
# skipped itself (GoogleTest's lines) after another printed a NUL, and exits STUB_CTEST_RC.
cat >"$tmp/bin/ctest" <<STUB
#!/usr/bin/env bash
printf 'no_grpc_proxy=%s\n' "\${no_grpc_proxy-<unset>}" >"$tmp/ctest-env"
mkdir -p "$checkout/build-test/Testing/Temporary"
{
  printf 'a test printed a NUL byte: \0\n'
  printf '%s\n' '[ RUN      ] Suite.Skips' '[  SKIPPED ] Suite.Skips (3 ms)' \
    '[ RUN      ] Suite.Runs' '[       OK ] Suite.Runs (1 ms)' \
    '[  SKIPPED ] 1 test, listed below:' '[  SKIPPED ] Suite.Skips'
} >"$checkout/build-test/Testing/Temporary/LastTest.log"
exit "\${STUB_CTEST_RC:-0}"
STUB
# Every package is installed; configuring and building succeed at once; memcached "is
# installed" (.ci/run's backstop only runs where it or PostgreSQL is).
printf '#!/bin/sh\nprintf "install ok installed"\n' >"$tmp/bin/dpkg-query"
printf '#!/bin/sh\nexit 0\n' >"$tmp/bin/cmake"
printf '#!/bin/sh\nexit 0\n' >"$tmp/bin/memcached"
printf '#!/bin/sh\nexit 0\n' >"$checkout/build-test/server/sessionledger-server"
chmod +x "$checkout/scripts/backing-services" "$tmp/bin/"* \
  "$checkout/build-test/server/sessionledger-server"

export PATH=$tmp/bin:$PATH SL_STATE_DIR=$tmp/state
# The proxy of a CI runner, and no exemption (scripts/test, which runs this test, sets one).
export http_proxy=http://proxy.invalid:3128 https_proxy=http://proxy.invalid:3128
unset no_proxy no_grpc_proxy NO_PROXY

# --- scripts/test ---------------------------------------------------------------------------
# run_test CTEST_RC STOP WANT: scripts/test with ctest exiting CTEST_RC and `stop` as STOP; its
# exit code must be WANT.
run_test() {
  rm -f "$calls" "$tmp/ctest-env"
  STUB_CTEST_RC=$1 STUB_STOP=$2 run_capturing_stderr "$checkout/scripts/test"
  ((rc == $3)) || fail "scripts/test, ctest exit $1, stop $2: exit $rc, want $3: $err"
  grep -qx stop "$calls" || fail "scripts/test, ctest exit $1, stop $2: no stop: $err"
}
run_test 0 ok 0
expect_in "$err" "scripts/test's log" "these tests skipped themselves" "[  SKIPPED ] Suite.Skips (3 ms)"
[[ $err != *Suite.Runs* && $err != *"1 test, listed below"* ]] ||
  fail "scripts/test named more than the skipped test: $err"
[[ $(grep -c 'Suite\.Skips' <<<"$err") == 1 ]] ||
  fail "scripts/test named the skipped test more than once (GoogleTest's summary too?): $err"
got=$(<"$tmp/ctest-env")
[[ $got == no_grpc_proxy=127.0.0.1,localhost,::1* ]] ||
  fail "ctest ran with http_proxy set and $got: loopback channels would go to the proxy"
run_test 0 fail 1
expect_in "$err" "scripts/test's log" "scripts/backing-services stop failed"
run_test 8 fail 8
run_test 8 ok 8

# --build-only builds and exits: no services asked for, no ctest; it takes no ctest arguments.
# It does not take the state directory's lock, so it runs beside a run that holds it (as .ci/run
# has it), but not beside another build of the same directory.
rm -f "$calls" "$tmp/ctest-env"
(
  exec 8>>"$tmp/state/test.lock"
  flock 8
  run_capturing_stderr "$checkout/scripts/test" --build-only
  ((rc == 0)) || fail "scripts/test --build-only beside a run holding the state lock: exit $rc: $err"
)
[[ ! -e $calls && ! -e $tmp/ctest-env ]] ||
  fail "scripts/test --build-only asked for services ($(cat "$calls" 2>/dev/null)) or ran ctest"
run_capturing_stderr "$checkout/scripts/test" --build-only -L unit
((rc == 2)) || fail "scripts/test --build-only -L unit: exit $rc, want 2: $err"
expect_in "$err" "scripts/test's log" "--build-only runs no tests"
(
  exec 7>>"$tmp/state/build-test.lock"
  flock 7
  run_capturing_stderr "$checkout/scripts/test" --build-only
  ((rc == 1)) || fail "scripts/test --build-only while build-test is being built: exit $rc: $err"
  expect_in "$err" "scripts/test's log" "is using $checkout/build-test"
)

# --- .ci/run ----------------------------------------------------------------------------------
# scripts/test: each step exits as STUB_STEP_1 or STUB_STEP_2 says (--sanitize is step 2); step
# 1's --build-only run passes, step 2's exits as STUB_SANITIZER_BUILD says, or as step 2; each
# run records its arguments in $runs. With STUB_WAIT_FOR_SANITIZER_BUILD set, step 1's tests
# wait until the sanitizer build has started. The sanitizer build also records its scheduling
# policy, writes its pid to $tmp/sanitizer-build.pid, prints a line and sleeps
# STUB_SANITIZER_BUILD_SECONDS (default 0) before it exits.
runs=$tmp/test-runs
cat >"$checkout/scripts/test" <<STUB
#!/usr/bin/env bash
echo "test \$*" >>"$runs"
if [[ \$* == '--sanitize --build-only' ]]; then
  echo \$\$ >"$tmp/sanitizer-build.pid"
  chrt -p \$\$ >"$tmp/sanitizer-build.policy"
  echo 'stub sanitizer build: all targets built'
  sleep "\${STUB_SANITIZER_BUILD_SECONDS:-0}"
  exit "\${STUB_SANITIZER_BUILD:-\${STUB_STEP_2:-0}}"
fi
if [[ \${1-} == --sanitize ]]; then exit "\${STUB_STEP_2:-0}"; fi
[[ \${1-} != --build-only ]] || exit 0
if [[ -n \${STUB_WAIT_FOR_SANITIZER_BUILD-} ]]; then
  for ((i = 0; i < 100; i++)); do
    [[ ! -s "$tmp/sanitizer-build.pid" ]] || break
    sleep 0.1
  done
fi
exit "\${STUB_STEP_1:-0}"
STUB
chmod +x "$checkout/scripts/test"
# run_ci STEP_1 STEP_2 STOP WANT: .ci/run with the steps exiting STEP_1 and STEP_2 and the
# backstop's `stop` as STOP; its exit code must be WANT, and it must have run one stop.
run_ci() {
  rm -f "$calls"
  STUB_STEP_1=$1 STUB_STEP_2=$2 STUB_STOP=$3 run_capturing_stderr "$checkout/.ci/run"
  ((rc == $4)) || fail ".ci/run, steps $1 $2, stop $3: exit $rc, want $4: $err"
  [[ $(cat "$calls" 2>/dev/null) == stop ]] ||
    fail ".ci/run, steps $1 $2, stop $3: backing-services was asked: $(cat "$calls" 2>/dev/null)"
}
run_ci 0 0 clean 0
[[ $err != *backstop* && $err != *"not running"* ]] ||
  fail ".ci/run talked about a backstop stop that found nothing running: $err"
run_ci 3 0 ok 3
expect_in "$err" ".ci/run's log" "stopped backing services the steps left running" \
  "memcached-1 stopped"
run_ci 0 0 fail 1
expect_in "$err" ".ci/run's log" "stop failed" "could not stop memcached-1" "exiting 1"
run_ci 0 5 fail 5

# The steps' order: step 1's build, then its tests beside the sanitizer build (which of the two
# starts first is up to the scheduler), then step 2 once that build is done; the sanitizer
# build at SCHED_IDLE, its output printed and its time reported.
rm -f "$runs"
rc=0
out=$("$checkout/.ci/run" 2>&1) || rc=$?
((rc == 0)) || fail ".ci/run with passing steps: exit $rc: $out"
got=$(sed -n 1p "$runs")$'\n'$(sed -n 2,3p "$runs" | sort)$'\n'$(sed -n '4,$p' "$runs")
want=$'test --build-only\ntest \ntest --sanitize --build-only\ntest --sanitize'
[[ $got == "$want" ]] || fail ".ci/run ran scripts/test as
$(cat "$runs")
want (lines 2 and 3 in either order)
$want"
grep -q SCHED_IDLE "$tmp/sanitizer-build.policy" ||
  fail "the sanitizer build did not run at SCHED_IDLE: $(cat "$tmp/sanitizer-build.policy")"
expect_in "$out" ".ci/run's output" "stub sanitizer build: all targets built" \
  "./scripts/test --sanitize --build-only took"

# A failing sanitizer build fails .ci/run with its exit code, after its output, and step 2 does
# not run.
rm -f "$runs"
STUB_SANITIZER_BUILD=6 run_capturing_stderr "$checkout/.ci/run"
((rc == 6)) || fail ".ci/run, sanitizer build exit 6: exit $rc, want 6: $err"
expect_in "$err" ".ci/run's log" "./scripts/test --sanitize --build-only failed (exit 6)"
! grep -qx 'test --sanitize' "$runs" || fail "step 2 ran after its build failed: $(cat "$runs")"

# A failing step 1 ends the sanitizer build that still runs beside it, at once.
rm -f "$runs" "$tmp/sanitizer-build.pid"
started=$SECONDS
STUB_STEP_1=3 STUB_SANITIZER_BUILD=0 STUB_SANITIZER_BUILD_SECONDS=60 \
  STUB_WAIT_FOR_SANITIZER_BUILD=1 run_capturing_stderr "$checkout/.ci/run"
((rc == 3)) || fail ".ci/run, step 1 exit 3 during the sanitizer build: exit $rc, want 3: $err"
((SECONDS - started < 30)) || fail ".ci/run waited for the sanitizer build after step 1 failed"
build_pid=$(<"$tmp/sanitizer-build.pid")
# Processes of the build's session (setsid: its id is the build's pid) that have not exited. Its
# children may take a moment to go after their parent, and one that has exited may stay a zombie
# until whoever inherited it reaps it (in a container, maybe never): that one is gone.
running_in_build_session() {
  # shellcheck disable=SC2009 # pgrep would count the zombies
  ps -o stat= -s "$build_pid" 2>/dev/null | grep -qv '^Z'
}
for ((i = 0; i < 50; i++)); do
  running_in_build_session || break
  sleep 0.1
done
! running_in_build_session ||
  fail ".ci/run left the sanitizer build running: $(ps -o pid=,stat=,args= -s "$build_pid")"

# --- .ci/run: scratch services of tests ctest killed ----------------------------------------
# Registered as the tests register theirs (test_lib.sh): a backing set, a cluster (with a space
# in its path, as cluster_test.sh's has), and a directory that is gone. scripts/cluster is a stub
# that records its stop, with the state and build directories it got.
cat >"$checkout/scripts/cluster" <<STUB
#!/usr/bin/env bash
echo "cluster \$* in \$SL_STATE_DIR from \$SL_CLUSTER_BUILD_DIR" >>"$calls"
[[ \${STUB_STOP:-ok} != fail ]] || exit 1
echo 'cluster: replica 1 stopped' >&2
STUB
chmod +x "$checkout/scripts/cluster"
registry=$checkout/.local/test-scratch
mkdir -p "$tmp/scratch-a" "$tmp/scratch b/.local"
# scratch_ci STOP WANT: .ci/run with passing steps, after registering the three; its exit code
# must be WANT, and it must have stopped the two that exist, then the main services.
scratch_ci() {
  rm -rf "$registry" "$calls"
  (
    register_scratch "$checkout" backing "$tmp/scratch-a"
    register_scratch "$checkout" cluster "$tmp/scratch b/.local" "$tmp/build dir"
    register_scratch "$checkout" backing "$tmp/gone"
  )
  STUB_STOP=$1 run_capturing_stderr "$checkout/.ci/run"
  ((rc == $2)) || fail ".ci/run, scratch stops $1: exit $rc, want $2: $err"
  local want
  want=$(printf '%s\n' "stop in $tmp/scratch-a" \
    "cluster stop in $tmp/scratch b/.local from $tmp/build dir" "stop in $tmp/scratch b/.local" \
    stop)
  [[ $(cat "$calls" 2>/dev/null) == "$want" ]] ||
    fail ".ci/run, scratch stops $1: backing-services and cluster were asked:
$(cat "$calls" 2>/dev/null)
want
$want"
}
scratch_ci ok 0
expect_in "$err" ".ci/run's log" "left running in $tmp/scratch-a" \
  "left running in $tmp/scratch b/.local" "replica 1 stopped"
[[ $err != *"$tmp/gone"* ]] || fail ".ci/run talked about a scratch directory that is gone: $err"
[[ -z $(ls -A "$registry") ]] || fail ".ci/run left its stopped scratch entries: $(ls -A "$registry")"
scratch_ci fail 1
expect_in "$err" ".ci/run's log" "stopping the scratch services in $tmp/scratch-a failed" \
  "may still be running: exiting 1"
[[ -n $(ls -A "$registry") ]] || fail ".ci/run dropped the entries of scratch stops that failed"
echo "test_exit_test: ok"
