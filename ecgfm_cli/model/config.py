"""Encoder architecture: the :class:`EncoderConfig` dataclass, named presets, fairseq config reading.

Pure Python (no torch import): commands may read a checkpoint's config without paying torch's start-up.
"""

from __future__ import annotations

import ast
import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

ConvLayers = tuple[tuple[int, int, int], ...]

#: The released ECG-FM conv stack: 4 x (256 channels, kernel 2, stride 2) = 16x downsampling.
ECG_FM_CONV_LAYERS: ConvLayers = ((256, 2, 2),) * 4


@dataclass(frozen=True)
class EncoderConfig:
    """Sizes and regularisation of an :class:`~ecgfm_cli.model.encoder.EcgEncoder`.

    in_channels: ECG leads (input rows). conv_layers: (channels, kernel, stride) per conv block.
    embed_dim / layers / heads / ffn_dim: transformer width, depth, attention heads, FFN hidden size.
    conv_pos / conv_pos_groups: kernel (in tokens) and groups of the convolutional positional embedding.
    dropout: on attention output, FFN output and the transformer input. attention_dropout: on attention
    probabilities. activation_dropout: after the FFN GELU. dropout_input: after ``post_extract_proj``.
    feature_grad_mult: gradient scale into the conv stack (0 = frozen, run under ``torch.no_grad``).
    Defaults are the released base model with its pretraining dropouts; ``feature_grad_mult`` 1.0 is neutral
    (the pretraining model sets ECG-FM's 0.1, finetuning 0).
    """

    in_channels: int = 12
    conv_layers: ConvLayers = ECG_FM_CONV_LAYERS
    embed_dim: int = 768
    layers: int = 12
    heads: int = 12
    ffn_dim: int = 3072
    conv_pos: int = 128
    conv_pos_groups: int = 16
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    dropout_input: float = 0.1
    feature_grad_mult: float = 1.0

    def __post_init__(self) -> None:
        conv = tuple(tuple(int(v) for v in layer) for layer in self.conv_layers)
        object.__setattr__(self, "conv_layers", conv)
        problems = []
        if not conv or any(len(layer) != 3 or min(layer) < 1 for layer in conv):
            problems.append(f"conv_layers must be non-empty (channels, kernel, stride) triples, got {conv}")
        if self.heads < 1 or self.embed_dim % self.heads:
            problems.append(f"embed_dim {self.embed_dim} is not divisible by heads {self.heads}")
        if self.conv_pos_groups < 1 or self.embed_dim % self.conv_pos_groups:
            problems.append(
                f"embed_dim {self.embed_dim} is not divisible by conv_pos_groups {self.conv_pos_groups}"
            )
        if min(self.in_channels, self.embed_dim, self.layers, self.ffn_dim, self.conv_pos) < 1:
            problems.append("in_channels, embed_dim, layers, ffn_dim and conv_pos must be >= 1")
        if problems:
            raise ValueError("invalid EncoderConfig: " + "; ".join(problems))

    @property
    def conv_dim(self) -> int:
        """Channels out of the conv stack (input width of ``layer_norm`` / ``post_extract_proj``)."""
        return self.conv_layers[-1][0]

    def num_frames(self, length: int) -> int:
        """Tokens out of the conv stack for ``length`` input samples (2500 -> 156 for ECG-FM)."""
        for _, kernel, stride in self.conv_layers:
            length = max((length - kernel) // stride + 1, 0)
        return length

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (conv_layers as a list of lists)."""
        d = asdict(self)
        d["conv_layers"] = [list(layer) for layer in self.conv_layers]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncoderConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown EncoderConfig field(s): {', '.join(unknown)}")
        kw = dict(d)
        if "conv_layers" in kw:
            kw["conv_layers"] = tuple(tuple(layer) for layer in kw["conv_layers"])
        return cls(**kw)

    def with_dropouts(self, p: float = 0.0) -> EncoderConfig:
        """Copy with every dropout set to ``p`` (e.g. for deterministic inference or parity tests)."""
        return replace(self, dropout=p, attention_dropout=p, activation_dropout=p, dropout_input=p)

    @classmethod
    def from_fairseq(cls, cfg_model: dict | None, state: dict) -> EncoderConfig:
        """Architecture of a fairseq-signals checkpoint from its ``cfg["model"]`` and tensor shapes.

        Shapes win over the config where both say something (the HF side YAML of the released model is
        known to be stale; the cfg is usually right but the tensors are the truth). Things shapes cannot
        tell (attention heads, conv strides, dropouts) come from ``cfg_model``, then from a nested
        pretraining config (``args.model`` / ``w2v_args.model``), then from defaults (heads =
        embed_dim // 64, stride = kernel). ``state`` may be unprefixed (pretrained file) or carry an
        ``encoder.`` prefix (finetuned file). Raises ``ValueError`` for unsupported variants.
        """
        sources = _cfg_sources(cfg_model)

        def pick(*names: str, default: Any = None) -> Any:
            for src in sources:
                for name in names:
                    if src.get(name) is not None:
                        return src[name]
            return default

        if pick("layer_norm_first", default=False):
            raise ValueError("layer_norm_first=True (pre-LN) checkpoints are not supported")
        if pick("extractor_mode", default="default") != "default":
            raise ValueError(f"extractor_mode {pick('extractor_mode')!r} is not supported (only 'default')")

        prefix = _encoder_prefix(state)
        shape = {k[len(prefix):]: tuple(v.shape) for k, v in state.items() if k.startswith(prefix)}
        if any(re.fullmatch(r"feature_extractor\.conv_layers\.\d+\.0\.bias", k) for k in shape):
            raise ValueError("conv_bias=True checkpoints are not supported")

        cfg_conv = _parse_conv_layers(pick("conv_feature_layers", default=None))
        conv: list[tuple[int, int, int]] = []
        i = 0
        while f"feature_extractor.conv_layers.{i}.0.weight" in shape:
            out_ch, _, kernel = shape[f"feature_extractor.conv_layers.{i}.0.weight"]
            stride = cfg_conv[i][2] if cfg_conv and i < len(cfg_conv) else kernel
            conv.append((out_ch, kernel, stride))
            i += 1
        if not conv:
            raise ValueError("no feature_extractor.conv_layers.0.0.weight in the state dict")
        in_channels = shape["feature_extractor.conv_layers.0.0.weight"][1]

        embed_dim = shape.get("post_extract_proj.weight", (pick("encoder_embed_dim", default=768),))[0]
        layer_ids = {int(m.group(1)) for k in shape if (m := re.match(r"encoder\.layers\.(\d+)\.", k))}
        layers = max(layer_ids) + 1 if layer_ids else int(pick("encoder_layers", default=12))
        ffn_dim = shape.get("encoder.layers.0.fc1.weight", (pick("encoder_ffn_embed_dim", default=3072),))[0]

        conv_pos = int(pick("conv_pos", default=128))
        conv_pos_groups = int(pick("conv_pos_groups", default=16))
        for name in ("weight_v", "parametrizations.weight.original1", "weight"):
            v = shape.get(f"conv_pos.pos_conv.0.{name}")
            if v is not None and len(v) == 3:
                conv_pos = v[2]
                conv_pos_groups = embed_dim // v[1] if v[1] else conv_pos_groups
                break

        heads = int(pick("encoder_attention_heads", default=max(embed_dim // 64, 1)))
        if embed_dim % heads:
            heads = max(embed_dim // 64, 1)

        def num(name: str, default: float) -> float:
            return float(pick(name, default=default))

        return cls(
            in_channels=in_channels,
            conv_layers=tuple(conv),
            embed_dim=embed_dim,
            layers=layers,
            heads=heads,
            ffn_dim=ffn_dim,
            conv_pos=conv_pos,
            conv_pos_groups=conv_pos_groups,
            dropout=num("dropout", cls.dropout),
            attention_dropout=num("attention_dropout", cls.attention_dropout),
            activation_dropout=num("activation_dropout", cls.activation_dropout),
            dropout_input=num("dropout_input", cls.dropout_input),
            feature_grad_mult=num("feature_grad_mult", cls.feature_grad_mult),
        )


PRESETS: dict[str, EncoderConfig] = {
    # The released ECG-FM encoder: 90,374,016 parameters (90,883,072 with pretraining heads).
    "base": EncoderConfig(),
    # The unreleased v1 preprint size (BERT-Large): 24 x 1024, 16 heads, FFN 4096.
    "large": EncoderConfig(embed_dim=1024, layers=24, heads=16, ffn_dim=4096),
    # The laptop recipe's encoder (~1 M parameters): pretrains in minutes on 2 CPU cores (see RECIPES["small"]).
    "small": EncoderConfig(
        conv_layers=((64, 2, 2),) * 4, embed_dim=128, layers=4, heads=4, ffn_dim=512,
        conv_pos=32, conv_pos_groups=8,
    ),
    # For tests and CPU demos (~0.1 M parameters); conv_dim != embed_dim keeps fairseq's module layout.
    "tiny": EncoderConfig(
        conv_layers=((32, 2, 2),) * 4, embed_dim=64, layers=2, heads=4, ffn_dim=128,
        conv_pos=16, conv_pos_groups=4,
    ),
}

#: Effective batch (segments per update) of the reference pretraining: 4 GPUs x update_freq 2 x 128.
REFERENCE_UPDATE_SEGMENTS = 1024

#: Pretraining defaults of each preset that differ from the ECG-FM reference (``ecgfm pretrain``'s own defaults):
#: keys are ``TrainOptions`` fields and, under ``"pretrain"``, ``PretrainConfig`` fields. An option given on the
#: command line always wins. ``base``/``large`` are the reference: no overrides, and the update is
#: :data:`REFERENCE_UPDATE_SEGMENTS` segments whatever the world size (gradient accumulation fills the gap).
#: ``small`` is the laptop recipe (docs/experiments.md says how it was chosen): schedules that follow the run
#: (warm-up then cosine learning rate, Gumbel temperature annealed start -> end across the run), a codebook,
#: projection and negatives scaled to a 128-wide model, and small batches for many updates. ``tiny`` keeps
#: the reference objective at a small batch (fast tests).
RECIPES: dict[str, dict[str, Any]] = {
    "base": {"update_segments": REFERENCE_UPDATE_SEGMENTS},
    "large": {"update_segments": REFERENCE_UPDATE_SEGMENTS},
    "small": {
        "batch_size": 32, "lr": 1e-3, "lr_schedule": "cosine", "warmup_fraction": 0.05, "clip_norm": 1.0,
        "dropout": 0.0,
        "pretrain": {"latent_vars": 64, "final_dim": 64, "num_negatives": 20, "latent_temp_max": 2.0,
                     "latent_temp_min": 0.5, "latent_temp_schedule": "run"},
    },
    "tiny": {},
}


def preset(name: str, **overrides: Any) -> EncoderConfig:
    """A named preset (``base``, ``large``, ``small``, ``tiny``), optionally with fields overridden."""
    try:
        cfg = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model size {name!r}; choose one of {', '.join(PRESETS)}") from None
    return replace(cfg, **overrides) if overrides else cfg


def _cfg_sources(cfg_model: Any) -> list[dict]:
    """``cfg_model`` and any nested pretraining model configs, as plain dicts, most specific first."""
    out: list[dict] = []
    stack = [cfg_model]
    while stack and len(out) < 8:
        node = _as_dict(stack.pop(0))
        if node is None:
            continue
        out.append(node)
        for key in ("w2v_args", "args"):
            nested = _as_dict(node.get(key))
            if nested is not None:
                stack.append(nested.get("model", nested))
    return out


def _as_dict(obj: Any) -> dict | None:
    if isinstance(obj, dict):
        return obj
    if obj is not None and hasattr(obj, "__dict__") and not isinstance(obj, type):
        return dict(vars(obj))  # argparse.Namespace
    return None


def _encoder_prefix(state: dict) -> str:
    for key in state:
        if key.endswith("feature_extractor.conv_layers.0.0.weight"):
            return key[: -len("feature_extractor.conv_layers.0.0.weight")]
    return ""


def _parse_conv_layers(spec: Any) -> list[tuple[int, int, int]] | None:
    """Parse fairseq's ``conv_feature_layers`` string (e.g. ``"[(256, 2, 2)] * 4"``) without eval."""
    if spec is None:
        return None
    if isinstance(spec, (list, tuple)):
        return [tuple(int(v) for v in layer) for layer in spec]  # type: ignore[misc]
    try:
        value = _literal(ast.parse(str(spec), mode="eval").body)
        return [tuple(int(v) for v in layer) for layer in value]  # type: ignore[misc]
    except (ValueError, TypeError, SyntaxError):
        return None


def _literal(node: ast.AST) -> Any:
    """Evaluate lists/tuples of ints with ``+`` and ``*`` (all fairseq conv specs need)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_literal(e) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mult, ast.Add)):
        left, right = _literal(node.left), _literal(node.right)
        return left * right if isinstance(node.op, ast.Mult) else left + right
    raise ValueError(f"unsupported expression in conv_feature_layers: {ast.dump(node)}")


@dataclass
class PretrainConfig:
    """Every knob of the W2V + CMSC + RLM objective; defaults are the ECG-FM reference values (§2)."""

    # which terms are on (ablations)
    w2v: bool = True  # contrastive + diversity + feature penalty; False also disables time masking
    cmsc: bool = True
    rlm: bool = True  # applied by the data side (train.data.lead_keep); kept here for the run config
    # time masking (compute_span_mask)
    mask_prob: float = 0.65
    mask_length: int = 10
    min_masks: int = 2
    # quantizer / contrastive head
    latent_vars: int = 320
    latent_groups: int = 2
    final_dim: int = 256  # also vq_dim (latent_dim 0 in the reference)
    latent_temp_max: float = 2.0
    latent_temp_min: float = 0.5
    latent_temp_decay: float = 0.999995
    #: "decay": ``max(latent_temp_max * decay ** update, latent_temp_min)`` (reference); "run": annealed
    #: geometrically from latent_temp_max to latent_temp_min across the run (progress 0 -> 1; the decay is unused)
    latent_temp_schedule: str = "decay"
    num_negatives: int = 100
    logit_temp: float = 0.1
    dropout_features: float = 0.1
    feature_grad_mult: float = 0.1  # overrides EncoderConfig.feature_grad_mult in pretraining
    # loss weights
    diversity_weight: float = 0.1
    features_pen_weight: float = 10.0
    cmsc_weight: float = 1.0
    # CMSC
    cmsc_temp: float = 0.1
    cmsc_eps: float = 1e-8
    cmsc_gather: bool = False  # reference: local batch only
    # RLM
    rlm_prob: float = 0.5  # probability that a lead is zeroed
    rlm_apply_prob: float = 1.0  # probability that a segment is perturbed at all
