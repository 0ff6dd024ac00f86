"""The baseline router: SignHasher, key packing, multi-probe order, persistence."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from asteria_store import CorruptStoreError, UnsupportedFormatError
from asteria_store.model.persist import load_router, save_router
from asteria_store.model.router import (
    BASE_MODEL_FORMAT,
    MODEL_FORMAT_VERSION,
    SignHasher,
    bits_for_size,
    bits_to_keys,
    flip_sets,
)


def unit_rows(n: int, dim: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# --- SignHasher -----------------------------------------------------------------------------


@pytest.mark.parametrize("dim, bits", [(32, 12), (32, 32), (384, 12), (8, 1)])
def test_random_projection_has_orthonormal_rows(dim: int, bits: int) -> None:
    hasher = SignHasher.random(dim, bits, seed=3)
    p = hasher.projection
    assert p.shape == (bits, dim) and p.dtype == np.float32
    assert (hasher.bits, hasher.dim, hasher.seed) == (bits, dim, 3)
    np.testing.assert_allclose(p @ p.T, np.eye(bits), atol=1e-5)


def test_more_bits_than_dimensions_adds_unit_rows() -> None:
    hasher = SignHasher.random(8, 20, seed=0)
    p = hasher.projection.astype(np.float64)
    assert p.shape == (20, 8)
    np.testing.assert_allclose(p[:8] @ p[:8].T, np.eye(8), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(p, axis=1), 1.0, atol=1e-5)


def test_keys_are_deterministic_for_a_seed() -> None:
    x = unit_rows(500, 32)
    a, b = SignHasher.random(32, 12, seed=7), SignHasher.random(32, 12, seed=7)
    np.testing.assert_array_equal(a.projection, b.projection)
    np.testing.assert_array_equal(a.keys(x), b.keys(x))
    other = SignHasher.random(32, 12, seed=8)
    assert (other.keys(x) != a.keys(x)).mean() > 0.5


def test_keys_are_the_packed_signs_of_the_margins() -> None:
    x = unit_rows(300, 16)
    hasher = SignHasher.random(16, 10, seed=1)
    keys = hasher.keys(x)
    margins = hasher.margins(x)
    assert keys.dtype == np.uint64 and keys.shape == (300,)
    assert margins.shape == (300, 10)
    np.testing.assert_allclose(margins, x @ hasher.projection.T, rtol=1e-6)
    expected = [sum(1 << i for i in range(10) if m[i] > 0) for m in margins]
    assert keys.tolist() == expected
    assert int(keys.max()) < 2**10
    # 300 points spread over many of the 1024 buckets, not a handful.
    assert len(np.unique(keys)) > 150


# --- bits_to_keys ---------------------------------------------------------------------------


def test_bits_to_keys_packs_bit_i_with_weight_two_to_the_i() -> None:
    np.testing.assert_array_equal(bits_to_keys(np.eye(5, dtype=bool)), [1, 2, 4, 8, 16])
    bits = np.random.default_rng(0).random((200, 40)) < 0.5
    want = [sum(1 << i for i in np.flatnonzero(row)) for row in bits]
    assert bits_to_keys(bits).tolist() == want
    # The full 63 bits without overflow.
    assert int(bits_to_keys(np.ones((1, 63), dtype=bool))[0]) == 2**63 - 1
    top = np.zeros((1, 63), dtype=bool)
    top[0, 62] = True
    assert int(bits_to_keys(top)[0]) == 2**62
    assert bits_to_keys(np.zeros((3, 7), dtype=bool)).tolist() == [0, 0, 0]
    assert bits_to_keys(np.eye(5, dtype=bool)).dtype == np.uint64


# --- flip_sets ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_flip_sets_yields_every_subset_once_in_cost_order(seed: int) -> None:
    cost = np.random.default_rng(seed).random(5)
    out = list(flip_sets(cost))
    assert len(out) == 32
    assert out[0] == (0.0, ())
    subsets = [frozenset(s) for _, s in out]
    assert len(set(subsets)) == 32
    assert set(subsets) == {frozenset(c) for r in range(6) for c in itertools.combinations(range(5), r)}
    totals = [t for t, _ in out]
    true_totals = [float(cost[list(s)].sum()) for _, s in out]
    np.testing.assert_allclose(totals, true_totals, atol=1e-12)
    assert all(b >= a - 1e-12 for a, b in zip(true_totals, true_totals[1:]))


def test_flip_sets_with_integer_costs_is_exactly_ordered() -> None:
    cost = np.array([3.0, 1.0, 4.0, 1.0, 5.0, 9.0])
    out = list(flip_sets(cost))
    assert len(out) == 64
    totals = [t for t, _ in out]
    assert totals == sorted(totals)
    assert all(t == sum(cost[i] for i in s) for t, s in out)
    assert out[1][1] in ((1,), (3,))  # the cheapest single flip comes right after the home bucket


def test_flip_sets_edge_cases_and_laziness() -> None:
    assert list(flip_sets(np.array([]))) == [(0.0, ())]
    assert list(flip_sets(np.array([2.0]))) == [(0.0, ()), (2.0, (0,))]
    # Lazy: the first probes of a 60-bit router come at once (2**60 subsets are never built).
    first = list(itertools.islice(flip_sets(np.random.default_rng(0).random(60)), 500))
    assert len(first) == 500 and len({frozenset(s) for _, s in first}) == 500


# --- probe_keys -----------------------------------------------------------------------------


def test_probe_keys_start_at_home_and_are_distinct() -> None:
    hasher = SignHasher.random(16, 6, seed=0)
    queries = unit_rows(20, 16, seed=1)
    margins = hasher.margins(queries)
    homes = hasher.keys(queries)
    for m, home in zip(margins, homes):
        keys = list(hasher.probe_keys(m))
        assert keys[0] == int(home)
        assert sorted(keys) == list(range(64))  # every bucket, once
        # Second probe flips the bit with the smallest |margin|.
        assert keys[1] == int(home) ^ (1 << int(np.argmin(np.abs(m))))
        # Cost order: sum of |margin| of the flipped bits never decreases.
        costs = [float(np.abs(m)[[i for i in range(6) if (k ^ int(home)) >> i & 1]].sum()) for k in keys]
        assert all(b >= a - 1e-6 for a, b in zip(costs, costs[1:]))


# --- persistence ----------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    hasher = SignHasher.random(32, 12, seed=5)
    digest = save_router(hasher, tmp_path / "sign-0")
    assert len(digest) == 64
    assert sorted(p.name for p in (tmp_path / "sign-0").iterdir()) == ["projection.npy", "router.json"]
    desc = json.loads((tmp_path / "sign-0" / "router.json").read_text())
    assert desc == {"format_version": BASE_MODEL_FORMAT, "kind": "sign", "bits": 12, "dim": 32, "seed": 5}
    for check in (digest, None):
        loaded = load_router(tmp_path / "sign-0", digest=check)
        assert isinstance(loaded, SignHasher)
        assert loaded.config() == hasher.config()
        np.testing.assert_array_equal(loaded.projection, hasher.projection)
        x = unit_rows(1000, 32)
        np.testing.assert_array_equal(loaded.keys(x), hasher.keys(x))
    # Same router, same bytes, same digest.
    assert save_router(SignHasher.random(32, 12, seed=5), tmp_path / "again") == digest


def test_saved_arrays_are_little_endian_npy_without_pickle(tmp_path: Path) -> None:
    hasher = SignHasher.random(16, 4, seed=0)

    class BigEndianRouter:  # a router whose arrays come big-endian: save must fix the order
        kind, bits = "sign", 4

        def config(self) -> dict:
            return hasher.config()

        def arrays(self) -> dict[str, np.ndarray]:
            return {"projection": hasher.projection.astype(">f4")}

    save_router(BigEndianRouter(), tmp_path / "m")
    path = tmp_path / "m" / "projection.npy"
    with path.open("rb") as fh:
        assert np.lib.format.read_magic(fh) == (1, 0)
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
    assert (shape, fortran, dtype.str) == ((4, 16), False, "<f4")
    arr = np.load(path, allow_pickle=False)
    np.testing.assert_array_equal(arr, hasher.projection)
    assert isinstance(load_router(tmp_path / "m"), SignHasher)


@pytest.mark.parametrize("victim", ["projection.npy", "router.json"])
def test_tampering_breaks_the_digest(tmp_path: Path, victim: str) -> None:
    d = tmp_path / "m"
    digest = save_router(SignHasher.random(16, 4, seed=0), d)
    if victim == "router.json":
        desc = json.loads((d / victim).read_text())
        desc["seed"] = 1
        (d / victim).write_text(json.dumps(desc, sort_keys=True))
    else:
        raw = bytearray((d / victim).read_bytes())
        raw[-3] ^= 0x40
        (d / victim).write_bytes(bytes(raw))
    with pytest.raises(CorruptStoreError) as info:
        load_router(d, digest=digest)
    assert isinstance(info.value, RuntimeError)
    assert str(info.value) == (
        f"The store's model in {str(d)!r} does not match the catalog's digest; "
        "it was modified or partially written."
    )


def test_an_extra_array_file_breaks_the_digest(tmp_path: Path) -> None:
    d = tmp_path / "m"
    digest = save_router(SignHasher.random(16, 4, seed=0), d)
    np.save(d / "extra.npy", np.zeros(3))
    with pytest.raises(CorruptStoreError):
        load_router(d, digest=digest)


def test_unreadable_or_unknown_models(tmp_path: Path) -> None:
    with pytest.raises(CorruptStoreError, match=r"^Cannot read the store's model in "):
        load_router(tmp_path / "missing")
    d = tmp_path / "m"
    save_router(SignHasher.random(16, 4, seed=0), d)
    desc = json.loads((d / "router.json").read_text())
    (d / "router.json").write_text(json.dumps({**desc, "format_version": MODEL_FORMAT_VERSION + 1}))
    with pytest.raises(UnsupportedFormatError) as info:
        load_router(d)
    assert str(info.value) == (
        f"The store's model has format version {MODEL_FORMAT_VERSION + 1}, this asteria-store "
        f"reads up to {MODEL_FORMAT_VERSION}. Upgrade asteria-store."
    )
    (d / "router.json").write_text(json.dumps({**desc, "kind": "nope"}))
    with pytest.raises(UnsupportedFormatError) as info:
        load_router(d)
    assert str(info.value) == f"Unknown router kind 'nope' in {str(d)!r}."


# --- sizing ---------------------------------------------------------------------------------


def test_bits_for_size() -> None:
    assert bits_for_size(1_000_000) == 12  # log2(1e6 / 256) = 11.93
    assert bits_for_size(256 * 2**10) == 10
    assert bits_for_size(256 * 2**10, bucket_rows=1024) == 8
    assert bits_for_size(3000) == 4  # 11.7 rows per bucket -> 2**4 buckets of ~188
    assert bits_for_size(1) == 1 and bits_for_size(0) == 1  # at least one bit
    assert bits_for_size(256 * 2**40) == 24  # capped at max_bits
    assert bits_for_size(256 * 2**40, max_bits=30) == 30
