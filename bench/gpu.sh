#!/usr/bin/env bash
# The speed table on one CUDA GPU: bf16 autocast, channels_last, BN folding for inference,
# and torch.compile (compilation timed separately: the *_first_s columns), in under 8 minutes.
#
#   bash bench/gpu.sh            # from the repo root; needs python3 with torch, timm, numpy
#
# Prints the tables and writes bench/results/gpu-<card>-*.json (to $OUT when it is set).
# Resolution 224 and batch 128 keep a GPU busy; override with RES=... BATCH=....
# DEVICE=cpu RES=32 BATCH=4 bash bench/gpu.sh checks the script's plumbing without a GPU (the
# smoke test is skipped; about 8 minutes on 2 cores, where compilation runs out of time).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
RES=${RES:-224}
BATCH=${BATCH:-128}
DEST=${OUT:-bench/results}
mkdir -p "$DEST"
DEVICE=${DEVICE:-cuda}
CARD=$($PY -c "import torch; print(torch.cuda.get_device_name(0) if '$DEVICE' == 'cuda' else 'cpu')" \
  | tr -c 'A-Za-z0-9\n' '-' | tr -s '-' | sed 's/-$//' | tr 'A-Z' 'a-z')
COMMON=(--device "$DEVICE" --resolution "$RES" --batch "$BATCH" --warmup 2 --steps 5 --model-timeout 60
        --channels-last --amp bf16 --out "$DEST")
# The targets' models first, so a run that runs out of time loses the least-needed rows.
HEAD=(resnet50 qlnet50_eq3_softball_ds qlnet50_glb_softball_ds)
SUBSET=("${HEAD[@]}" qlnet50_eq5_softball_ds)
MODELS=("${HEAD[@]}" $($PY -c "import qlnas; from qlnas.models.complexity import TABLE1
print(' '.join(m for m in TABLE1 if m not in '${HEAD[*]}'.split()))"))
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv || true
start=$SECONDS
# 0. The training path on CUDA (nccl, bf16 autocast, channels_last), about 30 s.
if [[ $DEVICE == cuda ]]; then
  timeout 60 $PY bench/gpu_smoke.py 2>&1 | tee "$DEST/gpu-smoke.txt" || echo "gpu smoke failed"
fi
# 0b. Each depthwise kernel's bandwidth against the card's (Triton and cuDNN), about 30 s.
timeout 60 $PY -m qlnas.bench.kernels --device "$DEVICE" --dtype bfloat16 --resolution "$RES" \
  --batch "$BATCH" --out "$DEST" --label "gpu-$CARD-kernels" || echo "kernel run failed or timed out"
# 1. Every Table 1 model and glb softball, eager (about 4 minutes; 20 s a model on an H200).
timeout 300 $PY -m qlnas.bench.train_step "${COMMON[@]}" --fuse --models "${MODELS[@]}" --label "gpu-$CARD-eager" || echo "eager run failed or timed out"
# 1b. The Triton depthwise kernels (QLNAS_TRITON=1) against 1's cuDNN path (about 40 s).
QLNAS_TRITON=1 timeout 60 $PY -m qlnas.bench.train_step "${COMMON[@]}" --fuse \
  --models qlnet50_eq3_softball_ds resnet50 --label "gpu-$CARD-triton" || echo "triton run failed or timed out"
# 2. (The "before", reference layers, is gpu-nvidia-h200-reference.json from 2026-11-28: dropped
#    so the compiled runs fit.)
# 3. torch.compile on a subset (compilation dominates: about 1 minute per model).
left=$(( 450 - (SECONDS - start) ))
if (( left > 60 )); then
  timeout "$left" $PY -m qlnas.bench.train_step "${COMMON[@]}" --fuse --compile --models "${SUBSET[@]}" \
    --label "gpu-$CARD-compile" || echo "compile run failed or timed out"
fi
# 4. Each model's faster of eager and compiled, with the targets.
$PY -m qlnas.bench.report --best "$DEST/gpu-$CARD-eager.json" "$DEST/gpu-$CARD-compile.json" \
  --label "gpu-$CARD-best" --out "$DEST" || echo "best-of merge failed"
echo "gpu.sh done in $(( SECONDS - start )) s; results in $DEST"
