#!/usr/bin/env bash
# Issue 17 item 6, on a machine with a CUDA GPU: pretrain `base` (the reference recipe: 1,024 segments per update
# by accumulation, fixed lr 5e-5, per-update Gumbel decay; bf16 autocast) for MAX_TIME on the pretraining sets of
# ../shared/data, then the same out-of-fold probes as laptop_recipe.sh beside a random-init base encoder. The
# card's name is printed with the table. Usage: scripts/experiments/gpu_base.sh [MAX_TIME] (default 10m)
source "$(dirname "$0")/common.sh"
MAX_TIME=${1:-10m}
RUN=$OUT/runs/base-gpu-$MAX_TIME
prepare_data
"$PY" -c "import torch; print('GPU:', torch.cuda.get_device_name())"
if needs_pretraining "$RUN"; then
    rm -rf "$RUN"
    "$ECGFM" pretrain "$SEG" --preset base --device cuda --max-time "$MAX_TIME" --save-every 100000 --log-every 5 \
        --workers 4 -o "$RUN"
fi
probe_encoder "base-gpu-$MAX_TIME" --model "$RUN" --device cuda
probe_encoder random-base --random-init --preset base --seed 0 --device cuda
table "base-gpu-$MAX_TIME" random-base
