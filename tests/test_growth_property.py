"""A Hypothesis state machine mixing ingest, upsert, delete, compact, retrain and reopen on a
learned store that grows past 1,000 rows (so it trains, re-fits and merges), checked
against a plain dict of id -> vector after every step."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import asteria_store
import asteria_store.write.upkeep as upkeep_mod
from asteria_store.testing import clustered_vectors

DIM = 16
K = 10


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class GrowingStore(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="asteria-growth-"))
        self.model: dict[int, np.ndarray] = {}
        self.next_seed = 0
        self.saved = (upkeep_mod.MERGE_MIN_ROWS, torch.get_num_threads())
        upkeep_mod.MERGE_MIN_ROWS = 128  # tiers at this scale, so merges happen
        torch.set_num_threads(1)

    @initialize()
    def create(self) -> None:
        self.store = asteria_store.create(self.dir / "s", dim=DIM, chunk_rows=128)
        x = self.vectors(1_200)  # past MIN_TRAIN_ROWS: the learned model trains at once
        result = self.store.ingest(x)
        assert result.trained
        self.model.update(zip(result.ids.tolist(), unit(x)))

    def vectors(self, n: int) -> np.ndarray:
        self.next_seed += 1
        return clustered_vectors(n, DIM, clusters=40, seed=self.next_seed)

    @rule(n=st.integers(50, 900), explicit=st.booleans())
    def ingest(self, n: int, explicit: bool) -> None:
        x = self.vectors(n)
        ids = np.arange(n) + 10 * self.next_seed * 1000 if explicit else None
        result = self.store.ingest(x, ids=ids)
        self.model.update(zip(result.ids.tolist(), unit(x)))

    @precondition(lambda self: self.model)
    @rule(data=st.data(), n_new=st.integers(0, 200))
    def upsert(self, data, n_new: int) -> None:
        live = sorted(self.model)
        old = data.draw(st.lists(st.sampled_from(live), min_size=1, max_size=min(200, len(live)), unique=True))
        ids = np.array(old + [10**9 + 1000 * self.next_seed + i for i in range(n_new)], dtype=np.uint64)
        x = self.vectors(len(ids))
        result = self.store.upsert(x, ids)
        assert result.replaced == len(old)
        self.model.update(zip(ids.tolist(), unit(x)))

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def delete(self, data) -> None:
        live = sorted(self.model)
        gone = data.draw(st.lists(st.sampled_from(live), min_size=1, max_size=min(300, len(live)), unique=True))
        self.store.delete(gone)
        for i in gone:
            del self.model[i]

    @rule()
    def compact(self) -> None:
        result = self.store.compact()
        assert result.segments_after <= 1
        assert result.rows == len(self.model)

    @precondition(lambda self: len(self.model) >= 200)
    @rule()
    def retrain(self) -> None:
        result = self.store.train(epochs=0)
        assert result.rows_rebucketed == len(self.model)

    @rule()
    def reopen(self) -> None:
        self.store.close()
        self.store = asteria_store.open(self.dir / "s")

    @invariant()
    def agrees_with_the_model(self) -> None:
        store = self.store
        assert len(store) == len(self.model)
        if not self.model:
            return
        ids = np.array(sorted(self.model), dtype=np.uint64)
        want = np.stack([self.model[i] for i in ids.tolist()])
        np.testing.assert_allclose(store.get(ids), want, atol=1e-6)
        q = self.vectors(3)
        q = unit(q)
        exact = q @ want.T
        got_ids, got_scores = store.search(q, K, probes="all")
        kk = min(K, len(ids))
        for r in range(len(q)):
            best = np.sort(exact[r])[::-1][:kk]
            np.testing.assert_allclose(got_scores[r][:kk], best, atol=1e-5)
            mine = exact[r][np.searchsorted(ids, got_ids[r][:kk].astype(np.uint64))]
            np.testing.assert_allclose(mine, got_scores[r][:kk], atol=1e-5)  # ids match scores
        probed, _ = store.search(q, K)  # a routed search returns k whenever the store holds k
        assert ((probed >= 0).sum(axis=1) == kk).all()
        info = store.info()
        assert info["internals"]["rows_stored"] - info["deleted"] == len(self.model)

    def teardown(self) -> None:
        if hasattr(self, "store"):
            assert self.store.verify().ok
            self.store.close()
        upkeep_mod.MERGE_MIN_ROWS, threads = self.saved
        torch.set_num_threads(threads)
        shutil.rmtree(self.dir, ignore_errors=True)


TestGrowingStore = GrowingStore.TestCase
TestGrowingStore.settings = settings(max_examples=4, stateful_step_count=14, deadline=None,
                                     suppress_health_check=[HealthCheck.too_slow])
