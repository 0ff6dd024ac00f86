"""The learned model's parts: BOR rotation, Hadamard codes and soft decoding, LRSQ certified
score intervals, the ECVH router at inference, and the routing metrics."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asteria_store.model.bor import ButterflyRotation, next_pow2
from asteria_store.model.codes import (
    HadamardCode,
    exhaustive_decode,
    fwht,
    parity_check_from_generator,
)
from asteria_store.model.ecvh import ECVHRouter
from asteria_store.model.lrsq import LRSQ
from asteria_store.model.metrics import (
    fraction_for_recall,
    occupancy,
    recall_at_fractions,
    rows_to_reach,
)
from asteria_store.model.persist import load_router, save_router
from asteria_store.model.router import bits_to_keys

DATA = Path(__file__).parent / "data"


def unit_rows(n: int, dim: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def random_orthogonal(n: int, seed: int) -> np.ndarray:
    """A Haar-random n x n orthogonal matrix (float64)."""
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def gf2_rank(a: np.ndarray) -> int:
    a = a.copy() % 2
    rank = 0
    for col in range(a.shape[1]):
        hit = next((r for r in range(rank, a.shape[0]) if a[r, col]), None)
        if hit is None:
            continue
        a[[rank, hit]] = a[[hit, rank]]
        for r in range(a.shape[0]):
            if r != rank and a[r, col]:
                a[r] ^= a[rank]
        rank += 1
    return rank


def sylvester(n: int) -> np.ndarray:
    """Explicit Hadamard matrix H[u, j] = (-1)**popcount(u & j)."""
    u = np.arange(n)
    pc = np.array([bin(int(v)).count("1") for v in (u[:, None] & u[None, :]).ravel()])
    return ((-1.0) ** pc).reshape(n, n)


# --- BOR --------------------------------------------------------------------------------


@pytest.mark.parametrize("dim, size", [(8, 8), (384, 512), (100, 128), (2, 2)])
@pytest.mark.parametrize("layers", [None, 3])
def test_bor_is_orthogonal_and_matches_its_dense_matrix(dim: int, size: int, layers) -> None:
    rot = ButterflyRotation(dim, layers, init_scale=3.0, seed=7).double()
    assert rot.size == size == next_pow2(dim)
    assert rot.angles.abs().max() > 0.2  # really rotated, not the identity
    with torch.no_grad():
        m = rot.matrix().numpy()
        assert m.shape == (size, size)
        np.testing.assert_allclose(m @ m.T, np.eye(size), atol=1e-5)
        np.testing.assert_allclose(m.T @ m, np.eye(size), atol=1e-5)
        assert np.abs(m - np.eye(size)).max() > 0.1
        x = torch.from_numpy(np.random.default_rng(1).standard_normal((50, dim)) * 3.0)
        y = rot(x)
        assert y.shape == (50, size)
        np.testing.assert_allclose(y.norm(dim=1).numpy(), x.norm(dim=1).numpy(), rtol=1e-6)
        np.testing.assert_allclose(y.numpy(), rot.pad(x).numpy() @ m, atol=1e-10)
    dense = rot.float().dense()
    assert dense.dtype == np.float32 and dense.shape == (size, size)
    np.testing.assert_allclose(dense @ dense.T, np.eye(size), atol=1e-5)


def test_bor_float32_forward_preserves_norms() -> None:
    rot = ButterflyRotation(384, init_scale=3.0, seed=2)
    x = torch.from_numpy(unit_rows(200, 384, seed=3))
    with torch.no_grad():
        y = rot(x)
        np.testing.assert_allclose(y.norm(dim=1).numpy(), 1.0, atol=1e-5)
        np.testing.assert_allclose(y.numpy(), rot.pad(x).numpy() @ rot.matrix().numpy(), atol=1e-5)


def test_bor_zero_angles_is_identity() -> None:
    rot = ButterflyRotation(100, layers=9)
    assert torch.count_nonzero(rot.angles) == 0
    with torch.no_grad():
        rot.angles.zero_()
        np.testing.assert_array_equal(rot.matrix().numpy(), np.eye(128, dtype=np.float32))
        x = torch.from_numpy(unit_rows(5, 100))
        y = rot(x)
        np.testing.assert_array_equal(y[:, :100].numpy(), x.numpy())
        assert torch.count_nonzero(y[:, 100:]) == 0


def test_bor_layer_pairs_coordinates_at_its_stride() -> None:
    # One layer at stride 1 with angle pi/2 on the first pair only: e0 -> e1, e1 -> -e0.
    rot = ButterflyRotation(8, layers=1)
    with torch.no_grad():
        rot.angles[0, 0] = np.pi / 2
        m = rot.matrix().numpy()
    expected = np.eye(8, dtype=np.float32)
    expected[:2, :2] = [[0, 1], [-1, 0]]
    np.testing.assert_allclose(m, expected, atol=1e-7)


def test_bor_gradients_reach_the_angles() -> None:
    rot = ButterflyRotation(16, init_scale=0.5, seed=0)
    x = torch.from_numpy(unit_rows(4, 16))
    rot(x)[:, 0].sum().backward()
    assert rot.angles.grad is not None and torch.count_nonzero(rot.angles.grad) > 0


def test_bor_dimension_one_is_identity() -> None:
    rot = ButterflyRotation(1)
    x = torch.tensor([[2.0], [-3.0]])
    with torch.no_grad():
        np.testing.assert_array_equal(rot(x).numpy(), x.numpy())


# --- codes --------------------------------------------------------------------------------

CODES = [(3, 8), (4, 16), (5, 32), (6, 64), (6, 20), (8, 40), (7, 12), (10, 30)]


def make_code(k: int, m: int) -> HadamardCode:
    return HadamardCode(k) if m == 2**k else HadamardCode.punctured(k, m, seed=1)


@pytest.mark.parametrize("n", [1, 2, 8, 64])
def test_fwht_matches_explicit_hadamard_product(n: int) -> None:
    x = np.random.default_rng(n).standard_normal((5, n)).astype(np.float32)
    np.testing.assert_allclose(fwht(x), x.astype(np.float64) @ sylvester(n).T, atol=1e-4)
    np.testing.assert_allclose(fwht(x[0]), fwht(x)[0], atol=0)  # 1-d input
    np.testing.assert_allclose(fwht(fwht(x)) / n, x, atol=1e-5)  # H H = n I
    y = x.copy()
    fwht(y)
    np.testing.assert_array_equal(y, x)  # the input is not modified


def test_fwht_refuses_non_power_of_two() -> None:
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(np.ones(6))


@pytest.mark.parametrize("k, m", CODES)
def test_code_distance_and_matrices(k: int, m: int) -> None:
    code = make_code(k, m)
    assert (code.k, code.m) == (k, m)
    d = code.minimum_distance()
    assert d >= 3
    if m == 2**k:
        assert d == 2 ** (k - 1)
    # the definition, independently: smallest weight over all non-zero messages
    g = code.generator.astype(np.int64)
    assert g.shape == (k, m)
    msgs = np.array(list(itertools.product([0, 1], repeat=k)))[1:]  # (2**k - 1, k)
    assert int(((msgs @ g) % 2).sum(axis=1).min()) == d
    # encode() agrees with the generator, with little-endian message bits
    ints = msgs @ (1 << np.arange(k))
    np.testing.assert_array_equal(code.encode(ints), (msgs @ g) % 2)
    h = code.parity_check.astype(np.int64)
    assert h.shape == (m - k, m)
    assert not ((g @ h.T) % 2).any()
    assert gf2_rank(h) == m - k
    assert gf2_rank(g) == k
    # every codeword passes the parity checks
    assert not ((code.encode(np.arange(2**k)).astype(np.int64) @ h.T) % 2).any()


def test_parity_check_from_a_non_systematic_generator() -> None:
    g = np.array([[1, 1, 0, 1, 0, 0], [0, 1, 1, 0, 1, 0], [1, 0, 1, 0, 0, 1]], dtype=np.uint8)
    g = np.array([g[0] ^ g[1], g[1], g[1] ^ g[2]])  # same code, scrambled rows
    h = parity_check_from_generator(g)
    assert h.shape == (3, 6)
    assert not ((g.astype(np.int64) @ h.T) % 2).any()
    assert gf2_rank(h) == 3
    with pytest.raises(ValueError, match="full rank"):
        parity_check_from_generator(np.array([[1, 0, 1], [1, 0, 1]], dtype=np.uint8))


def test_code_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        HadamardCode(0)
    with pytest.raises(ValueError, match="distinct"):
        HadamardCode(3, np.array([1, 1, 2]))
    with pytest.raises(ValueError, match="distinct"):
        HadamardCode(3, np.array([1, 8]))
    with pytest.raises(ValueError, match="m >= k"):
        HadamardCode.punctured(6, 7)
    assert HadamardCode.punctured(4, 99).m == 16


@pytest.mark.parametrize("k, m", CODES)
def test_encode_decode_round_trip(k: int, m: int) -> None:
    code = make_code(k, m)
    rng = np.random.default_rng(k * 100 + m)
    msgs = rng.integers(0, 2**k, 300)
    c = code.encode(msgs)
    z = (2.0 * c - 1.0) * rng.uniform(0.01, 2.0, c.shape)
    np.testing.assert_array_equal(code.decode(z.astype(np.float32)), msgs)
    # every message decodes, including 0 and 2**k - 1
    all_msgs = np.arange(2**k)
    np.testing.assert_array_equal(code.decode(2.0 * code.encode(all_msgs) - 1.0), all_msgs)


@pytest.mark.parametrize("k, m", CODES)
def test_decode_equals_exhaustive_soft_decoding(k: int, m: int) -> None:
    code = make_code(k, m)
    z = np.random.default_rng(m).standard_normal((200, m)).astype(np.float32)
    ours = code.decode(z)
    ref = exhaustive_decode(code, z)
    np.testing.assert_array_equal(ours, ref)
    # and the correlation identity behind it: cost = (sum|z| - corr) / 2
    corr = code.correlations(z)
    assert corr.shape == (200, 2**k)
    msgs = np.arange(2**k)
    for row in (0, 1, 199):
        cost = code.soft_cost(np.repeat(z[row : row + 1], 2**k, axis=0), msgs)
        np.testing.assert_allclose(cost, (np.abs(z[row]).sum() - corr[row]) / 2, atol=1e-4)


@pytest.mark.parametrize("k, m", CODES)
def test_correlation_order_is_soft_cost_order(k: int, m: int) -> None:
    code = make_code(k, m)
    z = np.random.default_rng(m + 1).standard_normal((20, m)).astype(np.float32)
    corr = code.correlations(z)
    for row in range(len(z)):
        order = np.argsort(-corr[row], kind="stable")
        cost = code.soft_cost(np.repeat(z[row : row + 1], len(order), axis=0), order)
        assert np.all(np.diff(cost) >= -1e-4), row
        assert order[0] == code.decode(z[row])[0]


@pytest.mark.parametrize("k, m", CODES)
def test_a_flipped_low_margin_bit_is_corrected(k: int, m: int) -> None:
    code = make_code(k, m)
    rng = np.random.default_rng(7 * m)
    msgs = rng.integers(0, 2**k, 200)
    s = 2.0 * code.encode(msgs) - 1.0
    mag = rng.uniform(0.5, 2.0, s.shape)
    weakest = rng.integers(0, m, len(msgs))
    mag[np.arange(len(msgs)), weakest] = rng.uniform(0.01, 0.49, len(msgs))
    z = s * mag
    z[np.arange(len(msgs)), weakest] *= -1  # the hard bits are now wrong in one place
    hard = (z > 0).astype(np.uint8)
    assert np.all((hard != code.encode(msgs)).sum(axis=1) == 1)
    np.testing.assert_array_equal(code.decode(z.astype(np.float32)), msgs)


def test_full_code_corrects_hard_errors_up_to_half_its_distance() -> None:
    code = HadamardCode(4)  # distance 8: any 3 wrong bits of equal weight are corrected
    rng = np.random.default_rng(5)
    for msg in range(16):
        for flips in itertools.combinations(range(16), 3):
            if rng.random() > 0.05:
                continue
            z = 2.0 * code.encode(np.array([msg]))[0] - 1.0
            z[list(flips)] *= -1
            assert code.decode(z)[0] == msg


def test_punctured_code_keeps_the_message_readable() -> None:
    code = HadamardCode.punctured(8, 40, seed=3)
    units = 1 << np.arange(8)
    assert np.isin(units, code.positions).all()
    msgs = np.random.default_rng(0).integers(0, 256, 50)
    c = code.encode(msgs)
    idx = np.searchsorted(code.positions, units)
    np.testing.assert_array_equal(bits_to_keys(c[:, idx].astype(bool)), msgs.astype(np.uint64))


# --- LRSQ ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wordnet() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(base, queries, rotation): the PCA basis of the base, zero-padded to 512 columns."""
    base = np.load(DATA / "wordnet_base_3000.f16.npy").astype(np.float32)
    queries = np.load(DATA / "wordnet_queries_200.f16.npy").astype(np.float32)
    x = base.astype(np.float64)
    _, vecs = np.linalg.eigh(x.T @ x)
    rotation = np.zeros((384, 512))
    rotation[:, :384] = vecs[:, ::-1]  # largest energy first
    return base, queries, rotation.astype(np.float32)


