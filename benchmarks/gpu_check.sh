#!/usr/bin/env bash
# The GPU paths and GPU figures in one run, for a machine with CUDA (none of this runs in CI).
#
#   bash benchmarks/gpu_check.sh SEGMENTS MODEL CPU_EMBEDDINGS OUT_DIR
#
# SEGMENTS: an `ecgfm segment` output; MODEL: a checkpoint for it; CPU_EMBEDDINGS: `ecgfm embed SEGMENTS
# --model MODEL -o X.parquet` made on CPU (float32), to compare against. `bash benchmarks/gpu_check_inputs.sh DIR`
# makes all three on CPU beforehand and prints this script's command line. Runs, each under its own time limit so
# one failure does not hide the rest:
#   1. pretraining MFU of the base model, bf16: batch 128 per GPU eager, and 128, 256, 512 with --compile (the
#      256 run also prints where the GPU time goes, by kernel), 256 again reading each update's metrics at once
#      (the loop before the deferred read, for the A/B) and 256 with the layers under CUDA graphs;
#   2. `ecgfm pretrain --gpus 1 --compile` (bf16 autocast, compiled layers, checkpoints) on the tiny preset;
#   3. `ecgfm embed` on cuda in float32 and, through `--gpus 1`, in bfloat16, against the CPU embeddings;
#   4. embedding throughput of the base model on the GPU, ecgfm vs transformers (bench_embed.py).
# Results land in OUT_DIR (JSON, logs); a summary goes to stdout. Python: $PYTHON or python3, with ecgfm_cli
# importable (installed, or PYTHONPATH=.).
set -u
SEG=$1 MODEL=$2 CPU_EMB=$3 OUT=$4
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/ecgfm-inductor}
WORK=$(mktemp -d)
mkdir -p "$OUT"
status=0
step() {  # step NAME SECONDS CMD...: run CMD with a time limit, note failures, go on
    local name=$1 limit=$2; shift 2
    echo "=== $name"
    local t0=$SECONDS
    timeout "$limit" "$@"
    local rc=$?
    echo "=== $name: exit $rc in $((SECONDS - t0)) s"
    [ "$rc" -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

step "MFU base eager batch 128" 90 $PY benchmarks/gpu_pretrain_mfu.py --gpus 1 --batch 128 \
    --json "$OUT/mfu_eager_b128.json"
step "MFU base compiled batch 128" 150 $PY benchmarks/gpu_pretrain_mfu.py --gpus 1 --batch 128 --compile \
    --json "$OUT/mfu_compiled_b128.json"
step "MFU base compiled batch 256" 150 $PY benchmarks/gpu_pretrain_mfu.py --gpus 1 --batch 256 --compile --profile \
    --json "$OUT/mfu_compiled_b256.json"
step "MFU base compiled batch 256, sync each update (the old loop)" 150 $PY benchmarks/gpu_pretrain_mfu.py --gpus 1 \
    --batch 256 --compile --sync-each-update --json "$OUT/mfu_compiled_b256_sync.json"
step "MFU base compiled (CUDA graphs) batch 256" 180 $PY benchmarks/gpu_pretrain_mfu.py --gpus 1 --batch 256 --compile \
    --compile-mode reduce-overhead --json "$OUT/mfu_cudagraphs_b256.json"
step "MFU base compiled batch 512" 150 $PY benchmarks/gpu_pretrain_mfu.py --gpus 1 --batch 512 --compile \
    --json "$OUT/mfu_compiled_b512.json"
step "ecgfm pretrain --gpus 1 --compile (tiny)" 90 $PY -m ecgfm_cli pretrain "$SEG" --preset tiny --gpus 1 --compile \
    --max-updates 20 --batch-size 16 --log-every 5 --save-every 10 -o "$WORK/run"
cp "$WORK/run/log.jsonl" "$OUT/pretrain_gpu_log.jsonl" 2>/dev/null
step "ecgfm embed --device cuda (float32)" 60 $PY -m ecgfm_cli embed "$SEG" --model "$MODEL" --device cuda \
    -o "$WORK/emb_fp32.parquet"
step "ecgfm embed --gpus 1 --dtype bfloat16" 60 $PY -m ecgfm_cli embed "$SEG" --model "$MODEL" --gpus 1 \
    --dtype bfloat16 -o "$WORK/emb_bf16.parquet"
step "GPU vs CPU embeddings" 60 $PY - "$CPU_EMB" "$WORK/emb_fp32.parquet" "$WORK/emb_bf16.parquet" <<'EOF'
import sys

import numpy as np
import pyarrow.dataset as ds


def load(path):
    t = ds.dataset(path).to_table().sort_by([("record_id", "ascending"), ("segment_index", "ascending")])
    return np.stack(t.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float64)


ref, fp32, bf16 = (load(p) for p in sys.argv[1:4])
for name, x in (("cuda float32", fp32), ("cuda bfloat16", bf16)):
    cos = (x * ref).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(ref, axis=1))
    print(f"{name} vs cpu float32: {len(x)} segments, max |diff| {np.abs(x - ref).max():.2e}, "
          f"min cosine {cos.min():.6f}")
    assert x.shape == ref.shape and cos.min() > (0.9999 if name.endswith("float32") else 0.999), name
EOF
step "embed throughput base, GPU" 120 $PY benchmarks/bench_embed.py --device cuda --batch-size 256 --repeats 5 \
    --peak-gflops 989000 --skip-hf-bf16w --json "$OUT/embed_gpu.json"
rm -rf "$WORK"
exit $status
