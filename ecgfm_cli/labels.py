"""Label tables: reading them, turning diagnosis codes into named 0/1 labels, label kinds.

Two layouts are accepted (docs/artifacts.md ``labels``):

* **wide**: ``record_id`` plus one column per label (0/1, bool, or a continuous value such as LVEF), optional
  ``patient_id`` and ``split`` (train/valid/test);
* **long** (what ``ecgfm ingest`` writes): ``record_id``, ``patient_id``, ``codes`` (list<string>) plus a label
  map (CSV ``code,label[,name]``; several codes may map to one label, which merges equivalent codes). Numeric user
  columns of that table are kept as extra labels.

A column is *binary* when every non-missing value is 0 or 1, otherwise *continuous*. Missing values are NaN.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, get_args

import numpy as np

from ecgfm_cli.errors import EcgfmError
from ecgfm_cli.eval_options import Aggregate
from ecgfm_cli.splits import SPLITS

#: Columns of a labels table that are never labels.
RESERVED_COLUMNS = ("record_id", "patient_id", "study_id", "split", "codes", "segment_index")
#: Label maps shipped with the package, usable by name with ``--label-map NAME``.
PACKAGED_LABEL_MAPS = {"challenge2021": "challenge2021_scored.csv"}
#: The newest ``ecgfm.schema_version`` this module knows.
SCHEMA_VERSION = 1
#: Artifacts whose rows carry a signal or an embedding: :func:`read_table` refuses them (from the footer, before
#: reading) unless the caller names the kind. Read whole as a labels table, a segments file would cost its size in
#: memory, then fail on its repeated record_id or, with one segment per record, make labels of its carried columns.
BULK_KINDS = ("records", "segments", "embeddings")


class LabelError(EcgfmError, ValueError):
    """A labels table or label map that cannot be used; the message says what and how to fix it."""


# --------------------------------------------------------------------------------------------- reading tables
def read_table(path: str | Path, kinds: tuple[str, ...] = ()) -> Any:
    """Read an artifact or a small table into a ``pyarrow.Table``.

    Accepts a ``.parquet`` file, a directory of Parquet shards (``<kind>-*.parquet`` for the first of ``kinds``
    present, else every ``*.parquet``, in sorted order), an Arrow IPC file (``.arrow``/``.feather``; a file is
    read as what its first bytes say, :mod:`ecgfm_cli.io.tables`), ``-`` (Arrow IPC stream on stdin) or a ``.csv``
    (gzip allowed; id columns read as strings).
    Refuses an ``ecgfm.schema_version`` newer than this module knows, and an artifact of a :data:`BULK_KINDS` kind
    that is not in ``kinds`` (a segments file given as a labels table), naming the labels table beside it if any.
    """
    import pyarrow as pa

    from ecgfm_cli.io.tables import TableFileError, read_columns

    s = str(path)
    p = Path(path)
    if s == "-":
        from ecgfm_cli.io.artifacts import read_stdin_stream

        table = read_stdin_stream("")
    elif p.is_dir():
        from ecgfm_cli.io.artifacts import check_complete

        check_complete(p, "")  # shards interrupted or missing: refused (unless --allow-partial)
        files: list[Path] = []
        for kind in kinds:
            files = sorted(p.glob(f"{kind}-*.parquet"))
            if files:
                break
        if not files:
            files = sorted(f for f in p.glob("*.parquet") if ".tmp-" not in f.name)
        if not files:
            raise LabelError(f"{p}: directory holds no .parquet files")
        try:
            for f in files:  # every footer: a labels file sorting first must not let the segments beside it through
                _refuse_bulk(p, f, kinds)
            tables = [read_columns(f) for f in files]
        except TableFileError as e:
            raise LabelError(str(e)) from e
        meta = tables[0].schema.metadata
        try:
            table = pa.concat_tables(tables, promote_options="default").replace_schema_metadata(meta)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise LabelError(f"{p}: its files hold different columns ({e})") from e
    elif not p.exists():
        raise LabelError(f"{p}: no such file or directory")
    elif p.name.lower().endswith((".csv", ".csv.gz")):
        import pyarrow.csv as pacsv

        ids = ("record_id", "patient_id", "study_id", "exam_id", "split")
        try:
            table = pacsv.read_csv(p, convert_options=pacsv.ConvertOptions(
                strings_can_be_null=True, column_types={k: pa.string() for k in ids}))
        except pa.ArrowInvalid as e:
            raise LabelError(f"{p}: not a readable CSV table ({e})") from e
    else:
        try:
            _refuse_bulk(p, p, kinds)
            table = read_columns(p)
        except TableFileError as e:
            hint = "; a table is .parquet, .arrow, .csv or a directory of .parquet files" if e.kind == "foreign" else ""
            raise LabelError(f"{e}{hint}") from e
    check_schema_version(table_metadata(table), str(p))
    return table


def _refuse_bulk(path: Path, file: Path, kinds: tuple[str, ...]) -> None:
    """:class:`LabelError` when ``file`` (``path`` itself, or a file of directory ``path``) is an artifact of
    a :data:`BULK_KINDS` kind not in ``kinds``; reads only its footer. ``TableFileError`` when it cannot be read."""
    from ecgfm_cli.io.tables import read_schema

    kind = (read_schema(file).metadata or {}).get(b"ecgfm.kind", b"").decode()
    if kind not in BULK_KINDS or kind in kinds:
        return
    want = kinds[0] if kinds else "labels"
    beside = path.with_name(path.stem + ".labels.parquet")  # what segment/ingest write beside a single file
    hint = f": give its labels table, {beside}" if want == "labels" and path.is_file() and beside.is_file() else ""
    rows = {"records": "record, with its signal", "segments": "segment, with its signal",
            "embeddings": "segment, with its embedding"}[kind]
    raise LabelError(f"{path}: holds {kind} (one row per {rows}), not a {want} table{hint}")


def table_metadata(table: Any) -> dict[str, str]:
    """The schema's key-value metadata decoded to ``str -> str``."""
    meta = table.schema.metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items()}


