"""Pretraining batches straight from a ``segments`` artifact (the output of ``ecgfm segment``).

Nothing is converted or loaded whole. At start-up :func:`open_segments` reads only the two small columns
``record_id`` and ``segment_index`` of every file and builds a :class:`SegmentIndex`: where each row group
starts, which record every row belongs to, and which rows start a CMSC pair. Everything that decides a batch
(which rows, in which order, for which rank and loader worker) is then pure integer arithmetic on that index
(:func:`epoch_plan`), so it is deterministic for a seed, cheap, and can skip to any batch of an epoch without
reading data (exact resume). Only :class:`BatchReader` touches the signal column, one row group at a time,
converting the FixedSizeList column to a ``(rows, 12, 2500)`` numpy view without copying.

Terms: a *unit* is a row group (or, for corpora with fewer row groups than consumers, an equal slice of one);
units are the grain at which data is shuffled and shared out. A *consumer* is one (rank, loader worker);
``world_size * workers`` consumers get disjoint sets of units. An *item* is a CMSC pair (its first row) or,
with ``cmsc=False``, a single segment.

CMSC pairs follow fairseq-signals' ``convert_to_cmsc_manifest``: segments (0, 1), (2, 3), ... of one record
(by ``segment_index``); an odd last segment and single-segment records are left out (counted in
:class:`DataStats`). A pair whose two rows lie in different row groups is kept: its second row is read from
the next row group (only the rows needed).
"""

from __future__ import annotations

import heapq
import json
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ecgfm_cli.contract import Contract, ContractMismatch, check_compatible
from ecgfm_cli.errors import EcgfmError
from ecgfm_cli.io.tables import TableFile, open_table, read_schema
from ecgfm_cli.model.masking import TargetConfig, draw_targets


@dataclass
class DataStats:
    """What the index found. ``odd_leftovers``: segments of multi-segment records left unpaired (odd count or
    a gap in segment_index); ``single_records``: records with one segment (both are left out of CMSC)."""

    files: int = 0
    row_groups: int = 0
    segments: int = 0
    records: int = 0
    pairs: int = 0
    odd_leftovers: int = 0
    single_records: int = 0

    def describe(self, cmsc: bool = True) -> str:
        head = f"{self.segments} segments of {self.records} records in {self.files} file(s), " \
               f"{self.row_groups} row groups"
        if not cmsc:
            return head
        return (f"{head}; {self.pairs} CMSC pairs; left out of CMSC: {self.single_records} single-segment "
                f"records, {self.odd_leftovers} odd/unpaired segments")


