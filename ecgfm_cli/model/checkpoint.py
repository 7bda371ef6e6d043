"""Checkpoints: the official fairseq-signals ECG-FM ``.pt`` files and the project's own directory format.

Our format is a DIRECTORY holding ``model.safetensors`` (the module's ``state_dict``) and ``config.json``::

    {"format": "ecgfm", "format_version": 1,
     "kind": "encoder" | "pretraining" | "classifier",
     "encoder": {EncoderConfig fields},
     "heads": {free-form: {"n_labels": N, "final_dropout": p} for a classifier,
               {"latent_groups", "latent_vars", "latent_dim", "final_dim"} for pretraining},
     "contract": {Contract fields}, "labels": [names] | null,
     "label_kinds": {name: "binary" | "continuous"} | null,
     "source": {free-form provenance}}

State-dict layout per kind: ``encoder`` = bare :class:`EcgEncoder` keys; ``classifier`` = ``encoder.*`` +
``proj.*`` (:class:`EcgClassifier`, = the official finetuned layout); ``pretraining`` = ``encoder.*`` +
``mask_emb``, ``quantizer.*``, ``project_q.*``, ``final_proj.*`` (fairseq head names).
The pos-conv weight norm is stored as torch's parametrisation, ``conv_pos.pos_conv.0.parametrizations.
weight.original0`` (g, (1, 1, K)) and ``.original1`` (v, (D, D/groups, K)); effective weight
``W[:, :, k] = g[k] * v[:, :, k] / ||v[:, :, k]||``. Loading also accepts ``weight_g``/``weight_v`` and a
plain folded ``weight``.

Official files are read with ``torch.load(weights_only=True)``; a few harmless globals fairseq may pickle
(``argparse.Namespace``, numpy scalars/arrays) are allowlisted explicitly; anything else needs the caller's
explicit ``allow_pickle=True`` (which runs pickled code: trusted files only).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ecgfm_cli.contract import Contract
from ecgfm_cli.errors import EcgfmError
from ecgfm_cli.model.config import EncoderConfig
from ecgfm_cli.model.encoder import EcgClassifier, EcgEncoder

FORMAT = "ecgfm"
FORMAT_VERSION = 1
KINDS = ("encoder", "pretraining", "classifier")
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

#: Keys of the wav2vec 2.0 pretraining heads (dropped when only the encoder is wanted).
PRETRAINING_HEAD_PREFIXES = ("mask_emb", "quantizer.", "project_q.", "final_proj.", "target_glu.")
_POS_CONV = "conv_pos.pos_conv.0."
_G = _POS_CONV + "parametrizations.weight.original0"
_V = _POS_CONV + "parametrizations.weight.original1"

# Globals fairseq checkpoints may contain that only rebuild plain data (no code runs).
_HARMLESS_GLOBALS = {
    "argparse.Namespace",
    "collections.OrderedDict",
    "builtins.set",
    "builtins.frozenset",
    "numpy.dtype",
    "numpy.ndarray",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
}
_HARMLESS_PATTERN = re.compile(r"numpy\.dtypes\.\w+DType")


class CheckpointError(EcgfmError, ValueError):
    """A file is not a usable ECG-FM checkpoint; the message says why and names offending keys."""


@dataclass
class LoadedCheckpoint:
    """A checkpoint in memory, in our layout whatever the source.

    kind: "encoder" | "pretraining" | "classifier". state_dict: our key layout (see module doc).
    config: the config.json dict (built on the fly for fairseq files). contract: the preprocessing
    contract the model expects. labels / label_kinds: classifier outputs, or None when unknown.
    """

    kind: str
    encoder_config: EncoderConfig
    state_dict: dict[str, Tensor]
    config: dict[str, Any]
    contract: Contract
    labels: list[str] | None = None
    label_kinds: dict[str, str] | None = None

    @property
    def heads(self) -> dict[str, Any]:
        return dict(self.config.get("heads") or {})


# ----------------------------------------------------------------------------- state-dict helpers


def normalize_weight_norm(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename every pos-conv weight-norm variant to torch's parametrisation keys (any key prefix).

    ``weight_g``/``weight_v`` -> ``parametrizations.weight.original0/1``; a plain folded ``weight``
    (3-D) is split into g = per-tap norm, v = weight. Other keys pass through unchanged.
    """
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        head, sep, name = key.rpartition(_POS_CONV)
        if not sep:
            out[key] = value
        elif name == "weight_g":
            out[head + _G] = value
        elif name == "weight_v":
            out[head + _V] = value
        elif name == "weight" and value.dim() == 3:
            out[head + _G] = torch.linalg.vector_norm(value.float(), dim=(0, 1), keepdim=True).to(value.dtype)
            out[head + _V] = value
        else:
            out[key] = value
    return out


