#!/usr/bin/env bash
# Runs the CPU test suite with every fast path off: the C++ kernels built for the plain x86-64
# baseline (ALPHAQUANT_NO_AVX2=1: no AVX2/FMA/F16C code from the compiler's flags) and the kernels
# chosen at run time by CPUID held to their portable C++ (ALPHAQUANT_CPU_ISA=portable). This is
# what a CPU without AVX2, or a non-x86 machine, runs; CI runs it so that those paths stay correct.
# The build lives in a copy of the working tree (scripts/build_copy.sh).
#
# Usage: scripts/run_portable_tests.sh [pytest arguments]   (default: tests -m "not slow and not cuda")
# Environment: PYTHON (default python), MAX_JOBS (default 2), KEEP=1 keeps the temporary copy.
set -euo pipefail

start=$SECONDS
. "$(dirname "$0")/build_copy.sh"
build_copy portable ALPHAQUANT_NO_AVX2=1
echo "built in $((SECONDS - start)) s"
export ALPHAQUANT_CPU_ISA=portable
check_copy_imported
"$PYTHON" -c "
import alphaquant._build_isa as b, alphaquant.ops as o
assert b.BUILT_FOR == 'baseline' and o.cpu_isa() == 'portable', (b.BUILT_FOR, o.cpu_isa())
print('kernels built for', b.BUILT_FOR, '; run-time choice', o.cpu_isa())"

if [[ $# -eq 0 ]]; then set -- tests -m "not slow and not cuda"; fi
"$PYTHON" -m pytest -q -p no:cacheprovider "$@"
echo "portable tests: $((SECONDS - start)) s in all"
