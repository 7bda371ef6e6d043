#!/usr/bin/env bash
# Data scaling: probe AUROC against the number of pretraining records, at a fixed budget per run (MAX_TIME,
# default 4m): the recipe on 1/4, 1/2 and all of the pretraining records (the subsets are `ecgfm ingest --shard 0/N`
# of the same input files, so records are never split). Usage: scripts/experiments/data_scaling.sh [MAX_TIME]
source "$(dirname "$0")/common.sh"
MAX_TIME=${1:-4m}
prepare_data
rows=()
for part in 4 2 1; do
    seg=$OUT/data/pretrain-segments-1of$part
    if [ "$part" = 1 ]; then seg=$SEG
    elif [ ! -f "$seg/_done-s00000of00001.json" ]; then
        rm -rf "$OUT/data/pretrain-records-1of$part" "$seg"
        "$ECGFM" ingest "$OUT"/data/in-pretrain/* -o "$OUT/data/pretrain-records-1of$part" --fs 500 --gain 200 \
            --shard "0/$part" --workers 2
        # one shard of N on purpose: --allow-partial reads it without the others
        "$ECGFM" segment "$OUT/data/pretrain-records-1of$part" -o "$seg" --workers 2 --allow-partial
    fi
    run=$OUT/runs/scaling-1of$part-$MAX_TIME
    if needs_pretraining "$run"; then
        rm -rf "$run"
        "$ECGFM" pretrain "$seg" --preset small --max-time "$MAX_TIME" --save-every 100000 --log-every 25 \
            ${PRETRAIN_ARGS:-} -o "$run"
    fi
    probe_encoder "scaling-1of$part" --model "$run"
    rows+=("scaling-1of$part")
done
probe_encoder random-small-seed0 --random-init --preset small --seed 0
table "${rows[@]}" random-small-seed0
