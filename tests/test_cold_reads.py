"""A query on a store that is not in the page cache reads what it uses, not the pages the
kernel would read around them (storage/segments.py: MADV_RANDOM, then MADV_WILLNEED of the
ranges a query reads)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import asteria_store
from asteria_store.testing.pagecache import evict, read_bytes

PAGE = 4096


@pytest.fixture(scope="module")
def cold_store(wordnet, tmp_path_factory):
    if not os.path.exists("/proc/self/io"):
        pytest.skip("needs /proc/self/io (Linux)")
    path = tmp_path_factory.mktemp("cold") / "store"
    rng = np.random.default_rng(0)  # 30,000 rows: the real slice ten times, each copy jittered
    rows = np.concatenate([wordnet.base + rng.normal(0, 0.02, wordnet.base.shape) for _ in range(10)])
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    with asteria_store.create(path, dim=384, bits=7) as s:
        for part in np.array_split(rows.astype(np.float32), 3):
            s.ingest(part)
    probe = path / "probe.bin"  # does evicting a file here make reading it hit the device?
    probe.write_bytes(os.urandom(1 << 20))
    os.sync()
    evict(probe.parent)
    before = read_bytes()
    probe.read_bytes()
    if read_bytes() - before < (1 << 19):
        pytest.skip("evicted pages are not read from a device here (tmpfs or no io accounting)")
    probe.unlink()
    return path


def test_a_cold_query_reads_about_what_it_counts(cold_store: Path, wordnet) -> None:
    """The device bytes of cold queries stay within 1.25x of what SearchStats counts, plus a
    page for each rescored row (counted at its own size)."""
    with asteria_store.open(cold_store, readonly=True) as s:
        s.query(wordnet.queries[0], 10, probes=8)  # the compiled path and the model, loaded
        read = allowed = 0
        for q in wordnet.queries[1:21]:
            evict(cold_store / "segments.zarr")
            before = read_bytes()
            _, _, stats = s.query(q, 10, probes=8, explain=True)
            read += read_bytes() - before
            rescored = stats["scanned"] - stats["pruned"]
            allowed += 1.25 * stats["bytes_read"] + rescored * PAGE
        assert read > 0
        assert read <= allowed, (read, allowed)


def test_a_cold_search_by_sketch_reads_sketches_and_the_reranked_rows(cold_store: Path, wordnet) -> None:
    """With ``rerank``, a cold query reads its probed rows' sketch codes (48 B a row) and
    a page or two for each row it rescores: a fraction of what certified search reads."""
    with asteria_store.open(cold_store, readonly=True) as s:
        s.query(wordnet.queries[0], 10, probes=8, rerank=20)
        read = allowed = certified = 0
        for q in wordnet.queries[1:21]:
            evict(cold_store / "segments.zarr")
            before = read_bytes()
            _, _, stats = s.query(q, 10, probes=8, explain=True, rerank=20)
            read += read_bytes() - before
            rescored = stats["scanned"] - stats["pruned"]
            assert rescored == 20
            sketch_pages = -(-stats["scanned"] * 48 // PAGE) + 2 * stats["buckets"]  # ranges' edges
            allowed += (sketch_pages + 2 * 2 * rescored) * PAGE  # vector and id pages, a row may span two
            certified += s.query(q, 10, probes=8, explain=True)[2]["bytes_read"]
        assert 0 < read <= allowed, (read, allowed)
        assert read < certified / 2, (read, certified)
