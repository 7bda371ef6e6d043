#!/usr/bin/env bash
# RLM ablation: the laptop recipe with and without random lead masking (--no-rlm), each probed on lead subsets
# (all 12; the six limb leads; I and II; I alone: the other leads zeroed by `embed --leads`), beside random-init.
# Usage: scripts/experiments/rlm_ablation.sh [MAX_TIME] (default 15m; the RLM run is laptop_recipe.sh's)
source "$(dirname "$0")/common.sh"
MAX_TIME=${1:-15m}
prepare_data
RLM=$OUT/runs/small-$MAX_TIME
NORLM=$OUT/runs/small-$MAX_TIME-no-rlm
[ -f "$RLM/summary.json" ] || RUN=$RLM bash "$(dirname "$0")/laptop_recipe.sh" "$MAX_TIME"
if [ ! -f "$NORLM/summary.json" ]; then
    step "pretrain: --preset small --no-rlm --max-time $MAX_TIME -> $NORLM"
    rm -rf "$NORLM"
    "$ECGFM" pretrain "$SEG" --preset small --no-rlm --max-time "$MAX_TIME" --save-every 100000 --log-every 25 \
        ${PRETRAIN_ARGS:-} -o "$NORLM"
fi
declare -A SUBSETS=([12]="" [limb6]="I,II,III,aVR,aVL,aVF" [I-II]="I,II" [I]="I")
for subset in 12 limb6 I-II I; do
    leads=()
    [ -n "${SUBSETS[$subset]}" ] && leads=(--leads "${SUBSETS[$subset]}")
    probe_encoder "rlm-$subset" --model "$RLM" "${leads[@]}"
    probe_encoder "no-rlm-$subset" --model "$NORLM" "${leads[@]}"
    probe_encoder "random-$subset" --random-init --preset small --seed 0 "${leads[@]}"
    table "rlm-$subset" "no-rlm-$subset" "random-$subset"
done
