"""Arguments, options and parameter types shared by several ``asteria-store`` commands.

Paths are passed to the library unchecked (no ``exists=True``): the library's own errors
say what is missing and how to fix it, in the same words as for Python callers.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

import click

from asteria_store.config import Metric, StorageDtype


def library_default(fn: Callable[..., Any], name: str) -> Any:
    """The default of parameter ``name`` of library function ``fn``: one source of truth."""
    return inspect.signature(fn).parameters[name].default


class ProbesType(click.ParamType):
    """A probe budget: an integer, or ``all`` for exact search. Range checks are the library's."""

    name = "N|all"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, int) or value == "all":
            return value
        try:
            return int(value)
        except ValueError:
            self.fail(f"expected an integer or 'all', got {value!r}.", param, ctx)


def path_type() -> click.Path:
    """A filesystem path given to the library as a :class:`~pathlib.Path`, unchecked."""
    return click.Path(path_type=Path)


store_path = click.argument("path", type=path_type(), metavar="PATH")
"""The store directory (positional)."""


def npy_argument(name: str, metavar: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A positional ``.npy`` file (parameter ``name``), read by the library."""
    return click.argument(name, type=path_type(), metavar=metavar)


def metric_option(fn: Callable[..., Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--metric``, defaulting to ``fn``'s ``metric``."""
    return click.option("--metric", type=click.Choice(get_args(Metric)), default=library_default(fn, "metric"),
                        show_default=True, help="cosine: vectors are normalised; ip: raw inner product.")


def dtype_option(fn: Callable[..., Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--dtype``, defaulting to ``fn``'s ``dtype``."""
    return click.option("--dtype", type=click.Choice(get_args(StorageDtype)), default=library_default(fn, "dtype"),
                        show_default=True, help="Storage dtype of the vectors; float16 halves disk and bytes read.")


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")

no_lock_option = click.option(
    "--no-lock", is_flag=True,
    help="Read without LMDB's lock file (network filesystems). Safe only while no process writes to the store.")

quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bars on stderr.")


def training_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by ``train`` and ``train-model`` (defaults: ``Store.train``'s)."""
    from asteria_store import Store

    def default(name: str) -> Any:
        return library_default(Store.train, name)

    for option in reversed([
        click.option("--epochs", type=int, default=default("epochs"), show_default=True,
                     help="Passes over the neighbour pairs (early stopping may end sooner)."),
        click.option("--batch-size", type=int, default=default("batch_size"), show_default=True,
                     help="Pairs per optimiser step."),
        click.option("--bits", type=int, default=None, metavar="N",
                     help="2**N buckets. More: smaller buckets, fewer rows read per probe, more "
                          "probes for the same recall. [default: ~128 vectors per bucket]"),
        click.option("--rank", type=int, default=None, metavar="R",
                     help="LRSQ rank (multiple of 32). Higher: tighter score bounds, more bytes "
                          "per vector. [default: keeps 97% of the sample's energy]"),
        click.option("--ecc/--no-ecc", default=default("ecc"), show_default=True,
                     help="Soft-decoded Hadamard code (routes like k-means) or plain learned sign bits."),
        click.option("--seed", type=int, default=default("seed"), show_default=True, help="Seed of every random choice."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=default("device"),
                     show_default=True, help="Where torch trains (auto: CUDA when present)."),
    ]):
        fn = option(fn)
    return fn
