#!/usr/bin/env bash
# The GPU paths and GPU figures in one run, for a machine with CUDA (none of this runs in CI).
#
#   bash benchmarks/gpu_check.sh SEGMENTS MODEL CPU_EMBEDDINGS OUT_DIR [SECTIONS]
#   bash benchmarks/gpu_check.sh --dry-run OUT_DIR [SECTIONS]
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
#   4. embedding throughput of the base model on the GPU, ecgfm vs transformers (bench_embed.py);
#   5. issue 14's switches, one at a time against the compiled batch-256 run of 1.: each encoder fusion switched
#      from its default (group_norm=0, qkv=1, pad_tokens=1: 156 tokens padded to 160 with a key-padding mask,
#      compile_heads=1: quantizer + contrastive logits compiled), each attention backend (cudnn, flash,
#      mem_efficient), padding under cuDNN attention (whether the mask keeps torch off its fastest kernel), the masks
#      and negatives drawn on the host as the loader would (--loader-targets), and CUDA graphs + fused q/k/v +
#      loader targets together; a table of the ratios at the end.
# SECTIONS (comma-separated, default all): mfu (1.), pretrain (2.), embed (3. and 4.), fusions (5.; it runs its
# reference, the compiled batch-256 run, itself when mfu is not asked for). One device call is at most 600 s and a
# session's device time 15 minutes: give the first call `fusions` alone (11 runs, issue 14's open figures), the next
# `mfu,pretrain,embed`. Results land in OUT_DIR (JSON, logs); a summary goes to stdout. Python: $PYTHON or
# python3, with ecgfm_cli importable (installed, or PYTHONPATH=.). `--dry-run OUT_DIR` runs the MFU command lines
# of mfu and fusions on the CPU (tiny preset, batch 4, one step, not compiled) to check them before a GPU is
# spent on them.
set -u
DRY=0
if [ "${1:-}" = "--dry-run" ]; then
    DRY=1 OUT=${2:?usage: gpu_check.sh --dry-run OUT_DIR [SECTIONS]} SECTIONS=${3:-mfu,fusions}
else
    SEG=${1:?usage: gpu_check.sh SEGMENTS MODEL CPU_EMBEDDINGS OUT_DIR [SECTIONS]} MODEL=${2:?} CPU_EMB=${3:?}
    OUT=${4:?} SECTIONS=${5:-mfu,pretrain,embed,fusions}
fi
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
want() { [[ ",$SECTIONS," == *",$1,"* ]]; }
mfu() {  # mfu NAME SECONDS ARGS...: gpu_pretrain_mfu.py ARGS; a dry run: on the CPU, tiny, one step, eager
    local name=$1 limit=$2; shift 2
    if [ "$DRY" -eq 1 ]; then
        local args=() a
        for a in "$@"; do [ "$a" = --compile ] || [ "$a" = --profile ] || args+=("$a"); done
        step "$name (CPU dry run)" "$limit" $PY benchmarks/gpu_pretrain_mfu.py "${args[@]}" --device cpu \
            --preset tiny --batch 4 --steps 1 --warmup 1
    else
        step "$name" "$limit" $PY benchmarks/gpu_pretrain_mfu.py "$@"
    fi
}

if [ "$DRY" -eq 0 ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
fi

if want mfu || want fusions; then  # the reference of section fusions' ratios
    mfu "MFU base compiled batch 256" 150 --gpus 1 --batch 256 --compile --profile \
        --json "$OUT/mfu_compiled_b256.json"
fi
if want mfu; then
    mfu "MFU base eager batch 128" 90 --gpus 1 --batch 128 --json "$OUT/mfu_eager_b128.json"
    mfu "MFU base compiled batch 128" 150 --gpus 1 --batch 128 --compile --json "$OUT/mfu_compiled_b128.json"
    mfu "MFU base compiled batch 256, sync each update (the old loop)" 150 --gpus 1 --batch 256 --compile \
        --sync-each-update --json "$OUT/mfu_compiled_b256_sync.json"
    mfu "MFU base compiled (CUDA graphs) batch 256" 180 --gpus 1 --batch 256 --compile \
        --compile-mode reduce-overhead --json "$OUT/mfu_cudagraphs_b256.json"
    mfu "MFU base compiled batch 512" 150 --gpus 1 --batch 512 --compile --json "$OUT/mfu_compiled_b512.json"
fi

if want fusions; then  # issue 14: one switch at a time against "MFU base compiled batch 256"
    mfu "MFU b256 compiled, group_norm fusion off" 120 --gpus 1 --batch 256 --compile --fusions group_norm=0 \
        --json "$OUT/mfu14_group_norm_off.json"
    mfu "MFU b256 compiled, fused q/k/v projection" 150 --gpus 1 --batch 256 --compile --fusions qkv=1 \
        --json "$OUT/mfu14_qkv_on.json"
    mfu "MFU b256 compiled, tokens padded to a multiple of 8" 150 --gpus 1 --batch 256 --compile \
        --fusions pad_tokens=1 --json "$OUT/mfu14_pad_tokens_on.json"
    mfu "MFU b256 compiled, tokens padded, sdpa cudnn" 150 --gpus 1 --batch 256 --compile --sdpa cudnn \
        --fusions pad_tokens=1 --json "$OUT/mfu14_pad_tokens_cudnn.json"
    mfu "MFU b256 compiled, quantizer and contrastive logits compiled" 180 --gpus 1 --batch 256 --compile \
        --fusions compile_heads=1 --json "$OUT/mfu14_compile_heads_on.json"
    for backend in cudnn flash mem_efficient; do
        mfu "MFU b256 compiled, sdpa $backend" 120 --gpus 1 --batch 256 --compile --sdpa "$backend" \
            --json "$OUT/mfu14_sdpa_$backend.json"
    done
    mfu "MFU b256 compiled, masks and negatives from the loader" 120 --gpus 1 --batch 256 --compile \
        --loader-targets --json "$OUT/mfu14_loader_targets.json"
    mfu "MFU b256 CUDA graphs + fused q/k/v + loader targets" 180 --gpus 1 --batch 256 --compile \
        --compile-mode reduce-overhead --fusions qkv=1 --loader-targets --json "$OUT/mfu14_all.json"
    [ "$DRY" -eq 1 ] || $PY - "$OUT" <<'EOF'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
base = out / "mfu_compiled_b256.json"
ref = json.loads(base.read_text())["segments_per_s"] if base.exists() else None
print("issue 14, each switch against compiled batch 256" + (f" ({ref} segments/s):" if ref else " (not run):"))
for f in sorted(out.glob("mfu14_*.json")):
    r = json.loads(f.read_text())
    ratio = f"  x{r['segments_per_s'] / ref:.3f}" if ref else ""
    print(f"  {f.stem:28s} {r['segments_per_s']:8.1f} segments/s  MFU {100 * r['mfu']:.1f} %{ratio}")
EOF
fi
if [ "$DRY" -eq 1 ]; then
    rm -rf "$WORK"
    exit $status
fi

if want pretrain; then
    step "ecgfm pretrain --gpus 1 --compile (tiny)" 90 $PY -m ecgfm_cli pretrain "$SEG" --preset tiny --gpus 1 \
        --compile --max-updates 20 --batch-size 16 --log-every 5 --save-every 10 -o "$WORK/run"
    cp "$WORK/run/log.jsonl" "$OUT/pretrain_gpu_log.jsonl" 2>/dev/null
fi

if want embed; then
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
fi
rm -rf "$WORK"
exit $status
