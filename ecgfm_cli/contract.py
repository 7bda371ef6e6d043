"""The preprocessing contract: what an ECG-FM model expects its input to look like.

A contract travels in the Parquet metadata of every segments artifact and in every model
checkpoint's config; a command that feeds segments to a model refuses a mismatch
(see :func:`check_compatible`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

from ecgfm_cli.errors import EcgfmError

#: The lead order of ECG-FM's input rows (fairseq-signals ``LEAD_ORDER``).
STANDARD_LEADS: tuple[str, ...] = (
    "I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6",
)

# Spellings seen in the wild for each standard lead; matching is case-insensitive.
_ALIASES: dict[str, tuple[str, ...]] = {
    "I": ("I", "LI", "LEAD I", "LEAD_I", "L1", "DI"),
    "II": ("II", "LII", "LEAD II", "LEAD_II", "L2", "DII", "MLII"),
    "III": ("III", "LIII", "LEAD III", "LEAD_III", "L3", "DIII"),
    "aVR": ("AVR", "-AVR", "LEAD AVR"),
    "aVL": ("AVL", "LEAD AVL"),
    "aVF": ("AVF", "LEAD AVF"),
    **{f"V{i}": (f"V{i}", f"LEAD V{i}", f"C{i}") for i in range(1, 7)},
}
_ALIAS_TO_LEAD = {alias: lead for lead, aliases in _ALIASES.items() for alias in aliases}


def canonical_lead(name: str, lead_map: dict[str, str] | None = None) -> str | None:
    """Map a stored lead name to its standard name, or None if it is not a standard lead.

    ``lead_map`` (from ``--lead-map ECG=I``) is consulted first, case-insensitively. ``-aVR`` (inverted aVR,
    Cabrera display) maps to aVR; :func:`is_inverted` says its signal must be negated.
    """
    key = name.strip().upper()
    if lead_map:
        for src, dst in lead_map.items():
            if src.strip().upper() == key:
                return canonical_lead(dst)
    return _ALIAS_TO_LEAD.get(key)


def is_inverted(name: str, lead_map: dict[str, str] | None = None) -> bool:
    """Whether a stored lead holds the negative of its standard lead (``-aVR``), unless ``--lead-map`` names it."""
    key = name.strip().upper()
    return key == "-AVR" and not any(src.strip().upper() == key for src in (lead_map or {}))


@dataclass(frozen=True)
class Contract:
    """How raw records were turned into model input (ECG-FM's defaults).

    sample_rate: Hz after resampling. window: samples per segment. leads: row order.
    normalization: "zscore-record" = each lead z-scored over the whole resampled record.
    resample: "linear" = ECG-FM's endpoint-aligned linear interpolation.
    """

    sample_rate: int = 500
    window: int = 2500
    leads: tuple[str, ...] = STANDARD_LEADS
    normalization: str = "zscore-record"
    resample: str = "linear"
    version: int = 1
    # stride does not change what a model sees, so it is recorded but not compared.
    stride: int | None = field(default=None, compare=False)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> Contract:
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if "leads" in kw:
            kw["leads"] = tuple(kw["leads"])
        return cls(**kw)

    @classmethod
    def from_json(cls, s: str | bytes) -> Contract:
        return cls.from_dict(json.loads(s))


COMPARED_FIELDS = ("sample_rate", "window", "leads", "normalization", "resample")


def contract_differences(data: Contract, model: Contract) -> list[str]:
    """Human-readable list of the fields in which ``data`` differs from ``model``."""
    out = []
    for name in COMPARED_FIELDS:
        a, b = getattr(data, name), getattr(model, name)
        if a != b:
            out.append(f"{name}: segments have {a!r}, model expects {b!r}")
    return out


class ContractMismatch(EcgfmError, ValueError):
    pass


def check_compatible(data: Contract, model: Contract, what: str = "segments") -> None:
    """Raise :class:`ContractMismatch` naming each differing field."""
    diffs = contract_differences(data, model)
    if diffs:
        raise ContractMismatch(
            f"{what} were made under a different preprocessing contract than the model: "
            + "; ".join(diffs)
            + ". Re-run `ecgfm segment` with matching --sample-rate/--seconds."
        )