def check_certified(lrsq: LRSQ, qy: np.ndarray, y: np.ndarray, exact: np.ndarray):
    codes, aux = lrsq.encode(y)
    assert codes.shape == (len(y), lrsq.rank) and codes.dtype == np.uint8
    assert aux.shape == (len(y), lrsq.aux_width) and aux.dtype == np.float16
    assert lrsq.bytes_per_vector == codes[0].nbytes + aux[0].nbytes
    est, lower, upper = lrsq.estimate(qy, codes, aux)
    assert est.shape == lower.shape == upper.shape == exact.shape
    assert np.isfinite(lower).all() and np.isfinite(upper).all()
    assert int((lower > exact).sum()) == 0, float((lower - exact).max())
    assert int((upper < exact).sum()) == 0, float((exact - upper).max())
    assert np.all(lower <= est) and np.all(est <= upper)
    return est, lower, upper


@pytest.mark.parametrize("rank", [64, 96, 128])
def test_lrsq_intervals_hold_on_real_embeddings(wordnet, rank: int) -> None:
    base, queries, rotation = wordnet
    exact = queries.astype(np.float64) @ base.astype(np.float64).T  # unrotated, float64
    est, lower, upper = check_certified(LRSQ(rank, 32), queries @ rotation, base @ rotation, exact)
    mae = np.abs(est - exact).mean()
    width = (upper - lower).mean()
    # measured: rank 64 -> 0.023 / 0.80; 96 -> 0.016 / 0.57; 128 -> 0.012 / 0.42
    assert mae < {64: 0.03, 96: 0.02, 128: 0.015}[rank]
    assert width < {64: 0.9, 96: 0.65, 128: 0.5}[rank]


