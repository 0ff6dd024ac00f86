"""The sketch (model/sketch.py) and search with ``rerank``: product-quantization codes per
row, approximate scores from them, exact rescoring of the best few."""

from __future__ import annotations

import numpy as np
import pytest

import asteria_store
from asteria_store.errors import InvalidArgumentError
from asteria_store.model.persist import save_model_file
from asteria_store.model.sketch import Sketch
from asteria_store.model.train import TrainConfig, train
from asteria_store.testing import brute_force_topk

K = 10


def recall(ids: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids, truth)]))


@pytest.fixture(scope="module")
def sketch_store(wordnet, tmp_path_factory):
    """The wordnet slice under the learned router, in two segments with deletes."""
    path = tmp_path_factory.mktemp("sketch") / "store"
    s = asteria_store.create(path, dim=384, bits=5)
    s.ingest(wordnet.base[:2000])
    s.ingest(wordnet.base[2000:])
    s.delete(np.arange(0, 3000, 37))
    yield s
    s.close()


def rotated(wordnet):
    rng = np.random.default_rng(0)
    rotation, _ = np.linalg.qr(rng.standard_normal((384, 384)))
    return (wordnet.base @ rotation).astype(np.float32), (wordnet.queries @ rotation).astype(np.float32)


def test_codes_are_the_nearest_centroid_of_each_subspace(wordnet) -> None:
    y, _ = rotated(wordnet)
    sketch = Sketch.train(y[:2000], iters=3)
    codes = sketch.encode(y[2000:2300])
    assert codes.shape == (300, sketch.m) and sketch.m * sketch.dsub == 384
    sub = y[2000:2300].reshape(300, sketch.dsub, sketch.m)  # coordinate s + m*j at [:, j, s]
    for s in range(0, sketch.m, 5):
        d = ((sub[:, :, s, None] - sketch.codebook[s][None]) ** 2).sum(axis=1)  # (300, 256)
        chosen = d[np.arange(300), codes[:, s]]
        # the nearest, up to the encoder's 2**-15 relative resolution of the score
        assert np.all(chosen <= d.min(axis=1) + 1e-3 * np.abs(d).max()), s
        assert (codes[:, s] == d.argmin(axis=1)).mean() > 0.97


def test_scores_are_the_query_dot_the_reconstruction(wordnet) -> None:
    y, qy = rotated(wordnet)
    sketch = Sketch.train(y[:2000], iters=2)
    codes = sketch.encode(y[:50])
    recon = np.empty((50, 384), dtype=np.float32)
    for s in range(sketch.m):
        recon[:, s :: sketch.m] = sketch.codebook[s][:, codes[:, s]].T
    np.testing.assert_allclose(sketch.scores(qy[0], codes), recon @ qy[0], rtol=1e-4, atol=1e-5)


def test_lloyd_steps_reduce_the_quantization_error(wordnet) -> None:
    y, _ = rotated(wordnet)

    def error(sketch: Sketch) -> float:
        codes = sketch.encode(y)
        recon = np.empty_like(y)
        for s in range(sketch.m):
            recon[:, s :: sketch.m] = sketch.codebook[s][:, codes[:, s]].T
        return float(((y - recon) ** 2).sum(axis=1).mean())

    start, trained = error(Sketch.train(y, iters=0)), error(Sketch.train(y, iters=4))
    assert trained < 0.9 * start, (start, trained)


def test_a_subspace_with_few_values_keeps_them_exactly() -> None:
    y = np.repeat(np.eye(8, dtype=np.float32), 10, axis=0)  # 8 distinct rows
    sketch = Sketch.train(y, iters=2)
    codes = sketch.encode(y)
    recon = np.empty_like(y)
    for s in range(sketch.m):
        recon[:, s :: sketch.m] = sketch.codebook[s][:, codes[:, s]].T
    np.testing.assert_array_equal(recon, y)


