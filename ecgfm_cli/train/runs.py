"""What ``ecgfm pretrain`` and ``ecgfm finetune`` runs share: per-rank seeding, the autocast context, and the
run directory's JSON-lines log."""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path

import numpy as np
import torch


def seed_everything(seed: int, rank: int) -> None:
    """Seed Python's, numpy's and torch's global generators, differently on every rank."""
    s = seed * 1_000_003 + rank + 1
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to bfloat16 for ``dtype == "bfloat16"``; nothing for ``float32``."""
    if dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if dtype != "float32":
        raise ValueError(f"dtype {dtype!r}: expected float32 or bfloat16")
    return contextlib.nullcontext()


def append_jsonl(path: Path, obj: dict) -> None:
    """Append ``obj`` as one JSON line."""
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    """The JSON lines of ``path``; a last line cut short (the run was killed while appending it) is dropped."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    entries = []
    for i, line in enumerate(lines):
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not JSON") from None
    return entries


def read_log(run: str | Path) -> list[dict]:
    """The entries of ``RUN/log.jsonl`` (a pretraining or a finetuning run)."""
    return read_jsonl(Path(run, "log.jsonl"))
