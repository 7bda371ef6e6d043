#!/usr/bin/env bash
# Segment aggregation: probe per 5 s segment (segment embeddings), then record scores by max / mean / min of the
# segment probabilities (`evaluate --aggregate`), beside segment-level AUROC, for the recipe's encoder and a
# random-init one. Usage: scripts/experiments/aggregation.sh [CHECKPOINT] (default: laptop_recipe.sh's run)
source "$(dirname "$0")/common.sh"
CKPT=${1:-$OUT/runs/small-15m}
prepare_data
mkdir -p "$OUT/emb" "$OUT/probe" "$OUT/eval"
for enc in recipe random; do
    if [ "$enc" = recipe ]; then src=(--model "$CKPT"); else src=(--random-init --preset small --seed 0); fi
    emb=$OUT/emb/seg-$enc.parquet
    embed_once "$emb" "${src[@]}"
    if [ -n "${FORCE:-}" ] || [ ! "$OUT/eval/seg-$enc-min.json" -nt "$emb" ]; then
        "$ECGFM" probe "$emb" --labels "$EVAL_LABELS" --label-map challenge2021 --folds 5 \
            -o "$OUT/probe/seg-$enc.parquet" 2> "$OUT/probe/seg-$enc.log"
    fi
    for how in max mean min; do
        "$ECGFM" evaluate "$OUT/probe/seg-$enc.parquet" --labels "$EVAL_LABELS" --label-map challenge2021 \
            --aggregate "$how" --bootstrap 0 -o "$OUT/eval/seg-$enc-$how.json" > /dev/null 2>&1
    done
done
for level in segment record; do
    echo "### $level level"
    "$PY" "$ROOT/scripts/experiments/summarize.py" --level "$level" \
        "$OUT"/eval/seg-recipe-{max,mean,min}.json "$OUT"/eval/seg-random-{max,mean,min}.json
done
