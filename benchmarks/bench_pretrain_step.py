"""Benchmark: one pretraining step (forward, backward, AdamW) of the ``base`` model on CPU,
ecgfm's Wav2Vec2Pretrainer vs transformers' Wav2Vec2ForPreTraining at the same configuration.

Same batch (default 4 segments of 12 x 2500), same time mask and negatives count (100), same thread count,
dropouts off in both (transformers' reference config has none), wav2vec 2.0 loss only (transformers has no
CMSC); ecgfm's full W2V + CMSC step is timed too. Prints the median of ``--repeats`` timed steps after a
warm-up step, and the ratio (transformers time / ecgfm time; > 1 means ecgfm is faster). Usage:

    python benchmarks/bench_pretrain_step.py [--batch 4] [--threads 2] [--repeats 5] [--preset base] [--json F]

``--throughput tiny,small,base``: the real training update instead (``train.pretrain.train_update``: W2V + CMSC,
each preset's own objective and batch from its recipe, dropouts on, AdamW) on random segments, per preset:
segments/s and the share of the machine's matmul rate its FLOPs reach (FLOPs per segment counted as
``benchmarks/gpu_pretrain_mfu.py`` does; the matmul rate is measured here, a float32 ``(1024 x 1024)`` GEMM
timed between the updates, so a load change on a shared machine hits both alike)::

    python benchmarks/bench_pretrain_step.py --throughput tiny,small,base [--threads 2] [--repeats 5]

``--ab FUSION[,FUSION]`` (with ``--throughput``): each fusion of ``ecgfm_cli.model.encoder.Fusions`` on and off,
the two updates of one model interleaved round by round (a shared machine's load hits both alike), the ratio
off / on (> 1: the fusion is faster). ``--profile``: the torch profiler's table of the update's operators
(self CPU time, by input shape) per preset, after the timing::

    python benchmarks/bench_pretrain_step.py --throughput small --ab group_norm,qkv --threads 1 --repeats 15
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def time_steps(steps: list, repeats: int) -> list[float]:
    """Median seconds of each step function. The steps are interleaved (one of each per round) so that a
    load change on a shared machine hits them alike; one warm-up round first."""
    for step in steps:
        step()
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(repeats):
        for i, step in enumerate(steps):
            t = time.perf_counter()
            step()
            times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def throughput(presets: list[str], threads: int, repeats: int, batch: int | None, ab: list[str] | None = None,
               profile: bool = False) -> list[dict]:
    """Per preset: the median update time of the training step and its share of the measured matmul rate;
    with ``ab``, each named fusion's update off and on, interleaved, and their ratio."""
    from gpu_pretrain_mfu import step_flops

    from ecgfm_cli.model.config import RECIPES, preset
    from ecgfm_cli.model.pretraining import PretrainConfig, Wav2Vec2Pretrainer
    from ecgfm_cli.train.distributed import DistContext
    from ecgfm_cli.train.pretrain import TrainOptions, apply_recipe, train_update, with_dropout

    a, b_ = torch.randn(1024, 1024), torch.randn(1024, 1024)

    def gemm() -> None:
        for _ in range(8):
            torch.mm(a, b_)

    ctx = DistContext()
    out = []
    for name in presets:
        opts, pcfg = apply_recipe(TrainOptions("-", "-", preset=name), PretrainConfig(), name)
        enc = with_dropout(preset(name), opts.dropout)
        bsz = batch or opts.batch_size or (8 if name == "base" or name == "large" else 32)
        torch.manual_seed(0)
        model = Wav2Vec2Pretrainer(enc, pcfg).train()
        opt = torch.optim.AdamW(model.parameters(), lr=opts.lr, betas=opts.adam_betas, eps=opts.adam_eps,
                                weight_decay=opts.weight_decay)
        g = torch.Generator().manual_seed(0)
        micro = [{"x": torch.randn(bsz, 12, 2500, generator=g), "record": torch.arange(bsz) // 2}]

        def update(model=model, opt=opt, micro=micro, lr=opts.lr, clip=opts.clip_norm) -> None:
            train_update(model, model, opt, micro, ctx, lr, clip).metrics()

        if ab:
            from ecgfm_cli.model.encoder import FUSIONS, use_fusions

            def switched(fusion: str, on: bool, update=update):
                def step() -> None:
                    with use_fusions(**{fusion: on}):
                        update()
                return step

            for fusion in ab:
                t_off, t_on = time_steps([switched(fusion, False), switched(fusion, True)], repeats)
                print(f"  {name:6s} {fusion:12s} off {bsz / t_off:7.1f} segments/s  on {bsz / t_on:7.1f}  "
                      f"off/on {t_off / t_on:.3f}", flush=True)
                out.append({"preset": name, "batch": bsz, "fusion": fusion, "off_s": round(t_off, 4),
                            "on_s": round(t_on, 4), "ratio_off_over_on": round(t_off / t_on, 3)})
            print(f"  (defaults: {FUSIONS})")
            continue
        t_update, t_gemm = time_steps([update, gemm], repeats)
        if profile:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile

            with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                for _ in range(3):
                    update()
            print(prof.key_averages(group_by_input_shape=True).table(
                sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=40, max_shapes_column_width=60))
        rate = 8 * 2 * 1024**3 / t_gemm
        flops = step_flops(enc, num_negatives=pcfg.num_negatives, final_dim=pcfg.final_dim,
                           latent_groups=pcfg.latent_groups, latent_vars=pcfg.latent_vars).total
        seg_s = bsz / t_update
        row = {"preset": name, "batch": bsz, "parameters": sum(p.numel() for p in model.parameters()),
               "update_s": round(t_update, 4), "segments_per_s": round(seg_s, 1),
               "gflop_per_segment": round(flops / 1e9, 3), "matmul_gflops": round(rate / 1e9, 1),
               "share_of_matmul_rate": round(seg_s * flops / rate, 3), "recipe": RECIPES.get(name, {})}
        print(f"  {name:6s} batch {bsz:4d}  {row['parameters'] / 1e6:6.2f} M params  {t_update:7.3f} s/update  "
              f"{seg_s:7.1f} segments/s  {flops / 1e9:6.2f} GFLOP/segment  {row['share_of_matmul_rate']:.1%} of "
              f"{rate / 1e9:.0f} GFLOP/s matmul", flush=True)
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--preset", default="base")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--throughput", help="comma-separated presets: time the training update of each instead")
    ap.add_argument("--update-batch", type=int, help="with --throughput: segments per update (default: the recipe's)")
    ap.add_argument("--ab", help="with --throughput: comma-separated fusions (encoder.Fusions) to time off vs on")
    ap.add_argument("--profile", action="store_true", help="with --throughput: print the operator profile")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.throughput:
        sys.path.insert(0, str(REPO / "benchmarks"))
        print(f"pretraining update, {args.threads} threads, median of {args.repeats}, torch {torch.__version__}:")
        rows = throughput(args.throughput.split(","), args.threads, args.repeats, args.update_batch,
                          args.ab.split(",") if args.ab else None, args.profile)
        if args.json:
            args.json.write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=2) + "\n")
        return

    from hf_reference import build_hf_model
    from transformers.models.wav2vec2.modeling_wav2vec2 import _sample_negative_indices

    from ecgfm_cli.model.config import preset
    from ecgfm_cli.model.pretraining import PretrainConfig, Wav2Vec2Pretrainer, compute_span_mask

    enc = preset(args.preset).with_dropouts(0.0)
    b, length = args.batch, 2500
    t_frames = enc.num_frames(length)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, 12, length, generator=g)
    mask = compute_span_mask((b, t_frames), generator=g)
    record = torch.arange(b) // 2

    torch.manual_seed(0)
    ours = Wav2Vec2Pretrainer(enc, PretrainConfig(dropout_features=0.0, cmsc=False)).train()
    ours_opt = torch.optim.AdamW(ours.parameters(), lr=5e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
    w_cfg, wcr_cfg = ours.cfg, replace(ours.cfg, cmsc=True)

    def ours_step(with_cmsc: bool = False) -> None:
        ours_opt.zero_grad(set_to_none=True)
        ours.cfg = wcr_cfg if with_cmsc else w_cfg  # the same weights; the objective with or without CMSC
        out = ours(x, record, mask=mask)
        (out.loss / out.stats.sample_size).backward()
        ours_opt.step()

    hf = build_hf_model(enc, pretraining=True).train()
    hf.config.num_negatives = 100
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=5e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
    neg = torch.as_tensor(_sample_negative_indices((b, t_frames), 100, mask_time_indices=mask.numpy()))

    def hf_step() -> None:
        hf_opt.zero_grad(set_to_none=True)
        out = hf(x, mask_time_indices=mask, sampled_negative_indices=neg)
        (out.loss / mask.sum()).backward()
        hf_opt.step()

    t_hf, t_ours, t_wcr = time_steps([hf_step, ours_step, lambda: ours_step(True)], args.repeats)
    n_params = sum(p.numel() for p in ours.parameters())
    result = {
        "preset": args.preset, "batch": b, "threads": args.threads, "repeats": args.repeats,
        "parameters": n_params, "torch": torch.__version__,
        "ecgfm_w2v_step_s": round(t_ours, 4), "transformers_w2v_step_s": round(t_hf, 4),
        "ecgfm_wcr_step_s": round(t_wcr, 4), "ratio_transformers_over_ecgfm": round(t_hf / t_ours, 3),
    }
    print(f"pretraining step, {args.preset} ({n_params / 1e6:.1f} M params), batch {b} x 12 x {length}, "
          f"{args.threads} threads, median of {args.repeats}:")
    print(f"  ecgfm        W2V     {t_ours:.3f} s  ({b / t_ours:.1f} segments/s)")
    print(f"  transformers W2V     {t_hf:.3f} s  ({b / t_hf:.1f} segments/s)")
    print(f"  ecgfm        W2V+CMSC {t_wcr:.3f} s")
    print(f"  speed-up ecgfm vs transformers: {t_hf / t_ours:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