def test_lrsq_intervals_hold_on_real_base_against_itself(wordnet) -> None:
    base, _, rotation = wordnet
    y = base @ rotation
    exact = base[:300].astype(np.float64) @ base.astype(np.float64).T
    check_certified(LRSQ(128, 32), y[:300], y, exact)


def test_lrsq_more_rank_gives_narrower_intervals(wordnet) -> None:
    base, queries, rotation = wordnet
    y, qy = base @ rotation, queries @ rotation
    widths, errors = [], []
    for rank in (32, 64, 96, 128, 256, 384):
        lrsq = LRSQ(rank, 32)
        est, lower, upper = lrsq.estimate(qy, *lrsq.encode(y))
        widths.append(float((upper - lower).mean()))
        errors.append(float(np.abs(est - queries.astype(np.float64) @ base.T.astype(np.float64)).mean()))
    assert all(a > b for a, b in zip(widths, widths[1:])), widths
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert widths[-1] < 0.05  # with the whole vector coded only quantization error remains


def test_lrsq_intervals_hold_on_gaussian_vectors() -> None:
    base = unit_rows(2000, 200, seed=11)
    queries = unit_rows(100, 200, seed=12)
    rotation = random_orthogonal(256, seed=13)[:200].astype(np.float32)  # (200, 256)
    exact = queries.astype(np.float64) @ base.astype(np.float64).T
    est, lower, upper = check_certified(LRSQ(96, 32), queries @ rotation, base @ rotation, exact)
    # an isotropic vector keeps only rank/D of its energy: honest, wide, but not vacuous
    assert (upper - lower).mean() < 2.0
    assert np.abs(est - exact).mean() < 0.1