def test_segments_hold_sketch_codes_of_their_rows(sketch_store) -> None:
    sketch = sketch_store.router.lrsq.sketch
    assert sketch is not None and sketch.m == 48
    view = sketch_store._current_view()
    for reader in view.segments.values():
        assert "sketch" in reader.arrays
        router = sketch_store.router
        x = np.asarray(reader.vectors(0, 64), dtype=np.float32)
        centers = router.rotate(router.centers(router.keys(x)))  # residual: the probe centroids
        np.testing.assert_array_equal(reader.read("sketch", 0, 64), sketch.encode(router.rotate(x), centers))
    assert sketch_store.verify().problems == []


def test_rerank_of_every_probed_row_is_the_certified_search(sketch_store, wordnet) -> None:
    """Rescoring every probed row exactly leaves nothing to the sketch: the same results."""
    for probes in (1, 4, 16):
        ids, scores = sketch_store.search(wordnet.queries, K, probes=probes, prune=False)
        r_ids, r_scores = sketch_store.search(wordnet.queries, K, probes=probes, rerank=10_000)
        np.testing.assert_array_equal(r_ids, ids)
        np.testing.assert_allclose(r_scores, scores, rtol=0, atol=1e-6)


def test_rerank_keeps_the_recall_of_the_probes(sketch_store, wordnet) -> None:
    base, queries = wordnet
    live = np.setdiff1d(np.arange(len(base)), np.arange(0, 3000, 37))
    truth_rows, _ = brute_force_topk(base[live], queries, K)
    truth = live[truth_rows]
    certified = recall(sketch_store.search(queries, K, probes=8)[0], truth)
    few = recall(sketch_store.search(queries, K, probes=8, rerank=K)[0], truth)
    enough = recall(sketch_store.search(queries, K, probes=8, rerank=50)[0], truth)
    assert enough >= certified - 0.02, (enough, certified)
    assert few < enough  # the sketch alone orders rows approximately


def test_rerank_reads_sketches_and_the_reranked_vectors(sketch_store, wordnet) -> None:
    _, queries = wordnet
    _, _, stats = sketch_store.search(queries[:20], K, probes=8, rerank=30, explain=True)
    _, _, certified = sketch_store.search(queries[:20], K, probes=8, explain=True)
    np.testing.assert_array_equal(stats.scanned, certified.scanned)
    kept = stats.scanned - stats.pruned
    assert (kept <= 30).all() and (kept == np.minimum(30, stats.scanned)).all()
    np.testing.assert_array_equal(stats.bytes_read, stats.scanned * 48 + kept * (8 + 384 * 4))
    assert (stats.bytes_read < certified.bytes_read).all()


def test_one_query_with_rerank_equals_its_row_of_the_batch(sketch_store, wordnet) -> None:
    _, queries = wordnet
    ids, scores = sketch_store.search(queries[:40], K, probes=6, rerank=25)
    for qi in range(0, 40, 9):
        one_ids, one_scores = sketch_store.query(queries[qi], K, probes=6, rerank=25)
        np.testing.assert_array_equal(one_ids, ids[qi])
        np.testing.assert_array_equal(one_scores, scores[qi])


@pytest.mark.parametrize("rerank", [5, 0, 2.5, True, "50"])
def test_rerank_must_be_an_integer_of_at_least_k(sketch_store, wordnet, rerank) -> None:
    with pytest.raises(InvalidArgumentError, match=r"rerank must be an integer >= k \(10\)"):
        sketch_store.search(wordnet.queries[:2], K, probes=4, rerank=rerank)


def test_a_model_without_a_sketch_refuses_rerank(wordnet, tmp_path) -> None:
    import torch

    torch.set_num_threads(1)
    router, _ = train(wordnet.base[:2000], TrainConfig(bits=4, sketch=False, device="cpu"))
    save_model_file(router, tmp_path / "model.pt")
    with asteria_store.create(tmp_path / "store", dim=384, model=tmp_path / "model.pt") as store:
        store.ingest(wordnet.base[:500])
        assert "sketch" not in next(iter(store._current_view().segments.values())).arrays
        with pytest.raises(InvalidArgumentError, match="needs a model with a sketch"):
            store.search(wordnet.queries[:2], K, probes=4, rerank=20)
        assert store.search(wordnet.queries[:2], K, probes=4)[0].shape == (2, K)


