#!/usr/bin/env bash
# Install ecgfm into .venv (CPU PyTorch 2.13.0 wheel) and run the demo chain on the committed sample records.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q "torch==2.13.0" -e ".[plots]"
OUT="${1:-demo-out}"
rm -rf "$OUT"
export PATH="$PWD/.venv/bin:$PATH"
echo "== ingest | segment: sample_data/ -> $OUT/segments"
ecgfm ingest sample_data/ --fs 500 --rejects "$OUT/ingest-rejects.parquet" | ecgfm segment -o "$OUT/segments"