def state_dict_from_fairseq(state: Mapping[str, Any]) -> tuple[str, dict[str, Tensor]]:
    """Official fairseq-signals model state -> (kind, state in our layout). Pure function.

    Pretrained files (unprefixed encoder keys + heads) become ``"pretraining"`` (``encoder.`` prefix
    added, heads kept); the same without heads becomes ``"encoder"``; finetuned files (``encoder.`` +
    ``proj.*``) become ``"classifier"`` (a stray ``encoder.mask_emb`` is dropped). A DDP ``module.``
    prefix is stripped and weight-norm namings are normalised. Raises :class:`CheckpointError` when the
    keys are not an ECG-FM model's.
    """
    if "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    if not tensors or len(tensors) != len(state):
        bad = sorted(str(k) for k, v in state.items() if not isinstance(v, Tensor))[:5]
        raise CheckpointError(f"the model state is not a dict of tensors (non-tensor entries: {bad})")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    tensors = normalize_weight_norm(tensors)

    conv0 = "feature_extractor.conv_layers.0.0.weight"
    if conv0 in tensors:
        has_heads = any(k.startswith(PRETRAINING_HEAD_PREFIXES) for k in tensors)
        if not has_heads:
            return "encoder", tensors
        return "pretraining", {
            (k if k.startswith(PRETRAINING_HEAD_PREFIXES) else "encoder." + k): v for k, v in tensors.items()
        }
    if "encoder." + conv0 in tensors:
        tensors.pop("encoder.mask_emb", None)
        if "proj.weight" in tensors:
            return "classifier", tensors
        if any(k.startswith(PRETRAINING_HEAD_PREFIXES) for k in tensors):
            return "pretraining", tensors
        return "encoder", {k.removeprefix("encoder."): v for k, v in tensors.items()}
    sample = ", ".join(sorted(tensors)[:5])
    raise CheckpointError(
        f"not an ECG-FM (wav2vec 2.0 ECG transformer) state dict: no {conv0!r} key (first keys: {sample})"
    )


