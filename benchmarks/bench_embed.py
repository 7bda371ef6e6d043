"""Benchmark: embedding throughput of ecgfm's inference path vs transformers' Wav2Vec2Model, same weights.

Both models get identical (random, BERT-scaled) weights for the given config (default: the released base
size, 90 M parameters), the same batch of 12 x 2500 segments, the same thread count, in one process.
Timed variants, interleaved in every repeat (medians reported):

  ecgfm fp32    ``ecgfm_cli.embed.embed_batch`` (the code ``ecgfm embed`` runs: the encoder after
                ``prepare_for_inference``), float32
  hf fp32       ``Wav2Vec2Model(x).last_hidden_state.mean(1)`` under ``torch.inference_mode``
  ecgfm bf16    ``embed_batch(..., dtype="bfloat16")`` (torch.autocast, weights pre-cast once)
  hf bf16       transformers under ``torch.autocast(bfloat16)`` (its own mixed-precision path)
  hf bf16w      transformers with its weights cast to bfloat16 (``model.to(torch.bfloat16)``), shown for
                reference

It prints segments/s per variant, ecgfm/transformers ratios (of the medians; paired, i.e. the median over
repeats of the two back-to-back timings' ratio; best-of), the fraction of the bf16 matmul ceiling
(``--peak-gflops`` / forward FLOPs per segment), and the cosine of bf16 to fp32 embeddings. Usage:

    python benchmarks/bench_embed.py [--batch-size 16] [--threads 2] [--repeats 7] [--json out.json]
    python benchmarks/bench_embed.py --device cuda --batch-size 256 --peak-gflops 989000   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # tests/hf_reference.py: the transformers model with our weights

from hf_reference import build_hf_model, fairseq_to_hf_state, random_fairseq_state  # noqa: E402

from ecgfm_cli.embed import embed_batch  # noqa: E402
from ecgfm_cli.model.checkpoint import state_dict_from_fairseq  # noqa: E402
from ecgfm_cli.model.config import EncoderConfig, preset  # noqa: E402
from ecgfm_cli.model.encoder import EcgEncoder  # noqa: E402
from ecgfm_cli.model.inference import inference_copy  # noqa: E402


def forward_flops(cfg: EncoderConfig, length: int) -> float:
    """Multiply-adds x 2 of one segment's forward pass (convs, projections, attention, FFN)."""
    flops, ch, n = 0.0, cfg.in_channels, length
    for out, kernel, stride in cfg.conv_layers:
        n = (n - kernel) // stride + 1
        flops += 2 * n * out * ch * kernel
        ch = out
    t, d = n, cfg.embed_dim
    flops += 2 * t * ch * d  # post_extract_proj
    flops += 2 * t * d * (d // cfg.conv_pos_groups) * cfg.conv_pos  # grouped positional conv
    per_layer = 2 * t * (4 * d * d + 2 * d * cfg.ffn_dim) + 2 * 2 * t * t * d  # projections + FFN + attention
    return flops + cfg.layers * per_layer


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="base")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--peak-gflops", type=float, default=420.0, help="bf16 matmul peak of these cores")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (timings include the host-device copies, "
                    "as in `ecgfm embed`)")
    ap.add_argument("--skip-hf-bf16w", action="store_true", help="do not time transformers with bf16 weights")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cfg = preset(args.preset).with_dropouts(0.0)
    state = random_fairseq_state(cfg, pretraining_heads=False, seed=0)
    enc = EcgEncoder(cfg)
    enc.load_state_dict(state_dict_from_fairseq(state)[1])
    enc.eval()
    dev = torch.device(args.device)
    nets = {"float32": inference_copy(enc).to(dev), "bfloat16": inference_copy(enc, torch.bfloat16).to(dev)}
    hf = build_hf_model(cfg)
    hf.load_state_dict(fairseq_to_hf_state(state))
    hf.to(dev).eval()
    hf_w16 = None
    if not args.skip_hf_bf16w:
        hf_w16 = build_hf_model(cfg)
        hf_w16.load_state_dict(fairseq_to_hf_state(state))
        hf_w16 = hf_w16.to(dev, torch.bfloat16).eval()

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch_size, cfg.in_channels, 2500)).astype(np.float32)
    xt = torch.from_numpy(x)

    def run_hf(model, dtype: str, weights16: bool = False) -> np.ndarray:
        inp = xt.to(dev, torch.bfloat16) if weights16 else xt.to(dev)
        with torch.inference_mode(), torch.autocast(dev.type, torch.bfloat16, enabled=dtype == "bfloat16"):
            return model(inp).last_hidden_state.float().mean(1).cpu().numpy()

    variants = {
        "ecgfm fp32": lambda: embed_batch(nets["float32"], x, args.device, "float32"),
        "hf fp32": lambda: run_hf(hf, "float32"),
        "ecgfm bf16": lambda: embed_batch(nets["bfloat16"], x, args.device, "bfloat16"),
        "hf bf16": lambda: run_hf(hf, "bfloat16"),
    }
    if hf_w16 is not None:
        variants["hf bf16w"] = lambda: run_hf(hf_w16, "float32", weights16=True)

    outputs = {name: fn() for name, fn in variants.items()}  # warm-up (and the outputs compared below)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(args.repeats):
        order = list(variants) if rep % 2 == 0 else list(reversed(variants))  # interleave, alternate order
        for name in order:
            t0 = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - t0)

    flops = forward_flops(cfg, 2500)
    ceiling = args.peak_gflops * 1e9 / flops
    rate = {name: args.batch_size / statistics.median(ts) for name, ts in times.items()}
    cos_bf16 = cosine(outputs["ecgfm bf16"], outputs["ecgfm fp32"])
    cos_hf = cosine(outputs["ecgfm fp32"], outputs["hf fp32"])
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{args.threads} threads"
    print(f"config {args.preset}: {flops / 1e9:.1f} GFLOP per 12 x 2500 segment; batch {args.batch_size}, "
          f"{where}, {args.repeats} interleaved repeats (median); torch {torch.__version__}")
    for name, r in rate.items():
        spread = f"{args.batch_size / max(times[name]):.2f}-{args.batch_size / min(times[name]):.2f}"
        print(f"  {name:12s} {r:7.2f} segments/s  (range {spread}; {r / ceiling:5.1%} of the bf16 ceiling "
              f"{ceiling:.1f}/s)")
    ratios = {"fp32": rate["ecgfm fp32"] / rate["hf fp32"], "bf16": rate["ecgfm bf16"] / rate["hf bf16"]}
    if "hf bf16w" in rate:
        ratios["bf16 vs hf bf16 weights"] = rate["ecgfm bf16"] / rate["hf bf16w"]
    best = {name: args.batch_size / min(ts) for name, ts in times.items()}
    best_ratios = {"fp32": best["ecgfm fp32"] / best["hf fp32"], "bf16": best["ecgfm bf16"] / best["hf bf16"]}
    # Paired: within each repeat the two variants ran back to back, so their time ratio cancels slow drifts in
    # the machine's speed that the ratio of medians carries.
    paired = {k: statistics.median(h / e for e, h in zip(times[f"ecgfm {k}"], times[f"hf {k}"], strict=True))
              for k in ("fp32", "bf16")}
    for k, v in ratios.items():
        extra = (f" (paired median {paired[k]:.2f}x, best-of-{args.repeats}: {best_ratios[k]:.2f}x)"
                 if k in best_ratios else "")
        print(f"  ecgfm / transformers {k}: {v:.2f}x median{extra}")
    print("  (on a shared machine the medians carry other processes' load; best-of is the uncontended figure)")
    print(f"  cosine(ecgfm bf16, ecgfm fp32): min {cos_bf16.min():.6f}, mean {cos_bf16.mean():.6f}")
    print(f"  cosine(ecgfm fp32, transformers fp32): min {cos_hf.min():.7f}")
    ok = ratios["fp32"] >= 1.0 and ratios["bf16"] >= 1.2 and cos_bf16.min() >= 0.999
    print("  targets (fp32 >= 1.0x, bf16 >= 1.2x, cosine >= 0.999):", "met" if ok else "NOT met")
    if args.json:
        args.json.write_text(json.dumps({
            "preset": args.preset, "batch_size": args.batch_size, "threads": args.threads, "repeats": args.repeats,
            "device": where,
            "gflop_per_segment": flops / 1e9, "ceiling_segments_per_s": ceiling, "segments_per_s": rate,
            "times_s": times, "ratios": ratios, "best_ratios": best_ratios, "paired_ratios": paired,
            "cosine_bf16_fp32_min": float(cos_bf16.min()),
            "cosine_fp32_hf_min": float(cos_hf.min()), "torch": torch.__version__}, indent=2))


if __name__ == "__main__":
    main()
