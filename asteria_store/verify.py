"""``verify``: everything a store's files and catalog must agree on, and what damage does.

Checks, in one snapshot: the model digest; every published segment's chunk files (present,
full-size, and, unless ``quick``, their CRC-32C against the catalog's); its ids against the
catalog's id map; its bucket extents (contiguous, covering every row, matching the
router's keys on a sample); and the live count. Damaged chunks are reported with the live
ids they hold; the store records them (``damaged``) and readers then refuse those chunks
while they hold a live row (:func:`quarantined`).
"""

from __future__ import annotations

import numpy as np

from .errors import AsteriaError
from .model.persist import load_router
from .progress import ProgressLike, make_progress
from .results import VerifyReport
from .storage import segments as seglib
from .storage.catalog import retired_dirs, segment_name


def damage_from_meta(raw: dict) -> dict[int, dict[tuple[str, int], str]]:
    """The catalog's ``damaged`` record ({segment: {array: [chunk, ...]}}) as messages."""
    out: dict[int, dict[tuple[str, int], str]] = {}
    for seg, arrays in raw.items():
        for array, chunks in arrays.items():
            for c in chunks:
                out.setdefault(int(seg), {})[(array, int(c))] = damage_message(int(seg), array, int(c))
    return out


def damage_message(seg: int, array: str, chunk: int) -> str:
    return (f"Chunk {chunk} of {segment_name(seg)}/{array} is damaged (its checksum does not match); "
            "`asteria-store verify` lists the ids it holds: delete them and ingest them again.")


def quarantined(seg: int, reader: seglib.SegmentReader, damage: dict[tuple[str, int], str],
                 dead: np.ndarray | None) -> dict[tuple[str, int], str]:
    """The damaged chunks of ``seg`` that still hold live rows (reading one raises)."""
    out = {}
    for (array, chunk), message in damage.items():
        first = chunk * reader.chunk_rows
        rows = np.arange(first, min(reader.n, first + reader.chunk_rows))
        if dead is not None and len(dead):
            rows = rows[~np.isin(rows, dead)]
        if len(rows):
            out[(array, chunk)] = message
    return out


def verify_snapshot(store, txn, report: VerifyReport, quick: bool, progress: ProgressLike) -> None:
    """Fill ``report`` with everything wrong in the state of read transaction ``txn``."""
    cat = store._catalog
    meta = cat.all_meta(txn)
    segs = cat.segments(txn)
    extents: dict[int, list[tuple[int, int, int]]] = {}
    for bucket, seg, first, n in cat.iter_extents(txn):
        extents.setdefault(seg, []).append((first, n, bucket))
    id_locs: dict[int, list[tuple[int, int]]] = {}
    for i, seg, row in cat.iter_ids(txn):
        id_locs.setdefault(seg, []).append((row, i))
    tomb = cat.tombstones(txn)
    try:
        load_router(store.path / meta["router"]["dir"], digest=meta["router"]["digest"])
    except AsteriaError as exc:
        report.problems.append(str(exc))
    total = sum(rec["rows"] for rec in segs.values())
    bar = make_progress(progress, total=total, desc="verifying")
    try:
        live_total = 0
        for seg, rec in sorted(segs.items()):
            report.checked_segments += 1
            report.problems.extend(_verify_segment(store, 
                seg, rec, extents.get(seg, []), id_locs.get(seg, []), tomb.get(seg),
                None if quick else cat.checksums(txn, seg), report))
            report.checked_rows += rec["rows"]
            live_total += _live_rows(extents.get(seg, []), tomb.get(seg))
            bar.update(rec["rows"])
    finally:
        bar.close()
    if live_total != meta["count"]:
        report.problems.append(f"live count is {meta['count']} in meta but {live_total} by segments")
    if meta.get("id_kind") == "string" and cat.count_names(txn) != meta["count"]:
        report.problems.append(f"{cat.count_names(txn)} string ids are mapped but {meta['count']} rows are live")
    for seg in set(extents) - set(segs):
        report.problems.append(f"bucket extents point to unknown segment {seg}")
    live = {segment_name(s) for s in segs}
    retired = retired_dirs(cat.retired(txn))[0]
    report.orphans = [d for d in seglib.list_segment_dirs(store._segments_root)
                      if d not in live and d not in retired]


def _live_rows(extents: list[tuple[int, int, int]], dead: np.ndarray | None) -> int:
    """Rows the extents cover, less the deleted ones among them."""
    live = 0
    for first, cnt, _ in extents:
        live += cnt
        if dead is not None and len(dead):
            live -= int(np.searchsorted(dead, first + cnt) - np.searchsorted(dead, first))
    return live