def test_lrsq_decode_is_close_and_aux_is_rounded_up() -> None:
    y = unit_rows(500, 64, seed=4)
    lrsq = LRSQ(32, 16)
    codes, aux = lrsq.encode(y)
    recon = lrsq.decode(codes, aux)
    nb = lrsq.n_blocks
    err = aux[:, 2 * nb : 3 * nb].astype(np.float64)
    blockwise = np.abs(y[:, :32].astype(np.float64) - recon).reshape(500, nb, 16).max(axis=2)
    assert np.all(blockwise <= err)
    rho = aux[:, 3 * nb].astype(np.float64)
    assert np.all(np.linalg.norm(y[:, 32:].astype(np.float64), axis=1) <= rho)
    assert blockwise.max() < 0.01


def test_lrsq_rejects_rank_not_a_multiple_of_block() -> None:
    with pytest.raises(ValueError, match="multiple"):
        LRSQ(rank=40, block=32)
    with pytest.raises(ValueError):
        LRSQ(rank=0, block=32)


@st.composite
def lrsq_cases(draw):
    dim = draw(st.integers(1, 64))
    block = draw(st.integers(1, dim))
    rank = block * draw(st.integers(1, dim // block))
    n = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**32 - 1))
    rotate = draw(st.booleans())
    log_scale = draw(st.floats(-3.0, 2.0))
    constant_blocks = draw(st.booleans())
    return dim, rank, block, n, seed, rotate, log_scale, constant_blocks


