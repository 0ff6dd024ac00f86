"""Input validation at the boundary: VectorSource, .npy reading, ids."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from asteria_store import DimensionMismatchError, InvalidInputError
from asteria_store.io import VectorSource, load_ids, read_array


def rows(n: int = 100, dim: int = 8) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)


# --- VectorSource ---------------------------------------------------------------------------


def test_source_from_an_array() -> None:
    x = rows()
    src = VectorSource(x, dim=8)
    assert (src.n, src.dim, src.path) == (100, 8, None)
    blocks = list(src.blocks(32))
    assert [start for start, _ in blocks] == [0, 32, 64, 96]
    assert [len(b) for _, b in blocks] == [32, 32, 32, 4]
    assert all(b.dtype == np.float32 for _, b in blocks)
    np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), x)
    np.testing.assert_array_equal(src.take(np.array([3, 50, 99])), x[[3, 50, 99]])
    src.release()  # a no-op for in-memory arrays


def test_source_from_a_npy_path_is_memory_mapped(tmp_path: Path) -> None:
    x = rows().astype(np.float16)
    np.save(tmp_path / "x.npy", x)
    src = VectorSource(str(tmp_path / "x.npy"), dim=8)
    assert src.path == str(tmp_path / "x.npy")
    assert isinstance(src.array, np.memmap)
    got = np.concatenate([b for _, b in src.blocks(7)])
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, x.astype(np.float32))
    rows_ = np.arange(0, 100, 3)
    np.testing.assert_array_equal(src.take(rows_), x[rows_].astype(np.float32))


@pytest.mark.parametrize("dtype", [np.int8, np.int64, np.uint16, np.float16, np.float64, ">f4"])
def test_real_numeric_dtypes_are_accepted(dtype) -> None:
    x = (rows(10) * 10).astype(dtype)
    (_, block), = VectorSource(x).blocks(100)
    np.testing.assert_array_equal(block, x.astype(np.float32))


@pytest.mark.parametrize("data, dtype", [
    (np.zeros((2, 3), bool), "bool"),
    (np.zeros((2, 3), complex), "complex128"),
    (np.full((2, 3), "x"), "<U1"),
    (np.array([[None, 1]], dtype=object), "object"),
    (np.zeros((2, 3), "datetime64[s]"), "datetime64[s]"),
])
def test_non_numeric_dtypes_are_refused(data, dtype) -> None:
    with pytest.raises(InvalidInputError) as info:
        VectorSource(data, what="queries")
    assert str(info.value) == f"Expected queries with a real numeric dtype (float or int), got dtype {dtype}."


@pytest.mark.parametrize("shape", [(8,), (2, 3, 4), ()])
def test_shapes_other_than_2d_are_refused(shape) -> None:
    with pytest.raises(InvalidInputError) as info:
        VectorSource(np.ones(shape, np.float32))
    assert str(info.value) == (
        f"Expected vectors as a 2-D array of shape (n, d), got {len(shape)}-D shape {shape}. "
        "For one vector, pass vec[None, :]."
    )


def test_empty_input_is_refused() -> None:
    with pytest.raises(InvalidInputError, match=r"^Expected at least one row of vectors, got an empty array\.$"):
        VectorSource(np.ones((0, 8), np.float32))


def test_ragged_input_is_refused() -> None:
    with pytest.raises(InvalidInputError, match=r"^Cannot use vectors as an array: "):
        VectorSource([[1.0, 2.0], [3.0]])


def test_dimension_mismatch() -> None:
    with pytest.raises(DimensionMismatchError) as info:
        VectorSource(rows(4, 768), dim=384, what="queries")
    assert isinstance(info.value, InvalidInputError) and isinstance(info.value, ValueError)
    assert str(info.value) == "Expected queries of dimension 384, got 768. Was the store created with --dim 768?"
    VectorSource(rows(4, 384), dim=384)  # the right one passes
    VectorSource(rows(4, 384))  # and no dim means no check


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_caught_in_a_later_block_with_their_row(bad: float) -> None:
    x = rows()
    x[73, 5] = bad
    x[90, 0] = bad  # a later one: the first is reported
    src = VectorSource(x)  # construction does not scan the values
    seen = []
    with pytest.raises(InvalidInputError) as info:
        for start, _ in src.blocks(16):
            seen.append(start)
    assert seen == [0, 16, 32, 48]  # the blocks before the bad one were handed out
    assert str(info.value) == (
        "Expected finite vectors, got NaN or inf (first in row 73). Clean or drop those rows and retry."
    )


def test_non_finite_values_in_a_npy_file(tmp_path: Path) -> None:
    x = rows(50)
    x[41, 2] = np.nan
    np.save(tmp_path / "x.npy", x)
    with pytest.raises(InvalidInputError, match=r"\(first in row 41\)"):
        list(VectorSource(tmp_path / "x.npy").blocks(10))


def test_float64_values_beyond_float32_are_refused_without_numpy_noise() -> None:
    x = rows(4).astype(np.float64)
    x[2, 1] = 1e300
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InvalidInputError, match=r"\(first in row 2\)"):
            list(VectorSource(x).blocks(10))


# --- reading files --------------------------------------------------------------------------


def test_npz_archives_are_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "x.npz", x=rows())
    with pytest.raises(InvalidInputError) as info:
        VectorSource(tmp_path / "x.npz")
    assert str(info.value) == (
        f"Cannot read vectors file {str(tmp_path / 'x.npz')!r}: expected a .npy array, got an .npz archive."
    )
    # Also when named .npy.
    (tmp_path / "x.npz").rename(tmp_path / "renamed.npy")
    with pytest.raises(InvalidInputError, match=r"got an \.npz archive\.$"):
        read_array(tmp_path / "renamed.npy", "vectors")


@pytest.mark.parametrize("content", [b"", b"1.0,2.0\n3.0,4.0\n", b"\x80\x04\x95 pickled", b"\x93NUM"])
def test_files_that_are_not_npy_are_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "x.csv"
    path.write_bytes(content)
    with pytest.raises(InvalidInputError) as info:
        VectorSource(path)
    assert str(info.value) == (
        f"Cannot read vectors file {str(path)!r}: not a .npy file (save arrays with numpy.save)."
    )


def test_pickled_npy_is_refused_without_unpickling(tmp_path: Path) -> None:
    path = tmp_path / "obj.npy"
    np.save(path, np.array([[{"a": 1}]], dtype=object), allow_pickle=True)
    with pytest.raises(InvalidInputError, match=r"^Cannot read vectors file .*: not a valid \.npy file \("):
        VectorSource(path)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError) as info:
        VectorSource(tmp_path / "nope.npy", what="queries")
    assert str(info.value) == f"Cannot read queries file {str(tmp_path / 'nope.npy')!r}: no such file."
    with pytest.raises(InvalidInputError) as info:
        VectorSource(tmp_path)
    assert str(info.value) == f"Cannot read vectors file {str(tmp_path)!r}: it is a directory."


def test_read_array_passes_arrays_through(tmp_path: Path) -> None:
    x = rows(3)
    assert read_array(x, "ids") is x
    np.save(tmp_path / "x.npy", x)
    np.testing.assert_array_equal(read_array(str(tmp_path / "x.npy"), "ids"), x)


# --- ids ------------------------------------------------------------------------------------


def test_load_ids_accepts_integers_as_uint64(tmp_path: Path) -> None:
    for ids in ([3, 1, 2], np.array([3, 1, 2], np.int32), np.array([3, 1, 2], np.uint8)):
        got = load_ids(ids, n=3)
        assert got.dtype == np.uint64 and got.tolist() == [3, 1, 2]
    np.save(tmp_path / "ids.npy", np.array([2**62, 0], dtype=np.int64))
    assert load_ids(tmp_path / "ids.npy", n=2).tolist() == [2**62, 0]


@pytest.mark.parametrize("ids, n, message", [
    (np.array([1.0, 2.0]), 2, "Expected integer ids, got dtype float64."),
    (np.array(["a", "b"]), 2, "Expected integer ids, got dtype <U1."),
    (np.array([[1, 2]]), 2, "Expected ids as a 1-D array, got shape (1, 2)."),
    (np.array(5), 1, "Expected ids as a 1-D array, got shape ()."),
    (np.array([1, 2, 3]), 2, "Expected 2 ids (one per vector), got 3."),
    (np.array([4, -7, 2]), 3, "Expected non-negative ids, got -7."),
])
def test_load_ids_checks(ids, n: int, message: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        load_ids(ids, n=n)
    assert str(info.value) == message


def test_load_ids_from_a_bad_file(tmp_path: Path) -> None:
    (tmp_path / "ids.npy").write_text("1\n2\n")
    with pytest.raises(InvalidInputError) as info:
        load_ids(tmp_path / "ids.npy", n=2)
    assert str(info.value) == (
        f"Cannot read ids file {str(tmp_path / 'ids.npy')!r}: not a .npy file (save arrays with numpy.save)."
    )
