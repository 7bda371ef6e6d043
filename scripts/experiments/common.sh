# Shared by the experiment scripts (docs/experiments.md): paths, data preparation, and "probe an encoder".
# Source it; every variable can be overridden from the environment:
#   DATA     ../shared/data (the project's real ECG files)
#   OUT      experiments-out/ (everything is written here; re-runs reuse the prepared data)
#   ECGFM    .venv/bin/ecgfm      PY  .venv/bin/python      THREADS  torch threads for embed (default 2)
#   FORCE    set: probe and evaluate an encoder again even if its evaluation is there (its embeddings are reused
#            while they are newer than every file of the checkpoint they came from; REEMBED=1 embeds again too)
#   PROBE_ONLY  set: never pretrain; a script whose run is missing stops, one whose run has no summary.json (an
#            interrupted run) probes its latest checkpoint. `PROBE_ONLY=1 FORCE=1` re-probes an earlier OUT.
#   PRETRAIN_ARGS  extra `ecgfm pretrain` options for every run (e.g. "--threads 1" on a loaded machine)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DATA=${DATA:-$ROOT/../shared/data}
OUT=${OUT:-$ROOT/experiments-out}
ECGFM=${ECGFM:-$ROOT/.venv/bin/ecgfm}
PY=${PY:-$ROOT/.venv/bin/python}
THREADS=${THREADS:-2}
#: the labelled evaluation cohort (12-lead, SNOMED codes -> the 26 Challenge-2021 labels); never pretrained on
EVAL_SETS=${EVAL_SETS:-physionet_challenge_2020_2021}
#: left out of pretraining too: the evaluation cohort, cpsc2018 (the same recordings as its A* records) and
#: cpsc2021 (2-lead AF recordings, used by cmsc_pairs.sh)
HELD_OUT=${HELD_OUT:-"$EVAL_SETS cpsc2018 cpsc2021"}
SEG=$OUT/data/pretrain-segments
EVAL_SEG=$OUT/data/eval-segments
EVAL_LABELS=$OUT/data/eval-records/labels-s00000of00001.parquet
EVAL_DEMO=$OUT/data/eval-demographics.csv

step() { printf '\n== %s (%s)\n' "$*" "$(date -u +%H:%M:%S)" >&2; }

link_sets() {  # link_sets DIR NAME... : a folder of links to the named ../shared/data sets
    local dir=$1; shift
    mkdir -p "$dir"
    for name in "$@"; do ln -sfn "$DATA/$name" "$dir/$name"; done
}