@settings(derandomize=True, max_examples=150, deadline=None)
@given(lrsq_cases())
def test_lrsq_interval_property(case) -> None:
    dim, rank, block, n, seed, rotate, log_scale, constant_blocks = case
    rng = np.random.default_rng(seed)
    # vectors of varied norms around 10**log_scale, some tiny, some zero
    x = rng.standard_normal((n, dim)) * 10.0 ** (log_scale + rng.uniform(-1, 1, (n, 1)))
    x[rng.random(n) < 0.1] = 0.0
    q = rng.standard_normal((5, dim)) * rng.uniform(0.1, 3.0, (5, 1))
    if rotate:
        r = random_orthogonal(dim, seed).astype(np.float32)
        y, qy = x.astype(np.float32) @ r, q.astype(np.float32) @ r
        exact = q.astype(np.float32).astype(np.float64) @ x.astype(np.float32).astype(np.float64).T
    else:
        y, qy = x.astype(np.float32), q.astype(np.float32)
        if constant_blocks:
            for b in range(rank // block):
                rows = rng.random(n) < 0.5
                y[rows, b * block : (b + 1) * block] = y[rows, b * block : b * block + 1]
        exact = qy.astype(np.float64) @ y.astype(np.float64).T
    lrsq = LRSQ(rank, block)
    codes, aux = lrsq.encode(y)
    est, lower, upper = lrsq.estimate(qy, codes, aux)
    assert np.all(lower <= exact), (lower - exact).max()
    assert np.all(exact <= upper), (exact - upper).max()
    # never (beyond float16 rounding of rho) wider than Cauchy-Schwarz's +-|q||x|
    scale = np.linalg.norm(qy, axis=1)[:, None] * np.linalg.norm(y, axis=1)[None, :]
    assert np.all(upper - lower <= 2.01 * scale + 1e-5)


# --- ECVH ---------------------------------------------------------------------------------


def make_router(*, ecc: bool, bits: int = 4, positions=None, d: int = 24, size: int = 32,
                seed: int = 0, lrsq: LRSQ | None = None) -> ECVHRouter:
    rng = np.random.default_rng(seed)
    rotation = random_orthogonal(size, seed)[:d]  # (d, D) with orthonormal rows
    m = (len(positions) if positions is not None else 2**bits) if ecc else bits
    vantages = rng.standard_normal((m, size)) / np.sqrt(size)
    offsets = rng.normal(0, 0.05, m)
    return ECVHRouter(rotation, vantages, offsets, bits=bits, ecc=ecc, positions=positions,
                      lrsq=lrsq, info={"seed": seed})


def test_ecvh_full_code_keys_are_the_argmax_of_scores() -> None:
    router = make_router(ecc=True)
    assert router.code is not None and router.code.m == 16 == router.m
    x = unit_rows(3000, 24, seed=1)
    z = router.margins(x)
    np.testing.assert_allclose(z, (x @ router.rotation) @ router.vantages.T + router.offsets, atol=1e-5)
    scores = router.scores(x)
    assert scores.shape == (3000, 16)
    # the folded centroid shortcut equals the decoder's correlations
    np.testing.assert_allclose(scores, router.code.correlations(z), atol=1e-4)
    keys = router.keys(x)
    assert keys.dtype == np.uint64
    np.testing.assert_array_equal(keys, scores.argmax(axis=1).astype(np.uint64))
    np.testing.assert_array_equal(keys, router.code.decode(z).astype(np.uint64))
    assert len(np.unique(keys)) == 16  # every bucket is used


def test_ecvh_keys_are_chunked_consistently() -> None:
    router = make_router(ecc=True, d=8, size=8)
    x = unit_rows(20000, 8, seed=2)  # more than one 8192-row chunk
    np.testing.assert_array_equal(router.keys(x), router.scores(x).argmax(axis=1).astype(np.uint64))


def test_ecvh_punctured_code_keys_decode_margins() -> None:
    code = HadamardCode.punctured(6, 20, seed=0)
    router = make_router(ecc=True, bits=6, positions=code.positions)
    assert router._centroids is None and router.m == 20
    x = unit_rows(500, 24, seed=3)
    z = router.margins(x)
    np.testing.assert_array_equal(router.scores(x), code.correlations(z))
    np.testing.assert_array_equal(router.keys(x), exhaustive_decode(code, z).astype(np.uint64))


@pytest.mark.parametrize("positions", [None, "punctured"])
def test_ecvh_probe_keys_start_home_and_cover_every_bucket(positions) -> None:
    bits = 4 if positions is None else 6
    pos = None if positions is None else HadamardCode.punctured(6, 20, seed=0).positions
    router = make_router(ecc=True, bits=bits, positions=pos)
    x = unit_rows(100, 24, seed=4)
    keys, z = router.keys(x), router.margins(x)
    for i in range(len(x)):
        probes = list(router.probe_keys(z[i]))
        assert probes[0] == int(keys[i])
        assert sorted(probes) == list(range(2**bits))
        cost = router.code.soft_cost(np.repeat(z[i : i + 1], len(probes), axis=0), np.array(probes))
        assert np.all(np.diff(cost) >= -1e-5)


def test_ecvh_without_code_is_sign_hashing() -> None:
    router = make_router(ecc=False, bits=4)
    assert router.code is None and router.m == 4
    x = unit_rows(1000, 24, seed=5)
    z = router.margins(x)
    keys = router.keys(x)
    expected = ((z > 0) * (1 << np.arange(4))).sum(axis=1).astype(np.uint64)
    np.testing.assert_array_equal(keys, expected)
    for i in range(50):
        probes = list(router.probe_keys(z[i]))
        assert probes[0] == int(keys[i])
        assert sorted(probes) == list(range(16))
        flips = [bin(p ^ probes[0]).count("1") for p in probes]
        assert flips[1] == 1 and probes[1] == probes[0] ^ (1 << int(np.argmin(np.abs(z[i]))))
        costs = [np.abs(z[i])[[b for b in range(4) if (p ^ probes[0]) >> b & 1]].sum() for p in probes]
        assert np.all(np.diff(costs) >= -1e-6)


def test_ecvh_rejects_inconsistent_shapes() -> None:
    rotation = random_orthogonal(16, 0)[:8]
    with pytest.raises(ValueError, match="code length"):
        ECVHRouter(rotation, np.ones((15, 16)), np.zeros(15), bits=4, ecc=True)
    with pytest.raises(ValueError, match="equal bits"):
        ECVHRouter(rotation, np.ones((5, 16)), np.zeros(5), bits=4, ecc=False)


def test_ecvh_full_length_permuted_positions_score_like_the_code() -> None:
    pos = np.random.default_rng(0).permutation(16)
    router = make_router(ecc=True, bits=4, positions=pos)
    x = unit_rows(200, 24, seed=6)
    np.testing.assert_allclose(router.scores(x), router.code.correlations(router.margins(x)), atol=1e-4)


@pytest.mark.parametrize("ecc", [True, False])
def test_ecvh_save_load_round_trip(tmp_path, ecc: bool) -> None:
    router = make_router(ecc=ecc, lrsq=LRSQ(64, 32) if ecc else None, seed=3)
    digest = save_router(router, tmp_path / "model")
    loaded = load_router(tmp_path / "model", digest=digest)
    assert isinstance(loaded, ECVHRouter)
    assert (loaded.bits, loaded.ecc, loaded.m, loaded.dim) == (router.bits, ecc, router.m, 24)
    assert loaded.info == {"seed": 3} and loaded.lrsq == router.lrsq
    if ecc:
        np.testing.assert_array_equal(loaded.code.positions, router.code.positions)
    x = unit_rows(2000, 24, seed=7)
    np.testing.assert_array_equal(loaded.keys(x), router.keys(x))
    np.testing.assert_array_equal(loaded.margins(x), router.margins(x))
    z = router.margins(x[0])
    assert list(loaded.probe_keys(z)) == list(router.probe_keys(z))
    assert save_router(loaded, tmp_path / "again") == digest


# --- metrics ------------------------------------------------------------------------------


def test_rows_to_reach_hand_example() -> None:
    # 3 buckets of sizes 2, 3, 1 (base rows 0..5)
    base_buckets = np.array([0, 0, 1, 1, 1, 2])
    probe_scores = np.array([
        [0.9, 0.5, 0.1],  # order 0, 1, 2: cumulative 2, 5, 6
        [0.1, 0.2, 0.3],  # order 2, 1, 0: cumulative 1, 4, 6
    ])
    truth = np.array([[0, 5], [5, 3]])
    reach = rows_to_reach(probe_scores, base_buckets, truth, 3)
    np.testing.assert_array_equal(reach, [[2, 6], [1, 4]])
    assert reach.dtype == np.int64
    # an empty bucket in the order costs nothing
    reach = rows_to_reach(np.array([[0.0, 1.0, 0.5, 0.7]]), np.array([0, 0, 2]), np.array([[0, 2]]), 4)
    np.testing.assert_array_equal(reach, [[3, 1]])


def test_recall_and_fraction_are_consistent() -> None:
    rng = np.random.default_rng(0)
    n_base = 1000
    reach = rng.integers(1, n_base + 1, (50, 10))
    fractions = (0.01, 0.05, 0.1, 0.5, 1.0)
    recalls = recall_at_fractions(reach, n_base, fractions)
    assert list(recalls) == list(fractions)
    assert all(a <= b for a, b in zip(recalls.values(), list(recalls.values())[1:]))
    assert recalls[1.0] == 1.0
    for f in fractions:
        assert recalls[f] == (reach <= f * n_base).mean()
    for target in (0.1, 0.5, 0.9, 0.95, 1.0):
        f = fraction_for_recall(reach, n_base, target)
        assert (reach <= round(f * n_base)).mean() >= target
        assert (reach < round(f * n_base)).mean() < target  # and it is the smallest such
    np.testing.assert_array_equal(fraction_for_recall(np.array([[3, 1, 2, 4]]), 10, 0.5), 0.2)
    assert recall_at_fractions(np.array([[3, 1, 2, 4]]), 10, (0.2,)) == {0.2: 0.5}


def test_recall_at_fraction_for_recall_reaches_the_target() -> None:
    reach = np.array([[27]])
    f = fraction_for_recall(reach, 3000, 1.0)
    assert recall_at_fractions(reach, 3000, (f,))[f] >= 1.0


def test_occupancy() -> None:
    even = occupancy(np.repeat(np.arange(16), 5), 16)
    assert even == {"max_over_mean": 1.0, "entropy": pytest.approx(1.0, abs=1e-12), "empty": 0}
    skewed = occupancy(np.array([0, 0, 0, 1]), 4)
    assert skewed["max_over_mean"] == 3.0 and skewed["empty"] == 2
    expected = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25)) / np.log(4)
    assert skewed["entropy"] == pytest.approx(expected)
    assert occupancy(np.zeros(10, dtype=np.int64), 8)["entropy"] == 0.0


