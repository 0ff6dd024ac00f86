"""Hypothesis: a stored vector finds itself, and a state machine of ingest / delete / reopen
against a plain ``{id: vector}`` model with brute-force search.

Each example makes its own store in a ``TemporaryDirectory`` (Hypothesis reuses
function-scoped fixtures across examples). Durability is not what these tests are about, so
the directories live on tmpfs (``/dev/shm``) where there is one: the store's many fsyncs
cost ~0.4 s per example on a disk and ~0.04 s there.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import asteria_store
from conftest import normalise
from asteria_store import DuplicateIdError, IdNotFoundError
from asteria_store.testing import brute_force_topk

FAST_TMP = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None




def distinct_directions(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` that are clearly non-zero and point in clearly different directions
    (cosine < 0.999 to every earlier kept row), so each row's nearest neighbour is itself."""
    x64 = x.astype(np.float64)
    norms = np.linalg.norm(x64, axis=1)
    kept: list[int] = []
    for i in range(len(x)):
        if norms[i] < 1e-3:
            continue
        u = x64[i] / norms[i]
        if all(u @ (x64[j] / norms[j]) < 0.999 for j in kept):
            kept.append(i)
    return x[kept]


@st.composite
def ingest_batches(draw) -> tuple[np.ndarray, list[int]]:
    """(vectors, cut points): finite float32 rows, dims 2..16, n 1..60, split into 1-3 ingests."""
    dim = draw(st.integers(2, 16))
    n = draw(st.integers(1, 60))
    elements = st.floats(-100, 100, width=32, allow_nan=False, allow_infinity=False)
    x = distinct_directions(draw(hnp.arrays(np.float32, (n, dim), elements=elements)))
    assume(len(x) >= 1)
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(x) - 1)), max_size=2))) if len(x) > 1 else []
    return x, cuts


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=ingest_batches(), bits=st.integers(1, 6), chunk_rows=st.sampled_from([1, 3, 16, 256]))
def test_every_ingested_vector_finds_itself_first(batch, bits: int, chunk_rows: int) -> None:
    x, cuts = batch
    n, dim = x.shape
    k = min(3, n)
    with tempfile.TemporaryDirectory(dir=FAST_TMP) as tmp:
        path = Path(tmp) / "store"
        with asteria_store.create(path, dim=dim, bits=bits, chunk_rows=chunk_rows) as store:
            for part in np.split(x, cuts):
                store.ingest(part)
            assert len(store) == n
            ids, scores = store.search(x, k, probes="all")
            np.testing.assert_array_equal(ids[:, 0], np.arange(n))
            np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
            assert np.all(scores[:, 1:] < scores[:, :1])
        with asteria_store.open(path, readonly=True) as store:
            again_ids, again_scores = store.search(x, k, probes="all")
            np.testing.assert_array_equal(again_ids, ids)
            np.testing.assert_array_equal(again_scores, scores)


# --- the state machine ----------------------------------------------------------------------

DIM = 6
BITS = 3  # 8 buckets: probing all 8 must equal exact search
K = 5


