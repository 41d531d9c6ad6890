#!/usr/bin/env bash
# One device call: build for sm_90, run the CUDA tests, run the GPU benchmarks; logs under $OUT.
# Usage on the lent GPU machine: bash scripts/gpu_check.sh   (OUT defaults to ./out)
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=9.0 ALPHAQUANT_CUDA=1 MAX_JOBS=16
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
# Build and keep the compiler's register/spill report (-Xptxas -v is added through NVCC_APPEND_FLAGS).
NVCC_APPEND_FLAGS="-Xptxas -v" pip install --no-build-isolation -e . > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
grep -E "spill|registers" "$OUT/build.log" | sort | uniq -c | sort -rn | head -40 > "$OUT/ptxas.txt"
python -m pytest tests -q -x 2>&1 | tee "$OUT/tests.log" | tail -5
python scripts/test_new_quantizers.py 2>&1 | tee -a "$OUT/tests.log" | tail -2
python benchmarks/bench_codecs.py --device cuda --numel $((1 << 26)) --no-reference 2>&1 | tee "$OUT/bench_codecs.txt"
python benchmarks/bench_codecs.py --device cuda --numel $((1 << 26)) --dtype bfloat16 --no-reference 2>&1 | tee -a "$OUT/bench_codecs.txt"
python benchmarks/bench_linear.py --device cuda 2>&1 | tee "$OUT/bench_linear.txt"