@dataclass
class SegmentIndex:
    """Row layout of a segments artifact (global row = position in the sorted files' concatenation).

    rg_file, rg_number, rg_start, rg_rows: per row group, its file index, number within the file, first
    global row and row count. record: per row, a global record id (the global row of the record's first
    segment; equal ids = same record). pair_first: sorted global rows that start a CMSC pair (the pair is
    rows ``r, r + 1``).
    """

    files: list[Path]
    contract: Contract
    n_leads: int
    window: int
    rg_file: np.ndarray
    rg_number: np.ndarray
    rg_start: np.ndarray
    rg_rows: np.ndarray
    record: np.ndarray
    pair_first: np.ndarray
    stats: DataStats = field(default_factory=DataStats)

    @property
    def n_rows(self) -> int:
        return int(self.record.shape[0])

    def items(self, cmsc: bool) -> np.ndarray:
        """Sorted global rows of the items: pair starts (``cmsc``) or every row."""
        return self.pair_first if cmsc else np.arange(self.n_rows, dtype=np.int64)

    def units(self, min_units: int) -> tuple[np.ndarray, np.ndarray]:
        """Unit boundaries ``(start, stop)`` in global rows: row groups, each cut into equal slices when
        there are fewer than ``min_units`` row groups (small corpora with many consumers)."""
        parts = max(1, -(-min_units // max(len(self.rg_start), 1)))
        if parts == 1:
            return self.rg_start, self.rg_start + self.rg_rows
        starts, stops = [], []
        for s, n in zip(self.rg_start.tolist(), self.rg_rows.tolist(), strict=True):
            cuts = np.linspace(s, s + n, min(parts, n) + 1).round().astype(np.int64)
            starts.append(cuts[:-1])
            stops.append(cuts[1:])
        if not starts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(starts), np.concatenate(stops)


# ------------------------------------------------------------------------------------------ opening


def _small_columns(path: Path) -> tuple[list[int], pa.Array, np.ndarray]:
    """(rows per row group / record batch, record_id, segment_index) of one file."""
    with open_table(path) as t:
        sizes, table = t.group_rows, t.read(["record_id", "segment_index"])
    rid = table.column("record_id").combine_chunks()
    seg = table.column("segment_index").to_numpy().astype(np.int64)
    return sizes, rid, seg


def open_segments(path: str | Path, model_contract: Contract | None = None, command: str = "pretrain",
                  what: str = "the model") -> SegmentIndex:
    """Index a segments artifact (shard directory or single ``.parquet``/``.arrow`` file) for training.

    Refuses, with one clear :class:`~ecgfm_cli.errors.EcgfmError`: stdin, a missing path, another artifact
    kind, a file without a FixedSizeList ``signal`` column of ``n_leads * window`` values, a contract that
    differs from ``model_contract`` (fields named), and an artifact without rows.
    """
    from ecgfm_cli.io.artifacts import open_artifact

    if str(path) == "-":
        raise EcgfmError(f"{command} reads its segments several times (epochs): give a directory or file, not stdin")
    reader = open_artifact(path, "segments", command)
    meta = reader.metadata
    if meta.get("ecgfm.kind") != "segments":
        raise EcgfmError(f"{command}: {path} is not a segments artifact from `ecgfm segment` (no ecgfm.kind=segments "
                         f"metadata)")
    if "ecgfm.contract" not in meta:
        raise EcgfmError(f"{command}: {path} has no preprocessing contract (ecgfm.contract metadata); re-run `ecgfm "
                         "segment`")
    contract = Contract.from_json(meta["ecgfm.contract"])
    if model_contract is not None:
        try:
            check_compatible(contract, model_contract)
        except ContractMismatch as e:
            raise EcgfmError(f"{command}: {e}".replace("than the model", f"than {what}")) from e
    n_leads, window = len(contract.leads), int(contract.window)
    files = list(reader.files)
    for f in files:
        schema = read_schema(f)
        if "signal" not in schema.names or "record_id" not in schema.names or "segment_index" not in schema.names:
            raise EcgfmError(f"{command}: {f} lacks the signal/record_id/segment_index columns of a segments artifact")
        t = schema.field("signal").type
        if not pa.types.is_fixed_size_list(t) or t.list_size != n_leads * window:
            raise EcgfmError(f"{command}: {f}: signal is {t}, expected fixed_size_list<float>[{n_leads * window}] "
                             f"({n_leads} leads x {window} samples, as its contract says)")
        if json.loads((schema.metadata or {}).get(b"ecgfm.contract", b"null") or b"null") not in (None, json.loads(
                meta["ecgfm.contract"])):
            raise EcgfmError(f"{command}: {f} was written under another contract than {files[0].name}; "
                             "segment every input with the same options")
    index = _build_index(files, contract, n_leads, window)
    if index.n_rows == 0:
        raise EcgfmError(f"{command}: {path} holds no segments")
    return index


def _build_index(files: list[Path], contract: Contract, n_leads: int, window: int) -> SegmentIndex:
    rg_file, rg_number, rg_rows = [], [], []
    records, pair_first = [], []
    stats = DataStats(files=len(files))
    offset = 0
    for fi, f in enumerate(files):
        sizes, rid, seg = _small_columns(f)
        n = len(seg)
        rg_file += [fi] * len(sizes)
        rg_number += list(range(len(sizes)))
        rg_rows += sizes
        if n == 0:
            continue
        # Segments of a record are contiguous: a new record starts where record_id changes.
        new = np.ones(n, dtype=bool)
        if n > 1:
            new[1:] = ~pc.fill_null(pc.equal(rid[1:], rid[:-1]), False).to_numpy(zero_copy_only=False)
        first_row = np.flatnonzero(new)
        rec_local = np.cumsum(new) - 1
        records.append(first_row[rec_local] + offset)
        # Pair (r, r + 1): same record, even segment_index, consecutive indices.
        same = ~new[1:]
        cand = np.flatnonzero(same & (seg[:-1] % 2 == 0) & (seg[1:] == seg[:-1] + 1))
        pair_first.append(cand + offset)
        seg_per_rec = np.diff(np.append(first_row, n))
        stats.records += len(first_row)
        stats.single_records += int((seg_per_rec == 1).sum())
        stats.pairs += len(cand)
        stats.odd_leftovers += int(seg_per_rec[seg_per_rec > 1].sum()) - 2 * len(cand)
        offset += n
    rows = np.asarray(rg_rows, dtype=np.int64)
    stats.segments = offset
    stats.row_groups = len(rows)
    return SegmentIndex(
        files=files, contract=contract, n_leads=n_leads, window=window,
        rg_file=np.asarray(rg_file, dtype=np.int64), rg_number=np.asarray(rg_number, dtype=np.int64),
        rg_start=np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.int64) if len(rows) else rows,
        rg_rows=rows,
        record=np.concatenate(records) if records else np.zeros(0, np.int64),
        pair_first=np.concatenate(pair_first) if pair_first else np.zeros(0, np.int64),
        stats=stats,
    )


# ---------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class LoaderConfig:
    """What decides the batches. batch_size: segments per batch (even with ``cmsc``: pairs = half).
    world_size x workers consumers; shuffle_buffer: items shuffled together (bounds memory: roughly
    ``shuffle_buffer`` items' signals per consumer are held at once). targets: with it, every batch also carries
    its W2V time mask and negatives (:func:`~ecgfm_cli.model.masking.draw_targets`), drawn in the loader's
    thread so the training step never waits for them."""

    batch_size: int
    seed: int = 1
    cmsc: bool = True
    rlm: bool = True
    rlm_prob: float = 0.5
    rlm_apply_prob: float = 1.0
    world_size: int = 1
    workers: int = 1
    shuffle_buffer: int = 1024
    min_units_per_consumer: int = 4
    targets: TargetConfig | None = None

    @property
    def consumers(self) -> int:
        return self.world_size * self.workers

    @property
    def batch_items(self) -> int:
        return self.batch_size // 2 if self.cmsc else self.batch_size


def seeded_rng(*key: int) -> np.random.Generator:
    """A numpy generator determined by ``key`` alone (seed, epoch, stream, ...): what makes every batch of every
    rank a function of the seed."""
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in key])


