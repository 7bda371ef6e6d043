#!/usr/bin/env bash
# Learning curve: probe AUROC against pretraining updates, from the checkpoints of ONE run (laptop_recipe.sh's by
# default), update 0 being a random-init encoder. Usage: scripts/experiments/learning_curve.sh [RUN]
source "$(dirname "$0")/common.sh"
RUN=${1:-$OUT/runs/small-15m}
name=$(basename "$RUN")
prepare_data
[ -f "$OUT/eval/random-small-seed0.json" ] || probe_encoder random-small-seed0 --random-init --preset small --seed 0
rows=(random-small-seed0)
for ck in $(ls -d "$RUN"/checkpoint-* | sort -V); do
    u=${ck##*-}
    [ -f "$OUT/eval/$name-u$u.json" ] || probe_encoder "$name-u$u" --model "$ck"
    rows+=("$name-u$u")
done
table "${rows[@]}"
