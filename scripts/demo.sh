#!/usr/bin/env bash
# Install ecgfm into .venv (CPU PyTorch 2.13.0 wheel), then run the whole chain on the committed sample records:
# ingest -> segment -> pretrain (tiny) -> embed -> probe -> evaluate, and finetune -> evaluate. A few minutes on a CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q "torch==2.13.0" -e ".[plots]"
OUT="${1:-demo-out}"
rm -rf "$OUT"
mkdir -p "$OUT"
export PATH="$PWD/.venv/bin:$PATH"
LABELS=examples/demo_labels.csv

step() { printf '\n== %s\n' "$*" >&2; }

step "ingest | segment: sample_data/ -> $OUT/segments"
ecgfm ingest sample_data/ --fs 500 --rejects "$OUT/ingest-rejects.parquet" | ecgfm segment -o "$OUT/segments"

step "pretrain a tiny ECG-FM (W2V + CMSC + RLM) for 150 updates on CPU"
ecgfm pretrain "$OUT/segments" --preset tiny --max-updates 150 --batch-size 16 --lr 5e-4 --log-every 25 \
  -o "$OUT/pretrain"

step "embed with the pretrained encoder and with a random-init one (the probe's baseline)"
ecgfm embed "$OUT/segments" --model "$OUT/pretrain" -o "$OUT/emb.parquet"
ecgfm embed "$OUT/segments" --random-init --preset tiny -o "$OUT/emb-random.parquet"

step "linear probe (atrial fibrillation, sinus rhythm) and its metrics"
ecgfm probe "$OUT/emb.parquet" --labels "$LABELS" --baseline "$OUT/emb-random.parquet" -o "$OUT/probe.parquet"
ecgfm evaluate "$OUT/probe.parquet" --labels "$LABELS" --aggregate label --bootstrap 200 \
  --baseline "$OUT/probe.baseline.parquet" -o "$OUT/probe-metrics.json"

step "finetune the pretrained encoder and evaluate per record (ECG-FM's label-specific aggregation)"
ecgfm finetune "$OUT/segments" --init "$OUT/pretrain" --labels "$LABELS" --epochs 40 --patience 10 --lr 1e-3 -o "$OUT/finetune"
ecgfm evaluate "$OUT/finetune/predictions.parquet" --labels "$LABELS" --aggregate label --bootstrap 200 \
  -o "$OUT/finetune-metrics.json" --plots "$OUT/plots"

step "done: artifacts and reports are in $OUT/"
