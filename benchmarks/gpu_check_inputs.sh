#!/usr/bin/env bash
# Make, on CPU, the inputs benchmarks/gpu_check.sh compares against, so the GPU machine's time goes to the checks.
#
#   bash benchmarks/gpu_check_inputs.sh DIR
#
# Writes DIR/segments (the committed Challenge 2021 sample through `ingest | segment`), DIR/run (3 updates of a
# tiny pretraining run: the model) and DIR/emb_cpu.parquet (its float32 CPU embeddings), then prints the
# gpu_check.sh command line to run on the GPU machine. Name a DIR that travels with the working tree there (the
# device tool's `carry`, e.g. .devcarry). Uses $PYTHON or .venv/bin/python.
set -euo pipefail
DIR=${1:?usage: gpu_check_inputs.sh DIR}
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
rm -rf "$DIR/segments" "$DIR/run" "$DIR/emb_cpu.parquet"
mkdir -p "$DIR"
$PY -m ecgfm_cli ingest sample_data/challenge2021 | $PY -m ecgfm_cli segment - -o "$DIR/segments"
$PY -m ecgfm_cli pretrain "$DIR/segments" --preset tiny --batch-size 8 --max-updates 3 --log-every 1 \
    --save-every 3 -o "$DIR/run"
MODEL="$DIR/run/$(cat "$DIR/run/latest")"
$PY -m ecgfm_cli embed "$DIR/segments" --model "$MODEL" --device cpu -o "$DIR/emb_cpu.parquet"
echo "check its MFU command lines here first: PYTHON=$PY bash benchmarks/gpu_check.sh --dry-run /tmp/gpu-check-dry"
echo "on the GPU machine: PYTHONPATH=. bash benchmarks/gpu_check.sh $DIR/segments $MODEL $DIR/emb_cpu.parquet \$OUT"
echo "(a fifth argument picks sections: fusions first, one device call of 600 s; then mfu,pretrain,embed)"
