#!/usr/bin/env bash
# RLM ablation: the laptop recipe with and without random lead masking (--no-rlm), each probed on lead subsets
# (all 12; the six limb leads; I and II; I alone: the other leads zeroed by `embed --leads`), beside random-init.
# The two runs pretrain side by side with one thread each (same conditions for both, whatever the machine's load);
# the RLM run keeps a checkpoint every 250 updates (learning_curve.sh OUT/runs/small-MAX_TIME-t1).
# Usage: scripts/experiments/rlm_ablation.sh [MAX_TIME] (default 15m)
source "$(dirname "$0")/common.sh"
MAX_TIME=${1:-15m}
prepare_data
RLM=$OUT/runs/small-$MAX_TIME-t1
NORLM=$OUT/runs/small-$MAX_TIME-t1-no-rlm
pids=()
if needs_pretraining "$RLM"; then
    step "pretrain: --preset small --threads 1 --max-time $MAX_TIME -> $RLM"
    rm -rf "$RLM"
    "$ECGFM" pretrain "$SEG" --preset small --threads 1 --max-time "$MAX_TIME" --save-every 250 --keep-last 0 \
        --log-every 25 ${PRETRAIN_ARGS:-} -o "$RLM" > "$RLM.log" 2>&1 &
    pids+=($!)
fi
if needs_pretraining "$NORLM"; then
    step "pretrain: --preset small --no-rlm --threads 1 --max-time $MAX_TIME -> $NORLM"
    rm -rf "$NORLM"
    "$ECGFM" pretrain "$SEG" --preset small --no-rlm --threads 1 --max-time "$MAX_TIME" --save-every 100000 \
        --log-every 25 ${PRETRAIN_ARGS:-} -o "$NORLM" > "$NORLM.log" 2>&1 &
    pids+=($!)
fi
for pid in "${pids[@]}"; do wait "$pid"; done
declare -A SUBSETS=([12]="" [limb6]="I,II,III,aVR,aVL,aVF" [I-II]="I,II" [I]="I")
for subset in 12 limb6 I-II I; do
    leads=()
    [ -n "${SUBSETS[$subset]}" ] && leads=(--leads "${SUBSETS[$subset]}")
    probe_encoder "rlm-$subset" --model "$RLM" "${leads[@]}"
    probe_encoder "no-rlm-$subset" --model "$NORLM" "${leads[@]}"
    probe_encoder "random-$subset" --random-init --preset small --seed 0 "${leads[@]}"
    table "rlm-$subset" "no-rlm-$subset" "random-$subset"
done