class StoreMachine(RuleBasedStateMachine):
    """Ingest (auto or explicit ids, re-using deleted ones), delete, refused writes, reopen;
    after every step the store must agree with ``model`` on len, get and exact search."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory(dir=FAST_TMP)
        self.path = Path(self.tmp.name) / "store"
        self.store: asteria_store.Store | None = None
        self.model: dict[int, np.ndarray] = {}
        self.deleted: set[int] = set()
        self.next_id = 0
        self.queries = normalise(np.random.default_rng(0).standard_normal((4, DIM)))

    @initialize(chunk_rows=st.sampled_from([1, 4, 256]))
    def create(self, chunk_rows: int) -> None:
        self.store = asteria_store.create(self.path, dim=DIM, bits=BITS, chunk_rows=chunk_rows)

    @rule(n=st.integers(1, 12), seed=st.integers(0, 2**32 - 1), explicit=st.booleans())
    def ingest(self, n: int, seed: int, explicit: bool) -> None:
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((n, DIM)).astype(np.float32)
        if explicit:  # from a small pool, so deleted ids come back
            free = np.setdiff1d(np.arange(40), list(self.model))
            n = min(n, len(free))
            if n == 0:
                return
            x = x[:n]
            ids = rng.choice(free, n, replace=False)
            result = self.store.ingest(x, ids=ids)
            self.next_id = max(self.next_id, int(ids.max()) + 1)
        else:
            ids = np.arange(self.next_id, self.next_id + n)
            result = self.store.ingest(x)
            self.next_id += n
        assert result.rows == n
        assert result.ids.tolist() == ids.tolist()
        for i, v in zip(ids.tolist(), normalise(x)):
            self.model[i] = v
            self.deleted.discard(i)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def delete(self, data) -> None:
        doomed = data.draw(st.lists(st.sampled_from(sorted(self.model)), min_size=1, max_size=6, unique=True))
        assert self.store.delete(doomed).rows == len(doomed)
        for i in doomed:
            del self.model[i]
            self.deleted.add(i)

    @rule(data=st.data())
    def delete_with_a_missing_id(self, data) -> None:
        pool = st.integers(10**6, 10**6 + 5)
        if self.deleted:
            pool = pool | st.sampled_from(sorted(self.deleted))
        missing = data.draw(pool)
        live = sorted(self.model)[:2]
        with pytest.raises(IdNotFoundError, match=r"Nothing was deleted\.$"):
            self.store.delete(live + [missing])

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def ingest_a_duplicate(self, data) -> None:
        dup = data.draw(st.sampled_from(sorted(self.model)))
        with pytest.raises(DuplicateIdError, match=rf"\(first: {dup}\)"):
            self.store.ingest(np.ones((2, DIM), np.float32), ids=[10**7, dup])

    @rule(readonly=st.booleans())
    def reopen(self, readonly: bool) -> None:
        self.store.close()
        self.store = asteria_store.open(self.path, readonly=readonly)
        assert self.store.verify().ok
        if readonly:  # back to a writable handle for the next steps
            self.store.close()
            self.store = asteria_store.open(self.path)

    @invariant()
    def agrees_with_the_model(self) -> None:
        if self.store is None:
            return
        store = self.store
        assert len(store) == len(self.model)
        ids = np.array(sorted(self.model), dtype=np.int64)
        vectors = np.array([self.model[i] for i in ids.tolist()], dtype=np.float32).reshape(-1, DIM)
        if len(ids):
            np.testing.assert_allclose(store.get(ids), vectors, atol=1e-6)
        queries = np.vstack([self.queries, vectors[:3]])
        _, exp_scores = brute_force_topk(vectors, queries, K)
        for probes in ("all", 2**BITS):
            got_ids, got_scores = store.search(queries, K, probes=probes)
            # The same top-k scores as brute force over the model, -1 / -inf padding where
            # the model has fewer than K vectors...
            np.testing.assert_allclose(got_scores, exp_scores, atol=1e-5)
            np.testing.assert_array_equal(got_ids == -1, np.isneginf(exp_scores))
            # ...and each id is a distinct live one whose vector has the score reported
            # (ids are compared through their scores: duplicate vectors tie exactly).
            for q, row_ids, row_scores in zip(queries, got_ids, got_scores):
                live = row_ids[row_ids >= 0].tolist()
                assert len(set(live)) == len(live)
                assert set(live) <= set(self.model)
                model_scores = [float(self.model[i] @ q) for i in live]
                np.testing.assert_allclose(row_scores[: len(live)], model_scores, atol=1e-5)

    def teardown(self) -> None:
        if self.store is not None:
            self.store.close()
        self.tmp.cleanup()


StoreMachine.TestCase.settings = settings(
    max_examples=15, stateful_step_count=20, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestStoreMachine = StoreMachine.TestCase