def test_a_trained_router_keeps_its_keys_through_save_and_load(tmp_path) -> None:
    """Regression: a training snapshot shared the offsets' memory with the live parameter,
    so the router used at ingest and the one saved (after more epochs) disagreed."""
    from asteria_store.model.persist import load_router, save_router
    from asteria_store.model.train import TrainConfig, train
    from asteria_store.testing import clustered_vectors

    x = clustered_vectors(3000, 16, clusters=20, seed=1)
    router, history = train(x, TrainConfig(bits=6, epochs=3, patience=5, device="cpu"))
    # init + 3 epochs (none stopped early), then the probe-means refit
    assert [h["epoch"] for h in history] == [0, 1, 2, 3, "probe-means"]
    before = router.keys(x)
    save_router(router, tmp_path / "m")
    np.testing.assert_array_equal(load_router(tmp_path / "m").keys(x), before)
    np.testing.assert_array_equal(router.keys(x), before)


def test_training_logits_shortcut_equals_margins_through_the_code() -> None:
    """With the full code in natural order, training computes the codeword correlations
    as y @ C^T + offsets @ code_matrix; it must equal margins(y) @ code_matrix."""
    import torch

    from asteria_store.model.train import ECVHModel

    gen = torch.Generator().manual_seed(0)
    bits, size = 5, 32
    model = ECVHModel(torch.eye(20, size), torch.randn(2**bits, size, generator=gen),
                      torch.randn(2**bits, generator=gen), bits, HadamardCode(bits), 32, 32, 0)
    assert model.full_code
    y = torch.randn(50, size, generator=gen)
    with torch.no_grad():
        fast = model.code_logits(y)
        slow = model.margins(y) @ model.code_matrix
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)


# --- training: epochs, warm starts, threads ---------------------------------------------


@pytest.fixture
def one_torch_thread():
    """Training tests run on one torch thread (tiny models train fastest so, and a busy
    machine does not slow them down); the caller's setting is restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def recall_at_probes(router, base: np.ndarray, queries: np.ndarray, probes: int, k: int = 10) -> float:
    """Share of each query's exact top-k in ``base`` lying in its first ``probes`` buckets."""
    from asteria_store.testing import brute_force_topk

    truth, _ = brute_force_topk(base, queries, k)
    keys = router.keys(base).astype(np.int64)
    order = router.probe_order(queries, probes)
    return float(np.mean([np.isin(keys[t], o).mean() for t, o in zip(truth, order)]))