def encoder_state(kind: str, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The bare encoder's keys out of a state in our layout (heads / ``proj`` dropped)."""
    if kind == "encoder":
        return dict(state)
    return {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}


def expected_encoder_shapes(cfg: EncoderConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an :class:`EcgEncoder` for ``cfg`` (built on the meta device: no memory, fast)."""
    with torch.device("meta"):
        model = EcgEncoder(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_state(expected: Mapping[str, tuple[int, ...]], state: Mapping[str, Tensor], what: str) -> None:
    """Raise ONE :class:`CheckpointError` listing missing, unexpected and mis-shaped keys, if any."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {expected[k]}"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != tuple(expected[k])
    ]
    if not (missing or unexpected or mismatched):
        return
    parts = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches", mismatched)):
        if items:
            shown = "; ".join(items[:20]) + (f"; ... ({len(items) - 20} more)" if len(items) > 20 else "")
            parts.append(f"{label} ({len(items)}): {shown}")
    raise CheckpointError(f"{what} does not match the model: " + " | ".join(parts))


def pretraining_heads_from_state(state: Mapping[str, Tensor], cfg_model: Mapping | None = None) -> dict:
    """Head sizes of the wav2vec 2.0 pretraining heads from their tensor shapes (cfg as fallback).

    Returns ``{"latent_groups", "latent_vars", "latent_dim", "final_dim"}`` (latent_dim = total codeword
    width = ``project_q`` input); an empty dict when the heads are absent.
    """
    cfg_model = cfg_model or {}
    if "quantizer.vars" not in state or "project_q.weight" not in state:
        return {}
    _, n_codes, var_dim = state["quantizer.vars"].shape
    final_dim, latent_dim = state["project_q.weight"].shape
    exact = bool(var_dim) and latent_dim % var_dim == 0
    groups = latent_dim // var_dim if exact else cfg_model.get("latent_groups", 2)
    return {
        "latent_groups": int(groups),
        "latent_vars": int(n_codes // groups),
        "latent_dim": int(latent_dim),
        "final_dim": int(final_dim),
    }


# ----------------------------------------------------------------------------- reading files


def _resolve_dir(path: Path) -> Path | None:
    """Our checkpoint dir for ``path`` (the dir, its config.json or its model.safetensors, or a
    training run dir whose ``latest`` file names its newest checkpoint), else None."""
    if path.is_dir():
        if (path / CONFIG_FILE).is_file():
            return path
        latest = path / "latest"  # written by `ecgfm pretrain` (train/pretrain.py LATEST)
        if latest.is_file():
            target = path / latest.read_text().strip()
            return target if (target / CONFIG_FILE).is_file() else None
        if (path / "checkpoint" / CONFIG_FILE).is_file():  # an `ecgfm finetune` run dir
            return path / "checkpoint"
        return None
    if path.name in (CONFIG_FILE, WEIGHTS_FILE) and (path.parent / CONFIG_FILE).is_file():
        return path.parent
    return None


def load_checkpoint(path: str | os.PathLike, allow_pickle: bool = False) -> LoadedCheckpoint:
    """Load our checkpoint directory (or its config.json / model.safetensors, or a pretrain/finetune
    run directory: its newest checkpoint) or an official ``.pt``.

    Official fairseq files are converted on the fly (contract = ECG-FM's default :class:`Contract`).
    Keys and shapes are checked strictly; any problem raises one :class:`CheckpointError`.
    ``allow_pickle=True`` permits arbitrary pickled objects in ``.pt`` files (runs code: trusted files only).
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    ckpt_dir = _resolve_dir(p)
    if ckpt_dir is not None:
        return _load_dir(ckpt_dir)
    if p.is_dir():
        raise CheckpointError(f"{p}: a directory without {CONFIG_FILE}, so not an ecgfm checkpoint")
    if p.suffix == ".safetensors":
        raise CheckpointError(f"{p}: a bare .safetensors file needs its {CONFIG_FILE} beside it")
    return _load_fairseq(p, allow_pickle)


def _load_dir(d: Path) -> LoadedCheckpoint:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        config = json.loads((d / CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{d / CONFIG_FILE}: unreadable config ({e})") from e
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{d / CONFIG_FILE}: not an ecgfm checkpoint config (format != {FORMAT!r})")
    if int(config.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(
            f"{d}: checkpoint format_version {config['format_version']} is newer than this ecgfm "
            f"understands ({FORMAT_VERSION}); upgrade ecgfm"
        )
    kind = config.get("kind")
    if kind not in KINDS:
        raise CheckpointError(f"{d / CONFIG_FILE}: kind {kind!r} is not one of {KINDS}")
    try:
        enc_cfg = EncoderConfig.from_dict(config.get("encoder") or {})
        contract = Contract.from_dict(config.get("contract") or {})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{d / CONFIG_FILE}: {e}") from e
    if not (d / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{d}: missing {WEIGHTS_FILE}")
    try:
        state = load_file(str(d / WEIGHTS_FILE))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{d / WEIGHTS_FILE}: unreadable safetensors file ({e})") from e
    state = normalize_weight_norm(state)
    loaded = LoadedCheckpoint(
        kind=kind, encoder_config=enc_cfg, state_dict=state, config=config, contract=contract,
        labels=config.get("labels"), label_kinds=config.get("label_kinds"),
    )
    _validate(loaded, str(d))
    return loaded


def _torch_load(p: Path, allow_pickle: bool) -> Any:
    """``torch.load`` without running pickled code unless ``allow_pickle``; clear errors otherwise."""
    with open(p, "rb") as f:
        head = f.read(4)
    if not (zipfile.is_zipfile(p) or head[:1] == b"\x80"):
        raise CheckpointError(f"{p}: not a PyTorch checkpoint (neither a torch zip archive nor a pickle)")
    if allow_pickle:
        try:
            return torch.load(p, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
            raise CheckpointError(f"{p}: not a PyTorch checkpoint ({type(e).__name__}: {e})") from e
    try:
        return _load_weights_only(p)
    except pickle.UnpicklingError as e:
        unsafe = _unsafe_globals(p)
        if unsafe is None or not unsafe:
            raise CheckpointError(f"{p}: not a PyTorch checkpoint ({_first_line(e)})") from e
        blocked = [g for g in unsafe if not _harmless(g)]
        if blocked:
            raise CheckpointError(
                f"{p}: refusing to unpickle {', '.join(blocked)} (loading would run code from the file). "
                "Official ECG-FM checkpoints do not need this; if you trust this file, pass "
                "--unsafe-pickle (allow_pickle=True from Python)."
            ) from e
        try:
            with torch.serialization.safe_globals(_safe_objects(unsafe)):
                return _load_weights_only(p)
        except (pickle.UnpicklingError, ImportError, AttributeError) as e2:
            raise CheckpointError(f"{p}: could not be read safely ({_first_line(e2)})") from e2
    except Exception as e:  # noqa: BLE001 - garbage input fails in arbitrary ways inside the unpickler
        raise CheckpointError(f"{p}: not a PyTorch checkpoint ({type(e).__name__}: {_first_line(e)})") from e


def _load_weights_only(p: Path) -> Any:
    try:  # mmap avoids a second in-memory copy of the ~1 GB official files
        return torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e) and "zipfile" not in str(e):
            raise
        return torch.load(p, map_location="cpu", weights_only=True)


def _unsafe_globals(p: Path) -> list[str] | None:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(p))
    except Exception:  # noqa: BLE001 - legacy / non-zip files cannot be inspected
        return None


def _harmless(name: str) -> bool:
    return name in _HARMLESS_GLOBALS or bool(_HARMLESS_PATTERN.fullmatch(name))


def _safe_objects(names: list[str]) -> list[Any]:
    """The allowlisted objects for ``names``; numpy scalars also need their dtype classes, which
    ``get_unsafe_globals_in_checkpoint`` does not list."""
    objs = []
    for name in names:
        module, _, attr = name.rpartition(".")
        objs.append(getattr(importlib.import_module(module), attr))
    if any(n.startswith("numpy.") for n in names):
        dtypes = importlib.import_module("numpy.dtypes")
        objs += [getattr(dtypes, n) for n in dir(dtypes) if _HARMLESS_PATTERN.fullmatch(f"numpy.dtypes.{n}")]
    return objs


def _first_line(e: BaseException) -> str:
    """The informative line of a (possibly long, boilerplate-led) torch.load error."""
    text = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    for i, line in enumerate(text):
        if "WeightsUnpickler error" in line:
            rest = line.split("WeightsUnpickler error:", 1)[-1].strip()
            return rest or (text[i + 1] if i + 1 < len(text) else line)
    return text[0] if text else type(e).__name__


def _load_fairseq(p: Path, allow_pickle: bool) -> LoadedCheckpoint:
    obj = _torch_load(p, allow_pickle)
    if not isinstance(obj, Mapping) or not isinstance(obj.get("model"), Mapping):
        what = type(obj).__name__ if not isinstance(obj, Mapping) else f"dict with keys {sorted(obj)[:8]}"
        raise CheckpointError(
            f"{p}: not a fairseq ECG-FM checkpoint (expected a dict with 'cfg' and 'model', got {what})"
        )
    cfg = obj.get("cfg")
    if not isinstance(cfg, Mapping):  # old fairseq: one flat argparse.Namespace under "args"
        args = obj.get("args")
        cfg = {"model": vars(args)} if args is not None and hasattr(args, "__dict__") else {}
    cfg_model = dict(cfg["model"]) if isinstance(cfg.get("model"), Mapping) else {}
    kind, state = state_dict_from_fairseq(obj["model"])
    try:
        enc_cfg = EncoderConfig.from_fairseq(cfg_model, state)
    except ValueError as e:
        raise CheckpointError(f"{p}: {e}") from e

    heads: dict[str, Any] = {}
    if kind == "classifier":
        heads = {"n_labels": int(state["proj.weight"].shape[0]),
                 "final_dropout": float(cfg_model.get("final_dropout") or 0.0)}
    elif kind == "pretraining":
        heads = pretraining_heads_from_state(state, cfg_model)
    config = make_config(
        kind, enc_cfg, heads=heads, contract=Contract(),
        source={"format": "fairseq-signals", "file": p.name, "model_name": cfg_model.get("_name")},
    )
    loaded = LoadedCheckpoint(kind=kind, encoder_config=enc_cfg, state_dict=state, config=config,
                              contract=Contract())
    try:
        _validate(loaded, str(p))
    except CheckpointError as e:
        if kind == "pretraining":  # say how the reported names relate to the file's own keys
            raise CheckpointError(f"{e} (names in ecgfm layout: the file's encoder keys with an "
                                  "'encoder.' prefix)") from None
        raise
    return loaded


def _validate(loaded: LoadedCheckpoint, what: str) -> None:
    """Strict key/shape check of the encoder part and of the head keys for the checkpoint's kind."""
    expected = expected_encoder_shapes(loaded.encoder_config)
    state = loaded.state_dict
    if loaded.kind == "encoder":
        check_state(expected, state, what)
        return
    full = {"encoder." + k: v for k, v in expected.items()}
    if loaded.kind == "classifier":
        n = state["proj.weight"].shape[0] if "proj.weight" in state else loaded.heads.get("n_labels", 0)
        full["proj.weight"] = (int(n), loaded.encoder_config.embed_dim)
        full["proj.bias"] = (int(n),)
        check_state(full, state, what)
    else:  # pretraining: heads are checked by the pretraining wrapper's own strict load
        heads = {k: tuple(v.shape) for k, v in state.items() if k.startswith(PRETRAINING_HEAD_PREFIXES)}
        check_state({**full, **heads}, state, what)
    labels = loaded.labels
    if loaded.kind == "classifier" and labels is not None and len(labels) != full["proj.bias"][0]:
        raise CheckpointError(
            f"{what}: {len(labels)} labels in the config but proj has {full['proj.bias'][0]} outputs"
        )


# ----------------------------------------------------------------------------- building modules


def build_encoder(loaded: LoadedCheckpoint) -> EcgEncoder:
    """An :class:`EcgEncoder` with the checkpoint's weights (strict; heads / ``proj`` dropped)."""
    state = encoder_state(loaded.kind, loaded.state_dict)
    check_state(expected_encoder_shapes(loaded.encoder_config), state, "encoder weights")
    model = EcgEncoder(loaded.encoder_config)
    model.load_state_dict(state, strict=True)
    return model


def build_classifier(loaded: LoadedCheckpoint, n_labels: int | None = None) -> EcgClassifier:
    """An :class:`EcgClassifier`: all weights from a classifier checkpoint (strict), or the encoder of
    an encoder/pretraining checkpoint with a freshly initialised ``proj`` of ``n_labels`` outputs."""
    cfg = loaded.encoder_config
    if loaded.kind == "classifier":
        ckpt_labels = int(loaded.state_dict["proj.weight"].shape[0])
        if n_labels is not None and n_labels != ckpt_labels:
            raise CheckpointError(f"checkpoint classifier has {ckpt_labels} outputs, {n_labels} requested")
        model = EcgClassifier(cfg, ckpt_labels, final_dropout=float(loaded.heads.get("final_dropout", 0.0)))
        model.load_state_dict(loaded.state_dict, strict=True)
        return model
    if n_labels is None:
        raise CheckpointError(f"a {loaded.kind} checkpoint has no classification head: pass n_labels")
    return EcgClassifier(cfg, n_labels, encoder=build_encoder(loaded))


# ----------------------------------------------------------------------------- writing


def make_config(
    kind: str,
    encoder_config: EncoderConfig,
    heads: dict | None = None,
    contract: Contract | None = None,
    labels: list[str] | None = None,
    label_kinds: dict[str, str] | None = None,
    source: dict | None = None,
) -> dict[str, Any]:
    """A config.json dict in our schema (see the module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {KINDS}")
    contract_d = asdict(contract or Contract())
    contract_d["leads"] = list(contract_d["leads"])
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "encoder": encoder_config.to_dict(),
        "heads": dict(heads or {}),
        "contract": contract_d,
        "labels": list(labels) if labels is not None else None,
        "label_kinds": dict(label_kinds) if label_kinds is not None else None,
        "source": dict(source or {}),
    }


def save_checkpoint(
    path: str | os.PathLike, state_dict: Mapping[str, Tensor], config: Mapping[str, Any]
) -> Path:
    """Write our checkpoint directory atomically; returns its path.

    Files go to a temporary sibling directory which is then renamed into place; an existing ecgfm
    checkpoint (or empty directory) at ``path`` is replaced, anything else there is refused
    (``FileExistsError``). ``config`` must follow the schema (see :func:`make_config`); the encoder
    part of ``state_dict`` is checked against ``config["encoder"]`` before anything is written.
    """
    from safetensors.torch import save_file

    dest = Path(path)
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, **dict(config)}
    if config.get("kind") not in KINDS:
        raise ValueError(f"config kind {config.get('kind')!r} is not one of {KINDS}")
    state = {k: v.detach().to("cpu").contiguous().clone()
             for k, v in normalize_weight_norm(state_dict).items()}
    loaded = LoadedCheckpoint(
        kind=config["kind"], encoder_config=EncoderConfig.from_dict(config.get("encoder") or {}),
        state_dict=state, config=config, contract=Contract.from_dict(config.get("contract") or {}),
        labels=config.get("labels"),
    )
    _validate(loaded, "state_dict to save")
    if dest.exists() and not _replaceable(dest):
        raise FileExistsError(f"{dest} exists and is not an ecgfm checkpoint directory; not overwriting")

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")
        old = None
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.replace(dest, old / "ckpt")
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _replaceable(dest: Path) -> bool:
    if not dest.is_dir():
        return False
    if not any(dest.iterdir()):
        return True
    try:
        return json.loads((dest / CONFIG_FILE).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def convert_fairseq(pt_path: str | os.PathLike, out_dir: str | os.PathLike, allow_pickle: bool = False,
                    labels: list[str] | None = None) -> LoadedCheckpoint:
    """Convert an official ECG-FM ``.pt`` into our directory format (``ecgfm convert``).

    The kind follows the file (pretrained -> "pretraining" with heads kept, finetuned -> "classifier");
    ``labels`` optionally names a classifier's outputs. Provenance (file name, sha256) goes to "source".
    Returns the checkpoint as re-loaded from ``out_dir``.
    """
    if Path(pt_path).is_dir():
        raise CheckpointError(f"{pt_path}: already an ecgfm checkpoint directory; nothing to convert")
    loaded = load_checkpoint(pt_path, allow_pickle=allow_pickle)
    config = dict(loaded.config)
    config["source"] = {**config["source"], "sha256": sha256_file(pt_path)}
    if labels is not None:
        config["labels"] = list(labels)
    save_checkpoint(out_dir, loaded.state_dict, config)
    return load_checkpoint(out_dir)
