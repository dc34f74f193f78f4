#!/usr/bin/env bash
# scripts/test's selection for a sanitizer build (sl_ctest_excluding in scripts/lib/common.sh):
# whatever -L/-LE the caller passes, the labels a sanitizer build cannot run stay out, and the
# caller's -LE still takes effect. And every long test has a duration for ctest's order. Lists
# tests of BUILD_DIR with `ctest -N`; runs none.
# Usage: ctest_selection_test.sh REPO_ROOT BUILD_DIR
set -euo pipefail
repo_root=$1
build_dir=$2
# shellcheck source=tests/scripts/test_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/test_lib.sh"
# shellcheck source=scripts/lib/common.sh
source "$repo_root/scripts/lib/common.sh"

# The names of the tests `ctest -N ARGS...` would run, one a line, sorted.
listed() {
  ctest --test-dir "$build_dir" -N "$@" | sed -n 's/^ *Test *#[0-9]*: //p' | sort
}

unit=$(listed -L unit)
[[ -n $unit ]] || fail "no unit tests listed in $build_dir"
forbidden=$(listed -L 'deploy|bench|scripts|chaos')
[[ -n $forbidden ]] || fail "no deploy, bench, scripts or chaos tests listed in $build_dir"

sl_ctest_excluding 'deploy|bench|scripts' -L 'unit|chaos' -LE chaos
[[ ${SL_CTEST_ARGS[*]} == "-LE deploy|bench|scripts|(chaos) -L unit|chaos" ]] ||
  fail "args: ${SL_CTEST_ARGS[*]}"
selected=$(listed "${SL_CTEST_ARGS[@]}")
[[ -n $selected ]] || fail "-L 'unit|chaos' -LE chaos selected nothing"
both=$(comm -12 <(printf '%s\n' "$selected") <(printf '%s\n' "$forbidden"))
[[ -z $both ]] || fail "selected tests that are excluded, by the script or by the caller:
$both"
# Every unit test that is not forbidden is still there.
left_out=$(comm -23 <(comm -23 <(printf '%s\n' "$unit") <(printf '%s\n' "$forbidden")) \
  <(printf '%s\n' "$selected"))
[[ -z $left_out ]] || fail "left out unit tests nobody excluded:
$left_out"

# The long spelling, and arguments with spaces, pass through as they are.
sl_ctest_excluding 'deploy' --label-exclude 'a b' -R 'x y' --timeout 5
[[ ${#SL_CTEST_ARGS[@]} == 6 && ${SL_CTEST_ARGS[1]} == 'deploy|(a b)' &&
  ${SL_CTEST_ARGS[3]} == 'x y' ]] || fail "args: ${SL_CTEST_ARGS[*]}"
# No arguments: only the exclusion.
sl_ctest_excluding 'deploy'
[[ ${SL_CTEST_ARGS[*]} == "-LE deploy" ]] || fail "args: ${SL_CTEST_ARGS[*]}"
# An -LE without its expression is refused, not passed on.
if sl_ctest_excluding 'deploy' -L unit -LE 2>/dev/null; then
  fail "a trailing -LE was accepted"
fi
# Every test labelled integration or chaos (whole binaries and scripts that run for seconds to
# minutes, most of them alone) says how long it runs (sl_test_seconds in tests/CMakeLists.txt):
# in a clean clone ctest would otherwise start them in no useful order.
uncosted=$(ctest --test-dir "$build_dir" --show-only=json-v1 | python3 -c '
import json, sys
for test in json.load(sys.stdin)["tests"]:
    props = {p["name"]: p["value"] for p in test.get("properties", [])}
    labels = props.get("LABELS", [])
    if ("integration" in labels or "chaos" in labels) and not props.get("COST"):
        print(test["name"])
')
[[ -z $uncosted ]] || fail "tests without a duration (sl_test_seconds):
$uncosted"
echo "ctest_selection_test: ok"