def same_partition(a: np.ndarray, b: np.ndarray) -> float:
    """Share of rows whose ``a``-cell maps, by majority, to their ``b``-cell (1.0: the two
    labelings are the same partition up to renaming)."""
    pairs = np.unique(np.stack([a, b], axis=1), axis=0, return_counts=True)
    best = {}
    for (ka, _), count in zip(*pairs):
        best[ka] = max(best.get(ka, 0), count)
    return sum(best.values()) / len(a)


def test_epochs_zero_is_the_default_and_never_runs_adam(monkeypatch, one_torch_thread) -> None:
    from asteria_store.model import train as tm
    from asteria_store.testing import clustered_vectors

    assert tm.TrainConfig().epochs == 0
    calls = []
    inner = tm.exact_neighbours
    monkeypatch.setattr(tm, "exact_neighbours", lambda *a, **kw: calls.append(len(a[1])) or inner(*a, **kw))
    monkeypatch.setattr(torch.optim, "Adam", None)  # any use of the epoch loop fails
    x = clustered_vectors(3000, 16, clusters=20, seed=1)
    lines: list[str] = []
    router, history = tm.train(x, tm.TrainConfig(bits=5, device="cpu"), log=lines.append)
    assert [h["epoch"] for h in history] == [0, "probe-means"]
    assert calls == [300]  # the held-out truth only: no anchor neighbours without epochs
    assert lines[0].startswith("epoch 0 (init k-means): held-out scan for recall 0.90 = ")
    # k-means routing: every training row is in the bucket of its nearest centroid
    cents = router._centroids.T
    assert (router.keys(x).astype(np.int64) == (x @ cents.T + router._centroid_bias).argmax(1)).all()
    assert router.info["holdout_scan"] == history[-1]["holdout_scan"]


def test_epochs_log_every_loss_component(one_torch_thread) -> None:
    from asteria_store.model.train import TrainConfig, train
    from asteria_store.testing import clustered_vectors

    x = clustered_vectors(2000, 16, clusters=20, seed=2)
    lines: list[str] = []
    _, history = train(x, TrainConfig(bits=4, epochs=2, patience=5, device="cpu"), log=lines.append)
    assert [h["epoch"] for h in history] == [0, 1, 2, "probe-means"]
    for h in history[1:3]:
        assert {"pair", "balance", "quant", "holdout_scan"} <= set(h)
        assert np.isfinite([h["pair"], h["balance"], h["quant"]]).all()
    assert [line.split(":")[0] for line in lines[1:3]] == ["epoch 1", "epoch 2"]
    assert all(" pair " in line and " balance " in line and " quant " in line for line in lines[1:3])


@pytest.mark.parametrize("ecc, train_rotation, learns", [(True, None, False), (False, None, True),
                                                          (True, True, True)])
def test_the_rotation_is_learned_only_where_it_can_change_routing(monkeypatch, ecc: bool, train_rotation,
                                                                  learns: bool, one_torch_thread) -> None:
    """With the full code the centroids absorb any rotation: by default the BOR angles are
    not optimised and the rotation stays the PCA basis; sign bits learn them."""
    from asteria_store.model.train import TrainConfig, train
    from asteria_store.testing import clustered_vectors

    groups = []
    adam = torch.optim.Adam
    monkeypatch.setattr(torch.optim, "Adam", lambda params, **kw: groups.append(len(params)) or adam(params, **kw))
    x = clustered_vectors(2000, 16, clusters=20, seed=3)
    cfg = TrainConfig(bits=4, ecc=ecc, epochs=1, train_rotation=train_rotation, device="cpu")
    router, _ = train(x, cfg)
    assert groups == [2 if learns else 1]
    if not learns:
        start, _ = train(x, TrainConfig(bits=4, ecc=ecc, epochs=0, device="cpu"))
        np.testing.assert_array_equal(router.rotation, start.rotation)


def test_training_uses_the_threads_asked_and_restores_the_callers(one_torch_thread) -> None:
    from asteria_store.model.train import TrainConfig, train, training_threads
    from asteria_store.testing import clustered_vectors

    assert training_threads(3) == 3
    assert 1 <= training_threads() <= torch.get_num_threads() == 1
    router, _ = train(clustered_vectors(1000, 8, clusters=8, seed=0), TrainConfig(bits=3, threads=2, device="cpu"))
    assert router.info["threads"] == 2
    assert torch.get_num_threads() == 1


def test_train_config_epochs_none_is_the_default_and_zero_is_allowed() -> None:
    from asteria_store.errors import InvalidArgumentError
    from asteria_store.model.fit import train_config
    from asteria_store.model.train import TrainConfig

    common = {"bits": None, "ecc": True, "batch_size": 1024, "rank": None, "seed": 0, "device": "cpu",
              "expected_size": 10}
    assert train_config(epochs=None, **common).epochs == TrainConfig().epochs
    assert train_config(epochs=0, **common).epochs == 0
    assert train_config(epochs=3, **common).epochs == 3
    for bad in (-1, True, 1.5, "2"):
        with pytest.raises(InvalidArgumentError, match=r"^epochs must be a non-negative integer or None, got "):
            train_config(epochs=bad, **common)


# Warm starts, on the real-embedding slice: the old model was trained on the first half (as
# a store that has since doubled), the re-fit on all 3,000 rows.