def test_merged_segments_carry_their_sketch_codes(wordnet, tmp_path) -> None:
    """compact rewrites the rows; their sketch codes come along and still serve rerank."""
    with asteria_store.create(tmp_path / "store", dim=384, bits=4) as store:
        for part in np.array_split(wordnet.base[:1500], 3):
            store.ingest(part)
        store.delete(np.arange(0, 1500, 11))
        before = store.search(wordnet.queries[:30], K, probes=4, rerank=40)
        store.compact()
        assert len(store._current_view().segments) == 1
        after = store.search(wordnet.queries[:30], K, probes=4, rerank=40)
        np.testing.assert_array_equal(after[0], before[0])
        np.testing.assert_allclose(after[1], before[1], rtol=0, atol=1e-6)
        assert store.verify().problems == []


@pytest.fixture(scope="module")
def tree_store(wordnet, tmp_path_factory):
    """The wordnet slice under a routing tree of ~32-row buckets, grown past them in three
    ingests so that leaves split (their rows move, their sketch codes are copied), with
    deletes."""
    import torch

    from asteria_store.model import fit
    from asteria_store.write import upkeep

    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("tree-sketch") / "store"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fit, "FLAT_MAX_BITS", 3)
        mp.setattr(fit, "TREE_BUCKET_ROWS", 32)
        mp.setattr(upkeep, "SPLIT_STEP_ROWS", 400)
        s = asteria_store.create(path, dim=384)
        s.ingest(wordnet.base[:1500])
        s.ingest(wordnet.base[1500:2200])
        s.ingest(wordnet.base[2200:])
    s.delete(np.arange(0, 3000, 41))
    assert s.router.kind == "tree" and s.info()["internals"]["maintenance"].get("splits", 0) >= 1
    yield s
    s.close()


def probed_rows(store, query: np.ndarray, probes: int):
    """Ids, vectors, sketch codes and bucket of every live row of ``query``'s first
    ``probes`` buckets, read directly from the segments (the reference of the engine)."""
    router = store.router
    keys = router.probe_order(query[None, :], probes)[0]
    parts = []
    with store._reads.snapshot() as snap:
        for key in keys.tolist():
            for seg, first, n in snap.view.extents(key):
                reader = snap.view.segments[seg]
                mask = snap.view.live_mask(seg, first, n)
                mask = np.ones(n, dtype=bool) if mask is None else mask
                parts.append((reader.ids(first, first + n)[mask],
                              np.asarray(reader.vectors(first, first + n), dtype=np.float32)[mask],
                              reader.read("sketch", first, first + n)[mask], np.full(int(mask.sum()), key)))
    return tuple(np.concatenate(p) for p in zip(*parts))


def test_a_tree_codes_each_row_against_its_node_centroid(tree_store) -> None:
    """A tree's sketch is residual: the stored codes, moved rows included, are those of
    each row minus the scaled centroid of its bucket's node."""
    router = tree_store.router
    sketch = router.lrsq.sketch
    assert sketch.residual > 0
    assert tree_store.info()["buckets"] > router.n_nodes  # leaves split: rows moved
    _, x, codes, keys = probed_rows(tree_store, np.asarray(tree_store.get([7]), dtype=np.float32)[0], 400)
    assert len(x) > 1000
    y = router.rotate(x)
    centers = router.rotate(router.centers(keys))
    np.testing.assert_array_equal(codes, sketch.encode(y, centers))
    assert (codes != sketch.encode(y, 0 * centers)).any()  # the centre matters
    with pytest.raises(ValueError, match="bucket centres"):
        sketch.encode(y)


def test_residual_scores_are_closer_to_exact_than_a_sketch_of_the_rows(tree, tree_data) -> None:
    """The point of the residual: the same bytes estimate scores better. The tree's
    residual sketch and a sketch of the rows themselves are both trained on the tree's
    training rows, and compared on further rows of the same clusters."""
    from asteria_store.testing import clustered_vectors

    sketch = tree.lrsq.sketch
    assert sketch.residual > 0
    held = clustered_vectors(6000, tree_data.shape[1], clusters=40, seed=3)[len(tree_data):]
    y = tree.rotate(held)
    centers = tree.rotate(tree.centers(tree.keys(held).astype(np.int64)))
    plain = Sketch.train(tree.rotate(tree_data)[:, : sketch.dim])
    codes, plain_codes = sketch.encode(y, centers), plain.encode(y)
    err_res, err_plain = [], []
    for q in held[::50]:
        qy = tree.rotate(q[None, :])[0]
        exact = held @ q
        err_res.append(np.abs(sketch.scores(qy, codes, centers) - exact).mean())
        err_plain.append(np.abs(plain.scores(qy, plain_codes) - exact).mean())
    assert np.mean(err_res) < 0.85 * np.mean(err_plain), (np.mean(err_res), np.mean(err_plain))