def assign_units(index: SegmentIndex, cfg: LoaderConfig, epoch: int) -> tuple[list[np.ndarray], np.ndarray,
                                                                               np.ndarray]:
    """Share the units out among ``cfg.consumers`` for ``epoch``.

    A corpus of at least ``consumers * min_units_per_consumer`` files (a sharded segments directory at cluster
    scale) is shared out by whole files, the same every epoch (:func:`assign_files`): each consumer, so each rank,
    opens and reads only its own ~1/consumers of the files, and visits its units in a seeded per-epoch order.
    A smaller corpus is shared out by units afresh each epoch: units are visited in a seeded per-epoch random
    order and each goes to the consumer holding the fewest items so far (ties: lowest id), which balances the
    item counts. Either way the result depends on the seed, the epoch and the number of consumers (ranks x
    workers) only, never on how the ranks are spread over nodes. Returns (per consumer: its unit ids in visiting
    order, unit starts, unit stops).
    """
    starts, stops = index.units(cfg.consumers * cfg.min_units_per_consumer)
    items = index.items(cfg.cmsc)
    counts = np.searchsorted(items, stops) - np.searchsorted(items, starts)
    if len(index.files) >= cfg.consumers * cfg.min_units_per_consumer:
        unit_file = index.rg_file[np.searchsorted(index.rg_start, starts, side="right") - 1]
        owner = assign_files(np.bincount(unit_file, weights=counts, minlength=len(index.files)), cfg.consumers,
                             cfg.seed)[unit_file]
        owned_f = []
        for c in range(cfg.consumers):
            mine = np.flatnonzero(owner == c)
            owned_f.append(mine[seeded_rng(cfg.seed, epoch, 4, c).permutation(len(mine))])
        return owned_f, starts, stops
    order = seeded_rng(cfg.seed, epoch, 1).permutation(len(starts))
    heap = [(0, c) for c in range(cfg.consumers)]
    owned: list[list[int]] = [[] for _ in range(cfg.consumers)]
    for u in order.tolist():
        load, c = heapq.heappop(heap)
        owned[c].append(u)
        heapq.heappush(heap, (load + int(counts[u]), c))
    return [np.asarray(o, dtype=np.int64) for o in owned], starts, stops