def _verify_segment(store, seg, rec, extents, id_locs, dead, sums: dict[str, np.ndarray] | None,
                    report: VerifyReport) -> list[str]:
    name = segment_name(seg)
    n = rec["rows"]
    problems = []
    cr = rec.get("chunk_rows", store.config.chunk_rows)
    item = np.dtype(store.config.dtype).itemsize
    seg_dir = store._segments_root / name
    arrays = [("vectors", store.config.stored_dim * item), ("ids", 8)]
    if rec.get("lrsq"):
        arrays += [("lrsq", rec["lrsq"]["rank"]), ("lrsq_aux", 2 * rec["lrsq"]["aux"])]
        if rec["lrsq"].get("sketch"):
            arrays.append(("sketch", rec["lrsq"]["sketch"]))
    if rec.get("columns"):  # Arrow IPC files: their size depends on the values
        arrays.append(("columns", None))
    n_chunks = (n + cr - 1) // cr
    for array, row_bytes in arrays:
        for c in range(n_chunks):
            f = seglib.chunk_path(seg_dir, array, c)
            if not f.is_file():
                problems.append(f"{name}: chunk {f.relative_to(store.path)} is missing")
            elif row_bytes is not None and f.stat().st_size != cr * row_bytes:
                problems.append(f"{name}: chunk {f.relative_to(store.path)} has {f.stat().st_size} bytes, "
                                f"expected {cr * row_bytes}")
    if problems:
        return problems
    if sums is not None:
        if not sums:
            report.notes.append(f"{name}: no checksums recorded (written by an older asteria-store)")
        problems += _verify_checksums(store, seg, n, cr, [a for a, _ in arrays], sums, id_locs, dead, report)
    reader = seglib.SegmentReader(store._segments_root, name, n=n, dim=store.config.stored_dim,
                                  dtype=store.config.dtype, chunk_rows=cr)
    try:
        # Rows the extents cover are the segment's (live or deleted); rows a split moved
        # out have no extent and no id pointing at them.
        extents.sort()
        covered = np.zeros(n, dtype=bool)
        pos = 0
        for first, cnt, bucket in extents:
            if first < pos or first + cnt > n:
                problems.append(f"{name}: bucket extents overlap or pass the end at row {first}")
                break
            covered[first : first + cnt] = True
            pos = first + cnt
        # Spot-check that rows hash to the bucket that holds them.
        rng = np.random.default_rng(seg)
        for first, cnt, bucket in (extents[i] for i in rng.choice(len(extents), min(32, len(extents)), replace=False)) if extents else ():
            # Ingest hashed exactly the stored form (normalised, rounded): no re-normalising.
            x = np.asarray(reader.vectors(first, first + min(cnt, 4)), dtype=np.float32)
            if not np.isfinite(x).all() or \
                    not store._router.consistent(x, np.full(len(x), bucket, dtype=np.uint64)).all():
                problems.append(f"{name}: rows {first}.. do not hash to their bucket {bucket}")
                break
        stored_ids = np.asarray(reader.ids(0, n))
        # a deleted row that a split's dropped extent held is simply gone
        dead_set = {r for r in dead.tolist() if r < n and covered[r]} if dead is not None else set()
        if len(id_locs) + len(dead_set) != int(covered.sum()):
            problems.append(f"{name}: {len(id_locs)} live ids + {len(dead_set)} deleted != "
                            f"{int(covered.sum())} rows in buckets")
        for row, i in id_locs:
            if row >= n or int(stored_ids[row]) != i:
                problems.append(f"{name}: id {i} maps to row {row}, which holds another id")
                break
            if not covered[row] or row in dead_set:
                problems.append(f"{name}: id {i} maps to row {row}, which no bucket holds live")
                break
    finally:
        reader.close()
    return problems

def _verify_checksums(store, seg, n, cr, arrays, sums, id_locs, dead, report: VerifyReport) -> list[str]:
    """Recompute every chunk's CRC-32C; a mismatch is damage, reported with the live ids
    (from the catalog's id map, which does not depend on the damaged file) it holds."""
    name = segment_name(seg)
    problems = []
    seg_dir = store._segments_root / name
    row_to_id = None
    for array in arrays:
        recorded = sums.get(array)
        if recorded is None:
            continue
        for c in range(len(recorded)):
            report.checked_chunks += 1
            if seglib.file_crc32c(seglib.chunk_path(seg_dir, array, c)) == int(recorded[c]):
                continue
            if row_to_id is None:
                row_to_id = dict(id_locs)
            lo, hi = c * cr, min(n, (c + 1) * cr)
            ids = [row_to_id[r] for r in range(lo, hi) if r in row_to_id]
            where = f"{name}: chunk {c} of {array} (rows {lo}-{hi - 1})"
            if not ids:
                report.notes.append(f"{where} is damaged but holds only deleted rows")
                continue
            report.damaged.append({"segment": seg, "array": array, "chunk": c, "rows": [lo, hi], "ids": ids})
            shown = ", ".join(str(i) for i in ids[:10]) + (", ..." if len(ids) > 10 else "")
            problems.append(f"{where} is damaged (checksum mismatch); it holds {len(ids)} live id(s): "
                            f"{shown}. Delete them and ingest them again")
    return problems


__all__ = ["damage_from_meta", "damage_message", "quarantined", "verify_snapshot"]
