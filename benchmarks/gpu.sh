#!/usr/bin/env bash
# Every GPU check, then the GPU benchmark, in one run on a machine with a CUDA device, torch
# and triton (about 10 minutes on an H100):
#   bash benchmarks/gpu.sh [OUTDIR]        (default benchmarks/results/gpu-run)
# 1. tests/triton_check.py cuda: the Triton kernels compiled for the GPU against the float64
#    oracle, a call under CUDA's synchronisation debugging, a CUDA-graph capture and replay;
# 2. tests/test_cuda.py: crossent on CUDA tensors against torch (its own copy of step 1 left out);
# 3. crossent bench --device cuda: the table, CSV and Markdown under OUTDIR.
# Each step's output is also written to OUTDIR; the exit status is 1 when any step failed.
set -uo pipefail
out=${1:-benchmarks/results/gpu-run}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
status=0
python3 -W ignore tests/triton_check.py cuda 2>&1 | tee "$out/triton_check.txt" || status=1
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "not compiled_for_the_gpu" 2>&1 \
    | tee "$out/test_cuda.txt" || status=1
python3 -m crossent bench --device cuda --out "$out" 2>&1 | tee "$out/bench.txt" || status=1
exit $status