def assign_files(file_items: np.ndarray, consumers: int, seed: int) -> np.ndarray:
    """Owner consumer of every file, ``(n_files,)`` int64: largest files first (ties in a seeded order), each to
    the consumer holding the fewest items so far, which keeps the consumers' item counts within about one file
    of each other. ``file_items``: items per file."""
    tie = seeded_rng(seed, 0, 5).permutation(len(file_items))
    owner = np.zeros(len(file_items), dtype=np.int64)
    heap = [(0, c) for c in range(consumers)]
    for f in np.lexsort((tie, -np.asarray(file_items))).tolist():
        load, c = heapq.heappop(heap)
        owner[f] = c
        heapq.heappush(heap, (load + int(file_items[f]), c))
    return owner


def epoch_plan(index: SegmentIndex, cfg: LoaderConfig, epoch: int, consumer: int) -> np.ndarray:
    """Batches of one consumer for ``epoch``: int64 ``(n_batches, batch_items)`` global item rows.

    The consumer's items (its units in visiting order) are shuffled within consecutive blocks of
    ``shuffle_buffer`` items, then cut into batches. Every consumer gets the same number of batches (the
    minimum over consumers; the few items beyond it are skipped this epoch), so DDP ranks stay in step.
    """
    owned, starts, stops = assign_units(index, cfg, epoch)
    items = index.items(cfg.cmsc)
    n_items = [int(sum(np.searchsorted(items, stops[o]) - np.searchsorted(items, starts[o]))) for o in owned]
    n_batches = min(n_items) // cfg.batch_items
    mine = owned[consumer]
    rows = np.concatenate([items[np.searchsorted(items, starts[u]):np.searchsorted(items, stops[u])]
                           for u in mine.tolist()] or [np.zeros(0, np.int64)])
    block_shuffle(rows, max(cfg.shuffle_buffer, cfg.batch_items), seeded_rng(cfg.seed, epoch, 2, consumer))
    return rows[: n_batches * cfg.batch_items].reshape(n_batches, cfg.batch_items)


def batches_per_epoch(index: SegmentIndex, cfg: LoaderConfig) -> int:
    """Batches one RANK sees per epoch (all its workers together); the same every epoch up to balance."""
    return int(epoch_plan(index, cfg, 0, 0).shape[0]) * cfg.workers


def block_shuffle(rows: np.ndarray, block: int, rng: np.random.Generator) -> None:
    """Shuffle ``rows`` in place within consecutive blocks of ``block`` entries (what bounds the memory of
    both plans: a block spans a few row groups)."""
    for b in range(0, len(rows), block):
        rows[b:b + block] = rows[b:b + block][rng.permutation(len(rows[b:b + block]))]


