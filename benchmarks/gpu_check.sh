#!/usr/bin/env bash
# Everything sgdlab measures on a CUDA machine, in under ten minutes (the section timeouts add
# up to 570 s, within one 600-second device call; about two minutes when nothing hangs): the
# CUDA tests (fused and capturable optimizer paths, CUDA-graph replay, the augmented backward on
# the device), the augmented-backward benchmark against its peers (those installed), its A/B
# against an earlier commit (OLD=rev, default HEAD~2) with the bare hook probe, a profile of its
# steps (host or device bound, the extra operators and kernels), its memory under activation
# checkpointing, and the optimizer-step benchmark (Adam at 100M, GPT-2 small shapes, 1B; other
# algorithms with ALGOS=adam,sgd,rmsprop). With $OUT set, the logs and the step benchmark's JSON
# are written there too.
#   bash benchmarks/gpu_check.sh            (python3 with a CUDA torch; run from anywhere)
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp}
ALGOS=${ALGOS:-adam}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-8}
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  echo "== CUDA tests (fused optimizer path, capturable, CUDA graph, augmented backward)"
  timeout 120 $PY -m pytest tests/optim/test_fast_cuda.py tests/stats/test_stats_devices.py \
    -q -p no:cacheprovider --durations=5 2>&1 | tail -30
  echo "== augmented backward"
  timeout 100 $PY benchmarks/augmented_backward.py --repeat 50 2>&1
  echo "== augmented backward A/B against \$OLD (default HEAD~2), with the bare hook probe (floor)"
  timeout 100 $PY benchmarks/augmented_backward_ab.py --old "${OLD:-HEAD~2}" --rounds 100 2>&1
  echo "== augmented backward profile (host or device bound; sgdlab's extra operators and kernels)"
  timeout 60 $PY benchmarks/augmented_backward_profile.py --steps 20 2>&1 | grep -v USDT
  echo "== augmented backward under activation checkpointing (memory held after the forward)"
  timeout 50 $PY benchmarks/augmented_backward_checkpoint.py --rounds 10 2>&1
  echo "== optimizer step"
  timeout 140 $PY benchmarks/optim_step.py --device cuda --algos "$ALGOS" --rounds 30 \
    --json "$OUT/optim_step_cuda.json" 2>&1
  date -u
} 2>&1 | tee "$OUT/gpu_check.log"