def test_a_warm_start_seeds_kmeans_with_the_old_buckets(wordnet, one_torch_thread) -> None:
    """With no Lloyd step after the seeding, the re-fit's buckets ARE the old model's
    (same bits) or refine them (one more bit). An ignored init, or seeds that are not the
    old buckets' directions, fail this."""
    from asteria_store.model.train import TrainConfig, train

    base, _, _ = wordnet
    old, _ = train(base[:1500], TrainConfig(bits=5, device="cpu", seed=1))
    by_old = (base @ old.probe_centroids.T).argmax(1)  # the old buckets' directions
    same, _ = train(base, TrainConfig(bits=5, warm_iters=0, device="cpu"), init=old)
    assert same.info["warm_start"] == {"from_bits": 5, "splits": 0, "iters": 0}
    assert same_partition(same.keys(base).astype(np.int64), by_old) > 0.99
    assert same_partition(by_old, same.keys(base).astype(np.int64)) > 0.99
    grown, _ = train(base, TrainConfig(bits=6, warm_iters=0, device="cpu"), init=old)
    assert grown.info["warm_start"] == {"from_bits": 5, "splits": 1, "iters": 0}
    # 64 cells, nearly each inside one of the 32 (a cold fit: 0.55)
    assert same_partition(grown.keys(base).astype(np.int64), by_old) > 0.8
    # the control: a cold fit is another partition altogether (measured 0.48)
    cold, _ = train(base, TrainConfig(bits=5, device="cpu"))
    assert same.info["warm_start"] is not None and cold.info["warm_start"] is None
    assert same_partition(cold.keys(base).astype(np.int64), by_old) < 0.7


@pytest.mark.parametrize("old_bits", [5, 4])
def test_a_warm_refit_routes_as_well_as_a_cold_fit(wordnet, old_bits: int, one_torch_thread) -> None:
    from asteria_store.model.train import TrainConfig, train

    base, queries, _ = wordnet
    old, _ = train(base[:1500], TrainConfig(bits=old_bits, device="cpu", seed=1))
    cold, _ = train(base, TrainConfig(bits=5, device="cpu"))
    warm, _ = train(base, TrainConfig(bits=5, device="cpu"), init=old)
    assert warm.info["warm_start"]["from_bits"] == old_bits
    r_cold = recall_at_probes(cold, base, queries, 3)
    r_warm = recall_at_probes(warm, base, queries, 3)
    # measured over seeds 0-2: cold 0.656-0.664; warm from 32 buckets 0.655-0.660, from 16
    # (one split) 0.634-0.655
    assert r_warm >= r_cold - 0.03, (r_warm, r_cold)
    assert warm.info["holdout_scan"] <= cold.info["holdout_scan"] * 1.15


def test_a_warm_start_needs_fewer_steps_only_from_the_right_seeds(wordnet, one_torch_thread) -> None:
    """One Lloyd step from the old model's buckets already routes within tolerance of a
    cold fit; from garbage directions it routes far worse (measured 0.64 against 0.51)."""
    from asteria_store.model.ecvh import ECVHRouter
    from asteria_store.model.train import TrainConfig, train

    base, queries, _ = wordnet
    old, _ = train(base[:1500], TrainConfig(bits=5, device="cpu", seed=1))
    cold, _ = train(base, TrainConfig(bits=5, device="cpu"))
    r_cold = recall_at_probes(cold, base, queries, 3)
    noise = np.random.default_rng(0).standard_normal((32, base.shape[1])).astype(np.float32)
    garbage = ECVHRouter(old.rotation, old.vantages, old.offsets, bits=old.bits, ecc=True, lrsq=old.lrsq,
                         probe_centroids=noise / np.linalg.norm(noise, axis=1, keepdims=True))
    one_step = TrainConfig(bits=5, warm_iters=1, device="cpu")
    assert recall_at_probes(train(base, one_step, init=old)[0], base, queries, 3) >= r_cold - 0.03
    assert recall_at_probes(train(base, one_step, init=garbage)[0], base, queries, 3) < r_cold - 0.08


def test_an_unusable_init_starts_cold_and_says_why(wordnet, one_torch_thread) -> None:
    from asteria_store.model.router import SignHasher
    from asteria_store.model.train import TrainConfig, train

    base, _, _ = wordnet
    cold, _ = train(base, TrainConfig(bits=4, device="cpu"))
    big, _ = train(base[:1500], TrainConfig(bits=5, device="cpu"))
    for init, reason in ((SignHasher.random(384, 4), "cold start: init is a SignHasher, not an ECVH router"),
                         (big, "cold start: init has 5 bits, more than the 4 wanted")):
        lines: list[str] = []
        router, _ = train(base, TrainConfig(bits=4, device="cpu"), init=init, log=lines.append)
        assert lines[0] == reason
        assert router.info["warm_start"] is None
        np.testing.assert_array_equal(router.keys(base), cold.keys(base))
    other_dim, _ = train(base[:, :64].copy() / np.linalg.norm(base[:, :64], axis=1, keepdims=True),
                         TrainConfig(bits=4, device="cpu"))
    lines = []
    train(base, TrainConfig(bits=4, device="cpu"), init=other_dim, log=lines.append)
    assert lines[0] == "cold start: init has dimension 64, the vectors 384"