def epoch_batches(rows: np.ndarray, rg_start: np.ndarray, positions: np.ndarray, batch_size: int, seed: int,
                  epoch: int, rank: int = 0, world_size: int = 1, shuffle_buffer: int = 4096) -> list[np.ndarray]:
    """``ecgfm finetune``'s plan: this rank's training batches for ``epoch``, a list of arrays of ``positions``
    entries. Pure.

    rows: (N,) global row of every used segment; rg_start: first global row of each row group; positions:
    the entries of ``rows`` to train on (the train split). Unlike :func:`epoch_plan` (pretraining: units
    shared out among consumers, equal batches, the few items beyond them skipped) every position is trained on
    once per epoch: row groups are visited in a seeded per-epoch order (each read once), rows are shuffled
    within consecutive blocks of ``shuffle_buffer`` (:func:`block_shuffle`), the sequence is cut into
    ``world_size`` equal contiguous shares (the < world_size rows left over are skipped this epoch) and the
    rank's share into batches (the last may be smaller; every rank gets the same number and sizes).
    """
    pos = np.asarray(positions, dtype=np.int64)
    if len(pos) == 0:
        return []
    rg = np.searchsorted(rg_start, rows[pos], side="right") - 1
    groups = np.unique(rg)
    order = np.empty(int(groups.max()) + 1, dtype=np.int64)
    order[groups] = seeded_rng(seed, epoch, 11).permutation(len(groups))
    pos = pos[np.lexsort((rows[pos], order[rg]))]
    block_shuffle(pos, max(shuffle_buffer, batch_size * world_size), seeded_rng(seed, epoch, 12))
    share = len(pos) // world_size
    mine = pos[rank * share:(rank + 1) * share]
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


# ---------------------------------------------------------------------------------------------- reading


