#!/usr/bin/env bash
# THE key experiment (docs/experiments.md): the laptop recipe, `ecgfm pretrain --preset small --max-time 15m` on
# 2 CPU cores, against a random-init encoder of the same size, by out-of-fold linear probes (record-level,
# 5 folds) on the held-out 12-lead Challenge 2020/2021 cohort. Checkpoints every SAVE_EVERY updates are kept
# for learning_curve.sh. Usage: scripts/experiments/laptop_recipe.sh [MAX_TIME] (default 15m)
source "$(dirname "$0")/common.sh"
MAX_TIME=${1:-15m}
RUN=${RUN:-$OUT/runs/small-$MAX_TIME}
SAVE_EVERY=${SAVE_EVERY:-250}
prepare_data
if needs_pretraining "$RUN"; then
    step "pretrain: --preset small --max-time $MAX_TIME -> $RUN"
    rm -rf "$RUN"
    "$ECGFM" pretrain "$SEG" --preset small --max-time "$MAX_TIME" --save-every "$SAVE_EVERY" --keep-last 0 \
        --log-every 25 ${PRETRAIN_ARGS:-} -o "$RUN"
fi
step "probe: the recipe's encoder and random-init ones (3 seeds)"
probe_encoder "small-$MAX_TIME" --model "$RUN"
for seed in 0 1 2; do probe_encoder "random-small-seed$seed" --random-init --preset small --seed "$seed"; done
table "small-$MAX_TIME" random-small-seed0 random-small-seed1 random-small-seed2
