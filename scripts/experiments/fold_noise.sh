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
        r=$OUT/eval/$name-folds$s
        reports+=("$r.json")
        if [ -z "${FORCE:-}" ] && [ "$r.json" -nt "$emb" ] && [ "$r.demo.json" -nt "$emb" ]; then continue; fi
        log=$OUT/probe/$name-folds$s.log
        "$ECGFM" probe "$emb" --labels "$EVAL_LABELS" --label-map challenge2021 --folds 5 --seed "$s" \
            -o "$OUT/probe/$name-folds$s.parquet" 2> "$log"
        "$ECGFM" evaluate "$OUT/probe/$name-folds$s.parquet" --labels "$EVAL_LABELS" --label-map challenge2021 \
            --bootstrap 0 -o "$r.json" > /dev/null 2>> "$log"
        "$ECGFM" probe "$emb" --labels "$EVAL_DEMO" --folds 5 --seed "$s" \
            -o "$OUT/probe/$name-folds$s.demo.parquet" 2>> "$log"
        "$ECGFM" evaluate "$OUT/probe/$name-folds$s.demo.parquet" --labels "$EVAL_DEMO" --bootstrap 0 \
            -o "$r.demo.json" > /dev/null 2>> "$log"
    done
done
"$PY" "$ROOT/scripts/experiments/summarize.py" --spread "${reports[@]}"
