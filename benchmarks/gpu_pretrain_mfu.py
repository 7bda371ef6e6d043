"""GPU benchmark: pretraining throughput (segments/s) and model FLOPs utilisation (MFU) of the ECG-FM model.

Runs the real training step (``ecgfm_cli.train.pretrain.train_update``: bf16 autocast, W2V + CMSC loss,
global masked-frame normalisation, DDP all-reduce, AdamW) on random segments already on the GPU, so it
measures the model and the distributed engine, not the data pipeline. FLOPs are counted analytically
(:func:`step_flops`): ``6 x (parameters used in matmuls/convolutions) x positions`` plus attention
``12 x layers x T^2 x D`` per segment (forward 1/3, backward 2/3), the first conv's missing input gradient and
the contrastive head included. MFU = counted FLOP/s / (``--peak-tflops`` x GPUs); the default peak is an
H100 SXM's dense bf16 989 TFLOP/s. Usage (needs CUDA; exits with a message otherwise):

    python benchmarks/gpu_pretrain_mfu.py [--gpus 8] [--batch 128] [--steps 20] [--preset base] [--compile]
                                          [--peak-tflops 989] [--json out.json]

Issue 14's switches, each measured on and off: ``--fusions group_norm=0,qkv=1,pad_tokens=1,compile_heads=1``
(the encoder's ``Fusions``; ``pad_multiple=N`` sets the multiple ``pad_tokens`` pads to, 8 by default; MFU
counts the unpadded model's FLOPs, so padding shows as what it buys, not as more work), ``--sdpa`` (the
attention backend), ``--compile-mode reduce-overhead`` (CUDA graphs),
``--loader-targets`` (time masks and negatives drawn on the host by ``model.masking.draw_targets``, as loader
threads would, and handed to the step, instead of drawn inside it). ``--device cpu`` is a dry run of the same
code on the CPU (no MFU: it checks that a command line of ``gpu_check.sh`` runs before a GPU is spent on it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

H100_BF16_DENSE_TFLOPS = 989.0


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one training step (forward + backward) for ONE segment, by part."""

    conv: float
    linear: float
    attention: float
    head: float

    @property
    def total(self) -> float:
        return self.conv + self.linear + self.attention + self.head


