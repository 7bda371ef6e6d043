#!/usr/bin/env bash
# Learning curve: probe AUROC against pretraining updates, from the checkpoints of ONE run (laptop_recipe.sh's by
# default), update 0 being a random-init encoder; the figure in OUT/RUN-learning-curve.png.
# Usage: scripts/experiments/learning_curve.sh [RUN]
source "$(dirname "$0")/common.sh"
RUN=${1:-$OUT/runs/small-15m}
name=$(basename "$RUN")
prepare_data
probe_encoder random-small-seed0 --random-init --preset small --seed 0
rows=(random-small-seed0)
for ck in $(ls -d "$RUN"/checkpoint-* | sort -V); do
    u=${ck##*-}
    probe_encoder "$name-u$u" --model "$ck"
    rows+=("$name-u$u")
done
table "${rows[@]}"
randoms=()
for seed in 0 1 2; do [ -f "$OUT/eval/random-small-seed$seed.json" ] && randoms+=("random-small-seed$seed"); done
"$PY" "$ROOT/scripts/experiments/plot_learning_curve.py" "$OUT/eval" --runs "$name" --random "${randoms[@]}" \
    -o "$OUT/$name-learning-curve.png"