def check_schema_version(meta: dict[str, str], where: str) -> None:
    v = meta.get("ecgfm.schema_version")
    if v is not None and int(v) > SCHEMA_VERSION:
        raise LabelError(
            f"{where}: written with ecgfm schema_version {v}, this ecgfm reads up to {SCHEMA_VERSION}; upgrade ecgfm"
        )


def string_column(table: Any, name: str) -> np.ndarray | None:
    """A string column as an object array with ``None`` for nulls, or None when the column is absent."""
    if name not in table.column_names:
        return None
    col = table.column(name)
    return np.array([None if v is None else str(v) for v in col.to_pylist()], dtype=object)


# --------------------------------------------------------------------------------------------- labels in records
#: Optional ``records`` column (a struct) holding, per record, the columns of ``ingest --labels FILE``: a stream
#: has no room for a labels table beside it, so the user's labels travel inside the records to ``segment``.
USER_LABELS_COLUMN = "user_labels"


class UserLabelCarrier:
    """The user's ``--labels`` table, looked up per batch of records (``attach``) so that its columns travel in
    the records artifact as the :data:`USER_LABELS_COLUMN` struct.

    ``user``: the table as read; ``key``: its id column (``record_id``, or ``study_id``/``exam_id``, matched to the
    records' ``study_id``), as ``ecgfm_cli.ingest.check_user_labels`` chooses it. A key listed twice keeps its last
    row, as ingest's labels table does.
    """

    def __init__(self, user: Any, key: str) -> None:
        import pyarrow as pa

        self.ours = "record_id" if key == "record_id" else "study_id"
        self.names = [n for n in user.column_names if n not in (key, "record_id", "study_id", "codes")]
        self.field = pa.field(USER_LABELS_COLUMN, pa.struct([user.schema.field(n) for n in self.names]))
        keys = [None if v is None else str(v) for v in user.column(key).to_pylist()]
        self._row = {k: i for i, k in enumerate(keys) if k is not None}
        self._values = user.select(self.names).combine_chunks()

    def __bool__(self) -> bool:
        return bool(self.names)

    def schema(self, records: Any) -> Any:
        """``records`` (a ``pyarrow.Schema``) with the struct column appended."""
        return records.append(self.field)

    def attach(self, batch: Any) -> Any:
        """A ``records`` batch with the user's label values of each of its records appended (null where the
        table has no row for the record)."""
        import pyarrow as pa

        idx = pa.array([self._row.get(None if v is None else str(v)) for v in batch.column(self.ours).to_pylist()],
                       pa.int64())
        taken = self._values.take(idx)
        struct = pa.StructArray.from_arrays([taken.column(n).combine_chunks() for n in self.names],
                                            fields=list(self.field.type), mask=idx.is_null())
        return pa.RecordBatch.from_arrays([*batch.columns, struct], schema=self.schema(batch.schema))