class BatchReader:
    """Reads signal rows by global row number, keeping the few row groups the upcoming batches need.

    Told when each row group is last needed (``gather(keep_until=...)``), it reads only the needed prefix
    of a row group it will not need again (e.g. row 0 of the next row group for a pair that straddles a
    boundary) and drops a row group as soon as its last use has passed. Files are read, not memory-mapped: a
    mapping's pages stay resident once read, which would grow a loader to the corpus's size (once per worker)
    over an epoch, whatever it held. At most :attr:`MAX_OPEN` files are open at once (the least recently read is
    closed; the rows read from it stay valid): a corpus of thousands of shards would otherwise exhaust the
    process's file descriptors (1,024 by default), one per shard per loader thread.
    """

    MAX_OPEN = 32

    def __init__(self, index: SegmentIndex):
        self.index = index
        self._files: dict[int, TableFile] = {}  # in order of last use
        self._cache: dict[int, np.ndarray] = {}

    def _handle(self, fi: int) -> TableFile:
        h = self._files.pop(fi, None)
        if h is None:
            h = open_table(self.index.files[fi], threads=False, memory_map=False)
            if len(self._files) >= self.MAX_OPEN:
                self._files.pop(next(iter(self._files))).close()
        self._files[fi] = h
        return h

    def _read_rg(self, rg: int, upto: int) -> np.ndarray:
        """Rows ``[0, upto)`` of row group ``rg`` as ``(rows, n_leads, window)`` (a view of Arrow memory)."""
        idx = self.index
        h = self._handle(int(idx.rg_file[rg]))
        number, n = int(idx.rg_number[rg]), int(idx.rg_rows[rg])
        # a few leading rows of a Parquet group: stream them instead of decoding the whole group
        col = h.read_group(number, ["signal"], head=upto if upto * 4 <= n else None).column(0)
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
        if col.null_count:  # flatten() would drop the null rows and shift every later one
            raise ValueError(f"{idx.files[int(idx.rg_file[rg])]}: row group {number} holds {col.null_count} null "
                             "signals; `ecgfm segment` writes none: re-segment the records")
        flat = col.flatten().to_numpy(zero_copy_only=True)
        return flat.reshape(-1, idx.n_leads, idx.window)

    def gather(self, rows: np.ndarray, keep_until: dict[int, int], step: int, scale: np.ndarray | None = None,
               alloc=None) -> np.ndarray:
        """Signals of global ``rows`` as a fresh float32 ``(len(rows), n_leads, window)`` array.

        ``scale`` (optional ``(len(rows), n_leads)``): multiplied in while copying (the RLM lead mask: one pass
        over memory). ``keep_until`` (see :func:`last_use`) maps row group -> last step that needs it; groups past
        ``step`` are dropped after this call. ``alloc(shape)`` -> float32 array
        provides the output buffer (e.g. in shared memory, so a DataLoader worker hands it over uncopied).
        """
        idx = self.index
        rg = np.searchsorted(idx.rg_start, rows, side="right") - 1
        local_arr = rows - idx.rg_start[rg]
        local = local_arr.tolist()
        shape = (len(rows), idx.n_leads, idx.window)
        out = np.empty(shape, dtype=np.float32) if alloc is None else alloc(shape)
        factors = None if scale is None else scale.astype(np.float32)[:, :, None]
        arrays = {}
        for g in np.unique(rg).tolist():
            need = int(local_arr[rg == g].max()) + 1
            arr = self._cache.get(g)
            if arr is None or arr.shape[0] < need:
                upto = need
                if keep_until.get(g, step) > step:
                    upto = int(idx.rg_rows[g])  # needed again later: decode it whole once
                arr = self._read_rg(g, max(upto, need))
                self._cache[g] = arr
            arrays[g] = arr
        for i, (g, loc) in enumerate(zip(rg.tolist(), local, strict=True)):
            if factors is None:
                out[i] = arrays[g][loc]
            else:
                np.multiply(arrays[g][loc], factors[i], out=out[i])
        for g in [g for g in self._cache if keep_until.get(g, -1) <= step]:
            del self._cache[g]
        return out


def last_use(index: SegmentIndex, batch_rows: list[np.ndarray]) -> dict[int, int]:
    """Row group -> the last batch step that reads it (when its cached rows can be dropped)."""
    last: dict[int, int] = {}
    for step, rows in enumerate(batch_rows):
        for g in np.unique(np.searchsorted(index.rg_start, rows, side="right") - 1).tolist():
            last[g] = step
    return last


def lead_keep(cfg: LoaderConfig, epoch: int, consumer: int, batch: int, n: int, n_leads: int) -> np.ndarray:
    """RLM keep-mask ``(n, n_leads)`` bool for one batch: each lead of each segment survives iff
    U[0,1) >= rlm_prob (segments perturbed with probability rlm_apply_prob); all True without RLM.
    Seeded by (seed, epoch, consumer, batch): independent of workers' timing and of resumption."""
    if not cfg.rlm:
        return np.ones((n, n_leads), dtype=bool)
    rng = seeded_rng(cfg.seed, epoch, 3, consumer, batch)
    keep = rng.random((n, n_leads)) >= cfg.rlm_prob
    if cfg.rlm_apply_prob < 1.0:
        keep |= rng.random((n, 1)) >= cfg.rlm_apply_prob
    return keep


