#!/usr/bin/env bash
# Runs the CPU test suite against C++ kernels built with AddressSanitizer and
# UndefinedBehaviorSanitizer, and fails on any sanitizer report.
#
# The sanitized build lives in a copy of the working tree (the files git tracks or would track,
# as they are now) in a temporary folder, so the normal in-tree build is left alone. Python is
# not instrumented: the sanitizer runtimes are preloaded into it, and leak detection is off
# because the interpreter keeps memory alive until exit by design.
#
# Usage: scripts/run_sanitized_tests.sh [pytest arguments]   (default: tests -m "not slow and not cuda")
# Environment: PYTHON (default python), MAX_JOBS (default 2), KEEP=1 keeps the temporary copy.
set -euo pipefail

start=$SECONDS
. "$(dirname "$0")/build_copy.sh"
build_copy sanitized ALPHAQUANT_SANITIZE=1
echo "built in $((SECONDS - start)) s"

LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
export LD_PRELOAD
export ASAN_OPTIONS=detect_leaks=0
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
check_copy_imported

if [[ $# -eq 0 ]]; then set -- tests -m "not slow and not cuda"; fi
set +e
"$PYTHON" -m pytest -q -p no:cacheprovider "$@" 2>&1 | tee pytest.log
status=${PIPESTATUS[0]}
set -e

if grep -q -E "ERROR: AddressSanitizer|runtime error:|SUMMARY: (Address|UndefinedBehavior)Sanitizer" pytest.log; then
    echo "sanitizer reports found (see above)" >&2
    status=1
fi
echo "sanitized tests: exit status $status, $((SECONDS - start)) s in all"
exit "$status"