def step_flops(enc, length: int = 2500, num_negatives: int = 100, final_dim: int = 256, latent_groups: int = 2,
               latent_vars: int = 320, masked_fraction: float = 0.35) -> FlopCount:
    """Analytic training FLOPs per segment of ``enc`` (an :class:`EncoderConfig`) on ``length`` samples.

    A multiply-add is 2 FLOPs; backward costs twice the forward (gradients w.r.t. inputs and weights), except
    the first conv, which needs no input gradient (forward 2, backward 2). ``masked_fraction``: masked
    frames / frames after the batch equalisation (~35 % for ECG-FM's 0.65 x 10 spans on 156 frames).
    """
    conv = 0.0
    positions, ch_in = length, enc.in_channels
    for i, (ch, kernel, stride) in enumerate(enc.conv_layers):
        positions = (positions - kernel) // stride + 1
        macs = ch_in * kernel * ch * positions
        conv += (4 if i == 0 else 6) * macs
        ch_in = ch
    t, d = positions, enc.embed_dim
    per_layer = 4 * d * d + 2 * d * enc.ffn_dim  # q, k, v, out, fc1, fc2
    pos_conv = d * (d // enc.conv_pos_groups) * enc.conv_pos
    linear = 6 * t * (enc.conv_dim * d + pos_conv + enc.layers * per_layer)  # + post_extract_proj, pos-conv
    attention = 12 * enc.layers * t * t * d  # QK^T and AV: 2 x 2 T^2 D forward, x3 with backward
    tm = masked_fraction * t
    head = 6 * tm * (d * final_dim + enc.conv_dim * latent_groups * latent_vars + final_dim * final_dim)
    head += 6 * tm * (1 + num_negatives) * final_dim  # cosine similarities with positive + negatives
    return FlopCount(conv=conv, linear=linear, attention=attention, head=head)


def mfu(segments_per_s: float, flops_per_segment: float, gpus: int, peak_tflops: float) -> float:
    return segments_per_s * flops_per_segment / (gpus * peak_tflops * 1e12)


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _worker(args: argparse.Namespace, out: str) -> None:
    import numpy as np
    import torch

    from ecgfm_cli.model.config import preset
    from ecgfm_cli.model.encoder import FUSIONS, parse_fusions, use_fusions
    from ecgfm_cli.model.masking import TargetConfig, draw_targets
    from ecgfm_cli.model.pretraining import PretrainConfig, Wav2Vec2Pretrainer
    from ecgfm_cli.train.distributed import cleanup, setup
    from ecgfm_cli.train.loop import data_parallel
    from ecgfm_cli.train.pretrain import train_update

    ctx = setup(args.device)
    cuda = ctx.device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.sdpa != "auto" and cuda:  # leave only the chosen scaled_dot_product_attention backend enabled
        for name in ("flash", "mem_efficient", "math", "cudnn"):
            getattr(torch.backends.cuda, f"enable_{name}_sdp")(name == args.sdpa)
    fusions = use_fusions(**parse_fusions(args.fusions))
    fusions.__enter__()  # for the whole worker: compiled layers guard on these switches
    torch.manual_seed(0)
    pcfg = PretrainConfig(cmsc=not args.no_cmsc)
    enc = preset(args.preset)
    model = Wav2Vec2Pretrainer(enc, pcfg).to(ctx.device)
    if args.compile:
        from ecgfm_cli.model.encoder import compile_layers

        compile_layers(model.encoder, mode=args.compile_mode)
    net = data_parallel(model, ctx)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01,
                            fused=cuda)
    model.train()
    g = torch.Generator(device=ctx.device).manual_seed(ctx.rank)
    batch = {"x": torch.randn(args.batch, 12, 2500, device=ctx.device, generator=g),
             "record": torch.arange(args.batch, device=ctx.device) // 2}
    targets = None
    if args.loader_targets:  # a pool of host-side (pinned) targets, as loader threads would hand them over
        tcfg = TargetConfig.of(pcfg, enc.num_frames(2500))
        rng = np.random.default_rng(ctx.rank)
        targets = []
        for _ in range(4):
            drawn = {k: torch.from_numpy(v) for k, v in draw_targets(rng, args.batch, tcfg).items()}
            targets.append({k: v.pin_memory() if cuda else v for k, v in drawn.items()})
    dtype = "bfloat16" if cuda else "float32"

    def updates(n: int) -> None:
        """``n`` updates as the training loop runs them: update u's metrics are read (the one host sync)
        after update u + 1 is queued; with ``--sync-each-update`` right away, as the loop did before."""
        pending = None
        for i in range(n):
            fixed = None if targets is None else [targets[i % len(targets)]]
            result = train_update(model, net, opt, [batch], ctx, 5e-5, dtype=dtype, fixed=fixed)
            if args.sync_each_update:
                result.metrics()
                continue
            if pending is not None:
                pending.metrics()
            pending = result
        if pending is not None:
            pending.metrics()

    updates(args.warmup)
    _synchronize(ctx.device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    updates(args.steps)
    _synchronize(ctx.device)
    dt = time.perf_counter() - t
    if args.profile and ctx.is_main:  # where a step's GPU time goes, by kernel
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            updates(3)
            _synchronize(ctx.device)
        print(prof.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                        row_limit=25, max_name_column_width=70))
    if ctx.is_main:
        Path(out).write_text(json.dumps({
            "seconds": dt, "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
            "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
            "fusions": dataclasses.asdict(FUSIONS)}))
    fusions.__exit__(None, None, None)
    cleanup()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--batch", type=int, default=128, help="segments per GPU per step (reference 128)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--preset", default="base")
    ap.add_argument("--no-cmsc", action="store_true")
    ap.add_argument("--compile", action="store_true", help="as `ecgfm pretrain --compile` (warm-up compiles)")
    ap.add_argument("--compile-mode", default=None, choices=["default", "reduce-overhead", "max-autotune",
                                                            "max-autotune-no-cudagraphs"],
                    help="torch.compile mode for --compile (reduce-overhead: CUDA graphs; not yet in the CLI)")
    ap.add_argument("--sdpa", default="auto", choices=["auto", "flash", "mem_efficient", "math", "cudnn"],
                    help="attention backend (auto: torch's choice)")
    ap.add_argument("--sync-each-update", action="store_true",
                    help="read each update's metrics before queuing the next (the loop before the deferred read)")
    ap.add_argument("--profile", action="store_true", help="also print the GPU time per kernel of 3 more steps")
    ap.add_argument("--fusions", default="", help="encoder fusion switches, e.g. group_norm=0,qkv=1,pad_tokens=1,"
                                                 "pad_multiple=8,compile_heads=1 (default: "
                                                 "ecgfm_cli.model.encoder.Fusions' defaults)")
    ap.add_argument("--loader-targets", action="store_true",
                    help="hand the step host-drawn masks and negatives (as the loader would) instead of drawing "
                         "them inside the step")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: a dry run of the same code (checks the command line; the figures mean nothing)")
    ap.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                    help="dense bf16 peak per GPU (H100 SXM 989, H200 989, A100 312)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import torch

    from ecgfm_cli.model.encoder import parse_fusions, use_fusions

    try:
        with use_fusions(**parse_fusions(args.fusions)):
            pass
    except ValueError as e:
        ap.error(str(e))
    if args.device == "cpu":
        if args.gpus != 1:
            ap.error("--device cpu runs one process: use --gpus 1")
    elif not torch.cuda.is_available():
        print("gpu_pretrain_mfu: CUDA is not available here (torch " + torch.__version__ + "); run it on a GPU "
              "machine. Nothing measured.", file=sys.stderr)
        sys.exit(2)
    elif args.gpus > torch.cuda.device_count():
        print(f"gpu_pretrain_mfu: --gpus {args.gpus} but only {torch.cuda.device_count()} visible", file=sys.stderr)
        sys.exit(2)

    import tempfile

    from ecgfm_cli.model.config import preset
    from ecgfm_cli.train import distributed

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        distributed.launch(_worker, (args, out), nprocs=args.gpus)
        res = json.loads(Path(out).read_text())
    segs = args.batch * args.gpus * args.steps / res["seconds"]
    flops = step_flops(preset(args.preset))
    util = mfu(segs, flops.total, args.gpus, args.peak_tflops)
    result = {**res, "preset": args.preset, "gpus": args.gpus, "batch_per_gpu": args.batch, "steps": args.steps,
              "compile": args.compile, "compile_mode": args.compile_mode, "sdpa": args.sdpa,
              "sync_each_update": args.sync_each_update, "loader_targets": args.loader_targets,
              "device_type": args.device,
              "ms_per_step": round(1000 * res["seconds"] / args.steps, 2),
              "segments_per_s": round(segs, 1), "tflops_per_segment_step": flops.total / 1e12,
              "achieved_tflops_per_gpu": round(segs * flops.total / args.gpus / 1e12, 1),
              "peak_tflops": args.peak_tflops, "mfu": round(util, 4)}
    mode = "bf16 " if args.device == "cuda" else "fp32 "
    mode += "compiled" if args.compile else "eager"
    mode += f" ({args.compile_mode})" if args.compile and args.compile_mode else ""
    mode += "" if args.sdpa == "auto" else f", sdpa {args.sdpa}"
    mode += ", sync each update" if args.sync_each_update else ""
    mode += f", fusions {args.fusions}" if args.fusions else ""
    mode += ", loader targets" if args.loader_targets else ""
    mode += ", CPU DRY RUN" if args.device == "cpu" else ""
    print(f"{args.preset} on {args.gpus} x {res['device']} ({mode}, batch {args.batch}/GPU, {args.steps} steps): "
          f"{segs:.0f} segments/s, {result['achieved_tflops_per_gpu']} TFLOP/s per GPU, MFU {100 * util:.1f} % "
          f"of {args.peak_tflops:.0f}; peak memory {res['max_memory_gib']:.1f} GiB")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