def iter_consumer(index: SegmentIndex, cfg: LoaderConfig, consumer: int, start_epoch: int = 0,
                  start_batch: int = 0, max_epochs: int | None = None, alloc=None) -> Iterator[dict]:
    """Batches of one consumer from (``start_epoch``, its local batch ``start_batch``) on, epoch after epoch.

    Each batch is a dict: ``x`` float32 numpy ``(B, n_leads, window)`` with RLM applied (with CMSC, rows
    ``2i, 2i+1`` are the two segments of pair ``i``), ``record`` int64 ``(B,)`` record ids, ``keep`` bool
    ``(B, n_leads)`` the lead mask, ``epoch``, ``batch`` (this consumer's index in the epoch), ``worker``
    (the consumer's index within its rank), ``rows`` (global rows read); with ``cfg.targets`` also ``mask``
    bool ``(B, T)`` and ``negatives_idx`` int64 ``(B, T', N)``, seeded by (seed, epoch, consumer, batch) like
    the lead mask, so they too are the same whatever the workers' timing and across a resume.
    """
    reader = BatchReader(index)
    epoch = start_epoch
    first = start_batch
    empty = 0
    while max_epochs is None or epoch < max_epochs:
        plan = epoch_plan(index, cfg, epoch, consumer)
        if plan.shape[0] == 0:
            # Batches per epoch vary a little with the unit shuffle; on barely enough data an epoch can come out
            # empty (for every consumer alike: the count is the minimum over them). Skip it, but not forever.
            empty += 1
            if empty == 8:
                return
            epoch, first = epoch + 1, 0
            continue
        empty = 0
        rows_per_batch = [np.stack([p, p + 1], axis=1).reshape(-1) if cfg.cmsc else p for p in plan]
        last = last_use(index, rows_per_batch[first:])
        for b in range(first, len(rows_per_batch)):
            rows = rows_per_batch[b]
            keep = lead_keep(cfg, epoch, consumer, b, len(rows), index.n_leads)
            x = reader.gather(rows, last, b - first, keep if cfg.rlm else None, alloc)
            batch = {"x": x, "record": index.record[rows], "keep": keep, "epoch": epoch, "batch": b,
                     "worker": consumer % cfg.workers, "rows": rows}
            if cfg.targets is not None:
                batch.update(draw_targets(seeded_rng(cfg.seed, epoch, 6, consumer, b), len(rows), cfg.targets))
            yield batch
        epoch += 1
        first = 0


def iter_rank(index: SegmentIndex, cfg: LoaderConfig, rank: int, start_epoch: int = 0, start_batch: int = 0,
              max_epochs: int | None = None, wrap=None) -> Iterator[dict]:
    """One rank's batches in the order a torch DataLoader with ``cfg.workers`` workers delivers them
    (round-robin over the workers). ``start_batch`` counts the rank's batches in the epoch. ``wrap`` (e.g.
    a background-thread prefetcher) is applied to each worker's iterator; by default all run in the caller."""
    its = [iter_consumer(index, cfg, rank * cfg.workers + w, start_epoch,
                         worker_start(start_batch, w, cfg.workers), max_epochs) for w in range(cfg.workers)]
    if wrap is not None:
        its = [wrap(it) for it in its]
    w = start_batch % cfg.workers
    while True:
        try:
            yield next(its[w])
        except StopIteration:
            return
        w = (w + 1) % cfg.workers


def worker_start(rank_batch: int, worker: int, workers: int) -> int:
    """How many batches worker ``worker`` has delivered once the rank consumed ``rank_batch`` (round-robin)."""
    return (rank_batch - worker + workers - 1) // workers if rank_batch > worker else 0


# ----------------------------------------------------------------------------------------- loaders


