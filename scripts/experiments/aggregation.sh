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
    emb=$OUT/emb/seg-$enc.parquet pred=$OUT/probe/seg-$enc.parquet log=$OUT/probe/seg-$enc.log
    embed_once "$emb" "${src[@]}"
    # each step only when its input is newer than its output (FORCE=1: all again), as probe_embeddings does
    if [ -n "${FORCE:-}" ] || [ ! "$pred" -nt "$emb" ]; then
        : > "$log"
        probe_to challenge "$emb" "$pred" "$log"
    fi
    for how in max mean min; do
        report=$OUT/eval/seg-$enc-$how.json
        if [ -n "${FORCE:-}" ] || [ ! "$report" -nt "$pred" ]; then
            evaluate_to challenge "$pred" "$report" "$log" --aggregate "$how"
        fi
    done
done
for level in segment record; do
    echo "### $level level"
    "$PY" "$ROOT/scripts/experiments/summarize.py" --level "$level" \
        "$OUT"/eval/seg-recipe-{max,mean,min}.json "$OUT"/eval/seg-random-{max,mean,min}.json
done
