#!/usr/bin/env bash
# Fused optimizer path on a CUDA machine, in a few minutes: the CUDA parity tests, then the GPU
# step benchmark (100M, GPT-2 small shapes, 1B). Everything needed is printed; with $OUT set,
# the benchmark's JSON and this log are written there too.
#   bash benchmarks/gpu_check.sh            (python3 with a CUDA torch; run from anywhere)
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-8}
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  echo "== CUDA tests of the fused path"
  timeout 220 $PY -m pytest tests/optim/test_fast_cuda.py -q -p no:cacheprovider --durations=5 2>&1 | tail -30
  echo "== GPU benchmark"
  timeout 300 $PY benchmarks/optim_step.py --device cuda --rounds 30 --json "$OUT/optim_step_cuda.json" 2>&1
  date -u
} 2>&1 | tee "$OUT/gpu_check.log"