# --------------------------------------------------------------------------------------------- label maps
@dataclass(frozen=True)
class LabelMap:
    """code -> label; ``labels`` in first-appearance order; ``names``: label -> descriptive names (may be empty)."""

    code_to_label: dict[str, str]
    labels: tuple[str, ...]
    names: dict[str, tuple[str, ...]] = field(default_factory=dict)
    source: str = ""


def load_label_map(spec: str | Path) -> LabelMap:
    """Load a label map: a packaged name (``challenge2021``) or a CSV path.

    The CSV has a header with ``code`` and ``label`` columns (optional ``name``); ``#`` lines are comments.
    A code listed twice with two different labels is an error.
    """
    key = str(spec)
    if key in PACKAGED_LABEL_MAPS:
        res = resources.files("ecgfm_cli").joinpath("data").joinpath(PACKAGED_LABEL_MAPS[key])
        text = res.read_text(encoding="utf-8")
        source = f"ecgfm_cli/data/{PACKAGED_LABEL_MAPS[key]}"
    else:
        p = Path(spec)
        if not p.is_file():
            raise LabelError(
                f"label map {spec!r} is neither a file nor a packaged map ({', '.join(PACKAGED_LABEL_MAPS)})"
            )
        text = p.read_text(encoding="utf-8")
        source = str(p)
    return parse_label_map(text, source)


def parse_label_map(text: str, source: str = "<text>") -> LabelMap:
    """Parse label-map CSV text (see :func:`load_label_map`)."""
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    reader = csv.DictReader(io.StringIO("\n".join(lines)))
    cols = [c.strip().lower() for c in (reader.fieldnames or [])]
    if "code" not in cols or "label" not in cols:
        raise LabelError(f"{source}: a label map needs a header with 'code' and 'label' columns, got {cols}")
    code_to_label: dict[str, str] = {}
    names: dict[str, list[str]] = {}
    order: list[str] = []
    for row in reader:
        row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k is not None}
        code, label = row["code"], row["label"]
        if not code or not label:
            continue
        if code in code_to_label and code_to_label[code] != label:
            raise LabelError(f"{source}: code {code} maps to both {code_to_label[code]!r} and {label!r}")
        code_to_label[code] = label
        if label not in names:
            names[label] = []
            order.append(label)
        if row.get("name") and row["name"] not in names[label]:
            names[label].append(row["name"])
    if not code_to_label:
        raise LabelError(f"{source}: the label map is empty")
    return LabelMap(code_to_label, tuple(order), {k: tuple(v) for k, v in names.items()}, source)