prepare_data() {
    # Pretraining segments from every set of $DATA except $HELD_OUT; evaluation segments from $EVAL_SETS.
    [ -f "$SEG/_done-s00000of00001.json" ] && [ -f "$EVAL_SEG/_done-s00000of00001.json" ] && return 0
    step "prepare data: $DATA -> $OUT/data"
    rm -rf "$OUT/data"
    local keep=()
    for d in "$DATA"/*/; do
        d=$(basename "$d")
        case " $HELD_OUT " in *" $d "*) ;; *) keep+=("$d") ;; esac
    done
    link_sets "$OUT/data/in-pretrain" "${keep[@]}"
    # shellcheck disable=SC2086
    link_sets "$OUT/data/in-eval" $EVAL_SETS
    # --fs/--gain: the header-less CinC 2011 CSV files (500 Hz, about 200 units per mV)
    "$ECGFM" ingest "$OUT"/data/in-pretrain/* -o "$OUT/data/pretrain-records" --fs 500 --gain 200 --workers 2
    "$ECGFM" segment "$OUT/data/pretrain-records" -o "$SEG" --workers 2
    "$ECGFM" ingest "$OUT"/data/in-eval/* -o "$OUT/data/eval-records" --workers 2
    "$ECGFM" segment "$OUT/data/eval-records" -o "$EVAL_SEG" --workers 2
    demographics
}

demographics() {  # a second, balanced target: sex (male 0/1) and age (continuous) of the evaluation records
    "$PY" - "$EVAL_SEG" "$EVAL_DEMO" <<'PYEOF'
import sys
from pathlib import Path
import pyarrow.parquet as pq
cols = ["record_id", "patient_id", "age", "sex"]
t = pq.read_table(sorted(Path(sys.argv[1]).glob("segments-*.parquet"))[0], columns=cols).to_pandas()
t = t.drop_duplicates("record_id")
t["male"] = t["sex"].map({"M": 1, "F": 0})
t[["record_id", "patient_id", "male", "age"]].to_csv(sys.argv[2], index=False)
PYEOF
}

needs_pretraining() {  # needs_pretraining RUN: true when RUN must be (re)trained; with PROBE_ONLY, never
    local run=$1
    [ -f "$run/summary.json" ] && return 1
    if [ -n "${PROBE_ONLY:-}" ]; then
        if [ -f "$run/latest" ] || compgen -G "$run/checkpoint-*" > /dev/null; then
            echo "PROBE_ONLY: $run has no summary.json (interrupted?); probing its latest checkpoint" >&2
            return 1
        fi
        echo "PROBE_ONLY: $run has no checkpoint; run this script without PROBE_ONLY to pretrain it" >&2
        exit 2
    fi
    return 0
}

embed_once() {
    # embed_once OUTFILE [embed options...]: `ecgfm embed` of the evaluation segments into OUTFILE, unless OUTFILE
    # is there and newer than every file of its --model (random-init encoders are deterministic: always reused);
    # REEMBED=1 embeds again.
    local out=$1; shift
    if [ -z "${REEMBED:-}" ] && [ -f "$out" ]; then
        local model="" prev=""
        for a in "$@"; do [ "$prev" = --model ] && model=$a; prev=$a; done
        if [ -z "$model" ] || [ -z "$(find -L "$model" -newer "$out" -type f -print -quit)" ]; then
            return 0
        fi
    fi
    "$ECGFM" embed "$EVAL_SEG" "$@" --threads "$THREADS" -o "$out"
}

probe_to() {
    # probe_to TARGET EMB PRED LOG [probe options...]: `ecgfm probe --folds 5` (out-of-fold logistic probes) of the
    # embeddings EMB into PRED, its messages appended to LOG. TARGET: `challenge` (the evaluation cohort's
    # Challenge-2021 labels) or `demo` (sex and age, $EVAL_DEMO).
    local target=$1 emb=$2 pred=$3 log=$4; shift 4
    target_labels "$target"
    "$ECGFM" probe "$emb" "${TARGET_LABELS[@]}" --folds 5 "$@" -o "$pred" 2>> "$log"
}

evaluate_to() {
    # evaluate_to TARGET PRED REPORT LOG [evaluate options...]: `ecgfm evaluate --bootstrap 0` of the predictions
    # PRED for TARGET (as probe_to) into the report REPORT, its messages appended to LOG.
    local target=$1 pred=$2 report=$3 log=$4; shift 4
    target_labels "$target"
    "$ECGFM" evaluate "$pred" "${TARGET_LABELS[@]}" "$@" --bootstrap 0 -o "$report" > /dev/null 2>> "$log"
}

target_labels() {  # target_labels challenge|demo: sets TARGET_LABELS to that target's `--labels` options
    case $1 in
        challenge) TARGET_LABELS=(--labels "$EVAL_LABELS" --label-map challenge2021) ;;
        demo) [ -f "$EVAL_DEMO" ] || demographics
              TARGET_LABELS=(--labels "$EVAL_DEMO") ;;
        *) echo "target_labels: unknown target '$1' (challenge or demo)" >&2; exit 2 ;;
    esac
}

probe_embeddings() {
    # probe_embeddings EMB NAME [probe options...]: both targets' probes of the embeddings EMB and their metrics in
    # $OUT/eval/NAME.json and NAME.demo.json (predictions in $OUT/probe/NAME.parquet and NAME.demo.parquet, messages
    # in $OUT/probe/NAME.log); nothing is done while both reports are newer than EMB (FORCE=1 probes again). The
    # options go to both probes (fold_noise.sh: --seed S, other folds).
    local emb=$1 name=$2; shift 2
    local pred=$OUT/probe/$name report=$OUT/eval/$name log=$OUT/probe/$name.log
    if [ -z "${FORCE:-}" ] && [ "$report.json" -nt "$emb" ] && [ "$report.demo.json" -nt "$emb" ]
    then return 0  # probed since its embeddings were made
    fi
    mkdir -p "$OUT/probe" "$OUT/eval"
    : > "$log"
    probe_to challenge "$emb" "$pred.parquet" "$log" "$@"
    evaluate_to challenge "$pred.parquet" "$report.json" "$log"
    probe_to demo "$emb" "$pred.demo.parquet" "$log" "$@"
    evaluate_to demo "$pred.demo.parquet" "$report.demo.json" "$log"
}

probe_encoder() {
    # probe_encoder NAME [embed options...]: record-level (mean-pooled) embeddings of the evaluation cohort in
    # $OUT/emb/NAME.parquet, then probe_embeddings of them. NAME is also the row name; the embed options say which
    # encoder (--model CKPT, or --random-init --preset P).
    local name=$1; shift
    mkdir -p "$OUT/emb"
    embed_once "$OUT/emb/$name.parquet" "$@" --pool record
    probe_embeddings "$OUT/emb/$name.parquet" "$name"
}

table() {  # table NAME...: one Markdown row per evaluated encoder (AF, macro of the common labels, sex, age)
    local reports=() n
    for n in "$@"; do reports+=("$OUT/eval/$n.json"); done
    "$PY" "$ROOT/scripts/experiments/summarize.py" "${reports[@]}"
}