@pytest.mark.parametrize("probes", [4, 12])
@pytest.mark.parametrize("which", ["tree_store", "sketch_store"])
def test_rerank_rescores_the_best_rows_by_residual_score(request, which, wordnet, probes) -> None:
    """The engine's candidates are the ``rerank`` best probed rows by the residual sketch
    score (centre term included), rescored exactly: checked against a reference built
    from the segments, for a tree (node centroids) and a flat model (probe centroids)."""
    tree_store = request.getfixturevalue(which)
    router = tree_store.router
    sketch = router.lrsq.sketch
    rerank = 20
    agree = 0
    queries = wordnet.queries[:20]
    got, _ = tree_store.search(queries, K, probes=probes, rerank=rerank)
    for q, ids in zip(queries, got):
        row_ids, x, codes, keys = probed_rows(tree_store, q, probes)
        approx = sketch.scores(router.rotate(q[None, :])[0], codes, router.rotate(router.centers(keys)))
        best = np.argsort(-approx, kind="stable")[:rerank]
        exact = x[best] @ q
        want = row_ids[best][np.lexsort((row_ids[best], -exact))][:K]
        agree += np.array_equal(ids[: len(want)], want)
    assert agree >= len(queries) - 1, agree  # float sums may order one tie at the cut differently


def test_rerank_of_every_probed_row_on_a_split_tree_is_the_certified_search(tree_store, wordnet) -> None:
    for probes in (2, 8):
        ids, scores = tree_store.search(wordnet.queries, K, probes=probes, prune=False)
        r_ids, r_scores = tree_store.search(wordnet.queries, K, probes=probes, rerank=10_000)
        np.testing.assert_array_equal(r_ids, ids)
        np.testing.assert_allclose(r_scores, scores, rtol=0, atol=1e-6)


def test_a_sketch_of_the_rows_themselves_still_serves(wordnet, tmp_path) -> None:
    """Models saved before residual sketches (format 3: the sketch codes the rows
    themselves) keep working: their codes carry no centre, and search by sketch adds none."""
    import dataclasses
    import json

    import torch

    torch.set_num_threads(1)
    router, _ = train(wordnet.base[:2000], TrainConfig(bits=4, device="cpu"))
    assert router.lrsq.sketch.residual > 0
    plain = Sketch.train(router.rotate(wordnet.base[:2000])[:, :384])
    router = router.with_lrsq(dataclasses.replace(router.lrsq, sketch=plain))
    assert router.centers(np.arange(3)) is None
    assert router.config()["format_version"] == 3
    save_model_file(router, tmp_path / "model.pt")
    with asteria_store.create(tmp_path / "store", dim=384, model=tmp_path / "model.pt") as store:
        store.ingest(wordnet.base[:1200])
        reader = next(iter(store._current_view().segments.values()))
        x = np.asarray(reader.vectors(0, 64), dtype=np.float32)
        np.testing.assert_array_equal(reader.read("sketch", 0, 64), plain.encode(store.router.rotate(x)))
        saved = [json.loads(p.read_text())["format_version"] for p in (tmp_path / "store").glob("model/*/router.json")]
        assert saved == [3]
        ids, _ = store.search(wordnet.queries[:20], K, probes=4, prune=False)
        np.testing.assert_array_equal(store.search(wordnet.queries[:20], K, probes=4, rerank=10_000)[0], ids)
        truth = brute_force_topk(wordnet.base[:1200], wordnet.queries[:20], K)[0]
        assert recall(store.search(wordnet.queries[:20], K, probes=4, rerank=30)[0], truth) >= \
            recall(ids, truth) - 0.05