def codes_to_matrix(codes: list[list[str] | None], label_map: LabelMap) -> tuple[np.ndarray, dict[str, int]]:
    """Turn per-record code lists into a 0/1 matrix (n_records x n_labels, float64, label order of the map).

    A record whose code list is null gets NaN (unknown), an empty list gets all 0. Codes are compared after
    stripping whitespace. Returns the matrix and a count of codes not in the map (code -> occurrences).
    """
    col = {lab: j for j, lab in enumerate(label_map.labels)}
    out = np.zeros((len(codes), len(label_map.labels)), dtype=np.float64)
    unmapped: dict[str, int] = {}
    for i, cs in enumerate(codes):
        if cs is None:
            out[i] = np.nan
            continue
        for c in cs:
            c = str(c).strip()
            lab = label_map.code_to_label.get(c)
            if lab is None:
                unmapped[c] = unmapped.get(c, 0) + 1
            else:
                out[i, col[lab]] = 1.0
    return out, unmapped


def label_kind(values: np.ndarray) -> str:
    """``binary`` when all finite values are 0 or 1 (or there are none), else ``continuous``."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    return "binary" if np.all((v == 0) | (v == 1)) else "continuous"


def settle_label_kinds(table: LabelTable, labels: list[str], continuous: tuple[str, ...] | list[str] = ()
                       ) -> list[str]:
    """Fix the kind of each label about to be fitted (``probe``, ``finetune``) and say which are continuous.

    ``continuous`` (``--continuous NAME``) makes those labels continuous targets, a 0/1 one included. A label
    with exactly two distinct values that are not 0 and 1 (a 1/2 or 0/2 coding) is refused unless it is named
    there: fitting it as a regression target is rarely what was meant, and as a class nobody can tell which
    value is the positive one. Updates ``table.kinds`` in place; returns notes for the user (one line naming the
    continuous labels, with their ranges). Raises :class:`LabelError`.
    """
    unknown = [c for c in continuous if c not in table.labels]
    if unknown:
        raise LabelError(f"--continuous {', '.join(unknown)}: not a label of the table (labels: "
                         f"{', '.join(table.labels[:12])}{', ...' if len(table.labels) > 12 else ''})")
    refused = []
    for lab in labels:
        v = table.values[:, table.labels.index(lab)]
        distinct = np.unique(v[~np.isnan(v)])
        if lab in continuous:
            table.kinds[lab] = "continuous"
        elif table.kinds[lab] == "continuous" and len(distinct) == 2:
            refused.append(f"{lab!r} ({distinct[0]:g}/{distinct[1]:g})")
    if refused:
        names = [r.split("'")[1] for r in refused]
        raise LabelError(
            f"label(s) {', '.join(refused)} take two values that are not 0 and 1, so they would be fitted as "
            f"continuous targets: recode them to 0/1 (1 = the positive class), or pass "
            f"{' '.join(f'--continuous {n}' for n in names)} to fit them as continuous targets")
    described = []
    for lab in labels:
        if table.kinds[lab] != "continuous":
            continue
        v = table.values[:, table.labels.index(lab)]
        v = v[~np.isnan(v)]
        n = len(np.unique(v))
        described.append(f"{lab} ({v.min():g} to {v.max():g}, {n} distinct value{'s' if n != 1 else ''})" if len(v)
                         else f"{lab} (no values)")
    if not described:
        return []
    return [f"continuous targets (ridge/MSE, not classification; a label is binary only when coded 0/1): "
            f"{', '.join(described)}"]


# --------------------------------------------------------------------------------------------- the label table
@dataclass
class LabelTable:
    """Record-level labels. ``values``: (n_records, n_labels) float64, NaN = missing.

    ``patient_ids``/``split``: object arrays (None where missing) or None when the table has no such column.
    ``notes``: human-readable lines about what was ignored or derived (printed by the commands, stored in reports).
    """

    record_ids: np.ndarray
    labels: list[str]
    values: np.ndarray
    kinds: dict[str, str]
    patient_ids: np.ndarray | None = None
    split: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)
    label_map: LabelMap | None = None

    def index(self) -> dict[str, int]:
        return {r: i for i, r in enumerate(self.record_ids)}


def labels_from_table(table: Any, label_map: LabelMap | None = None, where: str = "labels") -> LabelTable:
    """Build a :class:`LabelTable` from a ``pyarrow.Table`` in the wide or the long layout (see module doc)."""
    import pyarrow as pa

    if "record_id" not in table.column_names:
        raise LabelError(f"{where}: no 'record_id' column (columns: {', '.join(table.column_names)})")
    rids = string_column(table, "record_id")
    if any(r is None for r in rids):
        raise LabelError(f"{where}: {sum(r is None for r in rids)} rows have an empty record_id")
    uniq, counts = np.unique(rids.astype(str), return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1]
        raise LabelError(f"{where}: record_id not unique ({len(dup)} repeated, e.g. {str(dup[0])!r})")
    notes: list[str] = []
    labels: list[str] = []
    cols: list[np.ndarray] = []

    wide = [n for n in table.column_names if n not in RESERVED_COLUMNS and _is_numeric(table.schema.field(n).type)]
    if "codes" in table.column_names and label_map is None:
        if not wide:
            raise LabelError(
                f"{where}: this is a long labels table (a 'codes' column); pass --label-map FILE.csv or "
                f"--label-map challenge2021 to turn codes into named labels"
            )
        # e.g. ingest's table with --labels columns joined, or the Chagas column: those are the labels
        notes.append(f"{where}: the 'codes' column is not used without --label-map; labels: {', '.join(wide)}")
    elif "codes" in table.column_names:
        codes = table.column("codes").to_pylist()
        mat, unmapped = codes_to_matrix(codes, label_map)
        known = sorted({str(c) for row in codes if row for c in row}) if not np.nansum(mat) else []
        if known:  # codes, but not one of them in the map
            raise LabelError(f"{where}: no code of the table is in the label map ({len(known)} distinct codes, "
                             f"e.g. {', '.join(known[:5]) or 'none'}); is it the map for this dataset?")
        labels.extend(label_map.labels)
        cols.extend(mat.T)
        if unmapped:
            n = sum(unmapped.values())
            top = ", ".join(f"{c} ({k})" for c, k in sorted(unmapped.items(), key=lambda kv: -kv[1])[:5])
            notes.append(f"{n} code occurrences ({len(unmapped)} distinct codes) are not in the label map and "
                         f"were ignored: {top}")
    elif label_map is not None:
        notes.append(f"{where}: --label-map ignored (the table has no 'codes' column; its columns are the labels)")

    for name in table.column_names:
        if name in RESERVED_COLUMNS:
            continue
        typ = table.schema.field(name).type
        if _is_numeric(typ):
            if name in labels:
                raise LabelError(f"{where}: column {name!r} clashes with a label of the label map")
            arr = table.column(name).cast(pa.float64()).to_numpy(zero_copy_only=False)
            labels.append(name)
            cols.append(np.asarray(arr, dtype=np.float64))
        else:
            notes.append(f"{where}: non-numeric column {name!r} ({typ}) is not a label and was ignored")
    if not labels:
        raise LabelError(f"{where}: no label columns (numeric 0/1 or continuous) and no 'codes' column")
    values = np.column_stack(cols) if cols else np.zeros((len(rids), 0))
    split = string_column(table, "split")
    if split is not None:
        bad = sorted({s for s in split if s is not None and s not in SPLITS})
        if bad:
            raise LabelError(f"{where}: split column has values {bad}; allowed: {', '.join(SPLITS)} (or empty)")
    kinds = {lab: label_kind(values[:, j]) for j, lab in enumerate(labels)}
    return LabelTable(
        record_ids=rids.astype(str).astype(object),
        labels=labels,
        values=values,
        kinds=kinds,
        patient_ids=string_column(table, "patient_id"),
        split=split,
        notes=notes,
        label_map=label_map if "codes" in table.column_names else None,
    )


def _is_numeric(typ: Any) -> bool:
    """Whether a column of this Arrow type can hold a label (0/1, boolean or continuous)."""
    import pyarrow.types as pat

    return pat.is_boolean(typ) or pat.is_integer(typ) or pat.is_floating(typ)


def load_labels(path: str | Path, label_map: str | Path | None = None) -> LabelTable:
    """Read a labels table (CSV/Parquet/directory) and apply ``label_map`` (name or CSV path) when given."""
    lm = load_label_map(label_map) if label_map else None
    table = read_table(path, kinds=("labels",))
    return labels_from_table(table, lm, where=str(path))


# --------------------------------------------------------------------------------------------- aggregation rules
def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "", name.lower())


# ECG-FM's infer_quickstart notebook aggregates these five MIMIC-IV-ECG labels with max (mean for the others);
# the spellings below let names from other label sets (abbreviations, plural, Challenge names) match them.
_MAX_RULE_NAMES = {
    _norm(n)
    for n in (
        "poor data quality", "poor quality", "poor signal quality",
        "premature ventricular contraction", "premature ventricular contractions", "pvc", "pvcs",
        "ventricular premature beat", "ventricular premature beats", "vpb", "vpc",
        "ventricular tachycardia", "vt", "vtach", "v tach",
        "supraventricular tachycardia with aberrancy", "svt with aberrancy", "svt aberrancy",
        "electronic pacemaker", "pacemaker", "pacing rhythm", "paced rhythm",
    )
}
#: How segment probabilities of one record combine: the ``--aggregate`` choices but ``label`` (per-label rules).
AGGREGATIONS = tuple(a for a in get_args(Aggregate) if a != "label")


def default_aggregation(label: str, aliases: tuple[str, ...] = ()) -> str:
    """ECG-FM's per-label rule: ``max`` for poor data quality, PVC, VT, SVT with aberrancy and electronic
    pacemaker (matched case-insensitively on the label, each ``|``-separated part of it, and ``aliases`` such as
    the label map's descriptive names), ``mean`` otherwise."""
    candidates = [label, *label.split("|"), *aliases]
    return "max" if any(_norm(c) in _MAX_RULE_NAMES for c in candidates) else "mean"


def resolve_aggregation(
    labels: list[str],
    mode: str,
    rules: dict[str, str] | None = None,
    label_map: LabelMap | None = None,
) -> dict[str, str]:
    """Per-label aggregation method for ``--aggregate mode``.

    mode ``max``/``mean``/``min`` applies to every label; ``label`` applies :func:`default_aggregation`,
    overridden by ``rules`` ({label: method}, names matched case-insensitively). A rule naming no label or an
    unknown method is an error.
    """
    if mode in AGGREGATIONS:
        if rules:
            raise LabelError("--aggregate-rules needs --aggregate label")
        return {lab: mode for lab in labels}
    if mode != "label":
        raise LabelError(f"--aggregate must be one of max, mean, min, label; got {mode!r}")
    names = label_map.names if label_map else {}
    out = {lab: default_aggregation(lab, names.get(lab, ())) for lab in labels}
    lower = {lab.lower(): lab for lab in labels}
    for key, method in (rules or {}).items():
        if method not in AGGREGATIONS:
            raise LabelError(f"aggregate rule for {key!r}: {method!r} is not one of {', '.join(AGGREGATIONS)}")
        lab = lower.get(key.lower())
        if lab is None:
            raise LabelError(f"aggregate rule names {key!r}, which is not a label here ({', '.join(labels)})")
        out[lab] = method
    return out


def load_aggregate_rules(path: str | Path) -> dict[str, str]:
    """Read ``--aggregate-rules FILE.json``: a JSON object {label: "max"|"mean"|"min"}."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise LabelError(f"{path}: cannot read aggregate rules ({e})") from e
    if not isinstance(obj, dict) or not all(isinstance(v, str) for v in obj.values()):
        raise LabelError(f"{path}: aggregate rules must be a JSON object {{label: \"max\"|\"mean\"|\"min\"}}")
    return {str(k): v.lower() for k, v in obj.items()}
