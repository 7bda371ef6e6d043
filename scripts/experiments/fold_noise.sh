#!/usr/bin/env bash
# How much the out-of-fold figures move with the folds alone: the embeddings of each named encoder (already made
# by the other scripts, in OUT/emb/NAME.parquet) probed again with other fold seeds (`probe --seed S`, S in
# FOLD_SEEDS, default "1 2 3 4"; seed 0 is every other script's), then each encoder's mean and range over the
# seeds 0 + FOLD_SEEDS. Usage: scripts/experiments/fold_noise.sh [NAME...]
# (default: the laptop recipe's encoder and the three random-init ones of laptop_recipe.sh)
source "$(dirname "$0")/common.sh"
FOLD_SEEDS=${FOLD_SEEDS:-"1 2 3 4"}
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(small-15m random-small-seed0 random-small-seed1 random-small-seed2)
reports=()
for name in "${names[@]}"; do
    emb=$OUT/emb/$name.parquet
    [ -f "$emb" ] || { echo "fold_noise: $emb is missing: run the script that probes $name first" >&2; exit 2; }
    reports+=("$OUT/eval/$name.json")
    for s in $FOLD_SEEDS; do
        probe_embeddings "$emb" "$name-folds$s" --seed "$s"
        reports+=("$OUT/eval/$name-folds$s.json")
    done
done
"$PY" "$ROOT/scripts/experiments/summarize.py" --spread "${reports[@]}"
