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

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/alphaquant-sanitize.XXXXXX")
if [[ "${KEEP:-0}" != 1 ]]; then trap 'rm -rf "$WORK"' EXIT; fi
start=$SECONDS

echo "sanitized copy: $WORK"
cd "$ROOT"
git ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do [[ -f "$f" || -L "$f" ]] && printf '%s\0' "$f"; done |
    tar --null -T - -cf - | tar -xf - -C "$WORK"

cd "$WORK"
echo "building (ALPHAQUANT_SANITIZE=1, CPU kernels only)..."
if ! CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} ALPHAQUANT_CUDA=0 ALPHAQUANT_SANITIZE=1 MAX_JOBS=${MAX_JOBS:-2} \
        "$PYTHON" setup.py build_ext --inplace >build.log 2>&1; then
    tail -n 40 build.log
    echo "sanitized build failed (log: $WORK/build.log)" >&2
    exit 1
fi
echo "built in $((SECONDS - start)) s"

LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
export LD_PRELOAD
export ASAN_OPTIONS=detect_leaks=0
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
export PYTHONPATH="$WORK${PYTHONPATH:+:$PYTHONPATH}"

# The copy, not an installed alphaquant, must be what the tests import.
"$PYTHON" -c "import alphaquant, sys; sys.exit(not alphaquant.__file__.startswith('$WORK'))" || {
    echo "the tests would not import the sanitized copy" >&2
    exit 1
}

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