class Prefetch:
    """Runs an iterator in a daemon thread, ``depth`` items ahead (numpy and pyarrow release the GIL)."""

    _END = object()

    def __init__(self, it: Iterator, depth: int = 2):
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(it,), daemon=True)
        self._thread.start()

    def _run(self, it: Iterator) -> None:
        try:
            for item in it:
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as e:  # re-raised in the consumer thread
            self._error = e
        while not self._stop.is_set():
            try:
                self._q.put(self._END, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> Prefetch:
        return self

    def __next__(self):
        item = self._q.get()
        if item is self._END:
            if self._error is not None:
                raise self._error
            raise StopIteration
        return item

    def close(self) -> None:
        """Stop and join the thread: a daemon thread still inside pyarrow when the interpreter exits
        aborts the process ("terminate called without an active exception")."""
        self._stop.set()
        self._thread.join(timeout=30)

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _shared_tensor(shape: tuple[int, ...]):
    """A float32 tensor in shared memory: a DataLoader worker passes it to the trainer without a copy
    (torch's own collate preallocates its output the same way)."""
    import torch

    storage = torch.empty(0)._typed_storage()._new_shared(int(np.prod(shape)))
    return torch.empty(0).new(storage).view(shape)


class _Closing:
    """An iterator that stops its prefetch threads on :meth:`close`."""

    def __init__(self, it: Iterator, threads: list[Prefetch]):
        self._it, self._threads = it, threads

    def __iter__(self) -> _Closing:
        return self

    def __next__(self):
        return next(self._it)

    def close(self) -> None:
        for t in self._threads:
            t.close()


_TENSORS = ("x", "record", "keep", "mask", "negatives_idx")


def _to_torch(batch: dict, pin_memory: bool = False) -> dict:
    """A batch of :func:`iter_consumer` as the training step takes it: its arrays as tensors (pinned for a
    non-blocking copy to a GPU with ``pin_memory``), its position ints as they are."""
    import torch

    out = {k: torch.from_numpy(batch[k]) for k in _TENSORS if k in batch}
    if pin_memory:
        out = {k: v.pin_memory() for k, v in out.items()}
    return {**out, "epoch": batch["epoch"], "batch": batch["batch"], "worker": batch["worker"]}


def make_loader(index: SegmentIndex, cfg: LoaderConfig, rank: int, start_epoch: int = 0, start_batch: int = 0,
                max_epochs: int | None = None, processes: bool = False, pin_memory: bool = False) -> Iterator[dict]:
    """The rank's batch iterator: the batches of :func:`iter_consumer` as torch tensors (``x``, ``record``,
    ``keep``, and with ``cfg.targets`` ``mask``, ``negatives_idx``; pinned with ``pin_memory``) + ints ``epoch``,
    ``batch``, ``worker``.

    Default: ``cfg.workers`` background threads, one per worker partition (Parquet decoding and the numpy
    gather release the GIL, so they run in parallel), merged round-robin. ``processes``: torch DataLoader
    worker processes instead; they cost ~2x the CPU per segment, because every batch crosses a fresh
    shared-memory segment (page faults), so threads are the default. Both deliver the same batches in the
    same order, so a run can resume with either.
    """
    if not processes:
        threads: list[Prefetch] = []

        def wrap(it: Iterator) -> Prefetch:
            threads.append(Prefetch(_to_torch(b, pin_memory) for b in it))
            return threads[-1]

        return _Closing(iter_rank(index, cfg, rank, start_epoch, start_batch, max_epochs, wrap), threads)
    import torch
    from torch.utils.data import DataLoader, IterableDataset, get_worker_info

    # A DataLoader always begins its round-robin at worker 0, so on a resume that stopped after a batch of
    # worker k, DataLoader worker w plays the role of worker (w + k) % W.
    shift = start_batch % cfg.workers

    class _Stream(IterableDataset):
        def __iter__(self):
            w = (get_worker_info().id + shift) % cfg.workers
            shared: list = []

            def alloc(shape):
                shared[:] = [_shared_tensor(shape)]
                return shared[0].numpy()

            for b in iter_consumer(index, cfg, rank * cfg.workers + w, start_epoch,
                                   worker_start(start_batch, w, cfg.workers), max_epochs, alloc):
                out = _to_torch(b)
                out["x"] = shared[0]  # the same memory as b["x"], but a storage torch knows is shared
                yield out

    # The DataLoader must not draw from the global torch RNG (it would shift the model's random stream).
    loader = DataLoader(_Stream(), batch_size=None, num_workers=cfg.workers, pin_memory=pin_memory,
                        prefetch_factor=2, persistent_workers=False, generator=torch.Generator(),
                        multiprocessing_context="fork")
    return iter(loader)
