"""ECG-FM models: encoder, classifier, its preparation for inference, pretraining heads, checkpoints.

Names are exported lazily so that ``import ecgfm_cli.model.config`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EncoderConfig": "config",
    "PRESETS": "config",
    "preset": "config",
    "EcgEncoder": "encoder",
    "EcgClassifier": "encoder",
    "GradMultiply": "encoder",
    "count_parameters": "encoder",
    "prepare_for_inference": "inference",
    "inference_copy": "inference",
    "CheckpointError": "checkpoint",
    "LoadedCheckpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
    "make_config": "checkpoint",
    "build_encoder": "checkpoint",
    "build_classifier": "checkpoint",
    "convert_fairseq": "checkpoint",
    "state_dict_from_fairseq": "checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
