"""One query's routing and search in compiled calls (numba, query/compiled.py), read in
place from the memory maps; this module holds their Python side.

A query alone is too little work for a matrix product: its cost is the per-call overhead of
numpy and Python across its stages. :func:`route` computes a query's rotation and probe
order from a router's compiled routing (an ECVH product or a routing tree), and
:func:`search_one` runs the rest in one compiled function over the flat bucket table of the
view (table.py):

1. the probed buckets in probe order, cut by the ``candidates`` budget;
2. each probed row's LRSQ interval from its 8-bit codes, read where they are mapped: the
   estimate ``sum_b scale_b <c_b, q_b> + lo_b sum(q_b)`` and the certified half-width
   ``|aux| @ w`` of :meth:`LRSQ.estimate` (model/lrsq.py), accumulated in float32 like that
   product (its slack allows for the rounding);
3. the threshold: the k-th best lower bound (k rows score at least that);
4. exact float32 scores of the rows whose upper bound reaches it, from their full vectors,
   into a top k ordered by score, equal scores by id.

The result is that of exact scoring of every probed row: a row left out has an upper
bound below k rows' exact scores.

numba is imported when the first query needs it; the compiled code is cached on disk
next to query/compiled.py where that is writable (else compiled once per process).
"""

from __future__ import annotations

import functools

import numpy as np

#: Fields of the ``stats`` array :func:`search_one` fills.
VISITED, ROWS, KEPT, UNUSABLE, UNREADABLE, MISSING = range(6)


@functools.cache
def _kernel():
    from . import compiled

    return (compiled.search_one, compiled.intervals, compiled.route, compiled.route_tree,
            compiled.sketch_candidates, compiled.rescore)


def typed_list(arrays: list[np.ndarray]):
    """A numba typed list of ``arrays`` (at least one, all of one type), for the kernels."""
    from . import compiled

    out = compiled.new_list(arrays[0])
    for a in arrays[1:]:
        compiled.list_append(out, a)
    return out


def route(routing, query: np.ndarray, probes: int) -> tuple[np.ndarray, np.ndarray]:
    """One query's first ``probes`` bucket keys and its rotation, by a router's
    :meth:`~asteria_store.model.router.Router.compiled_routing`: ``(keys (P,) int64,
    rotated (D,))``."""
    from ..model.router import TreeRouting

    qy = np.empty(len(routing.rotation), dtype=np.float32)
    if isinstance(routing, TreeRouting):
        keys = np.empty(min(probes, len(routing.leaves)), dtype=np.int64)
        n = _kernel()[3](query, routing.rotation, routing.cell, routing.cell_bias, routing.nodes,
                         routing.node_offsets, routing.leaves, routing.leaf_offsets, routing.node_root,
                         routing.split_w, routing.split_next, routing.assign, routing.cells_for(probes), keys, qy)
        return keys[:n], qy
    keys = np.empty(min(probes, len(routing.probe)), dtype=np.int64)
    _kernel()[2](query, routing.rotation, routing.probe, routing.probe_bias, routing.home, routing.home_bias,
                 keys, qy)
    return keys, qy


def intervals(table, keys: np.ndarray, terms) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LRSQ lower and upper bounds, and ids, of every live row of the buckets ``keys`` of
    ``table`` (its codes all usable), as :func:`search_one` computes them."""
    return _kernel()[1](keys, table.start, table.stop, table.slot, table.first, table.length, table.ids,
                        table.codes, table.aux, terms.head, terms.block_sums, terms.width_weights, terms.slack)


def search_one(table, keys: np.ndarray, candidates: int | None, terms, query: np.ndarray, k: int):
    """One query's top k over the buckets ``keys`` (its probe order) of ``table`` (a
    :class:`~asteria_store.query.table.BucketTable` holding them): ``(ids (k,), scores (k,),
    stats)``, padded with -1 / -inf; ``stats[UNUSABLE]`` set where a probed chunk has no
    usable codes (nothing else is then filled), ``stats[UNREADABLE]`` to 1 + the slot of a
    probed chunk that cannot be read, ``stats[MISSING]`` where a probed bucket is not in
    the table yet (add it, :meth:`BucketTable.ready`, and call again). ``terms``: the rotated query's
    :meth:`LRSQ.query_terms`."""
    out_i = np.empty(k, dtype=np.int64)
    out_s = np.empty(k, dtype=np.float32)
    stats = np.zeros(6, dtype=np.int64)
    _kernel()[0](keys, -1 if candidates is None else int(candidates), table.start, table.stop, table.stored,
              table.slot, table.first, table.length, table.usable, table.readable, table.ids, table.vectors,
              table.codes, table.aux, terms.head, terms.block_sums, terms.width_weights, terms.slack,
              query, out_i, out_s, stats)
    return out_i, out_s, stats


def sketch_candidates(table, keys: np.ndarray, candidates: int | None, sketch, qy: np.ndarray,
                      offsets: np.ndarray, rerank: int):
    """The ``rerank`` rows of the buckets ``keys`` of ``table`` with the best sketch scores
    (model/sketch.py) for rotated query ``qy``, plus ``offsets`` (float32, one per key:
    ``Sketch.offsets``): ``(slots, rows, stats)``, in table order;
    ``stats`` as :func:`search_one` fills it (``stats[UNUSABLE]``: a probed chunk has no
    sketch codes), with ``stats[KEPT]`` the candidates' count."""
    slots = np.empty(rerank, dtype=np.int64)
    rows = np.empty(rerank, dtype=np.int64)
    stats = np.zeros(6, dtype=np.int64)
    got = _kernel()[4](keys, -1 if candidates is None else int(candidates), table.start, table.stop, table.stored,
                       table.slot, table.first, table.length, table.sketched, table.sketch_readable, table.sketch,
                       sketch.codebook, qy, offsets, rerank, slots, rows, stats)
    got = max(got, 0)
    stats[KEPT] = got
    return slots[:got], rows[:got], stats


def rescore(table, slots: np.ndarray, rows: np.ndarray, query: np.ndarray, k: int):
    """The top k of the rows ``rows`` of chunk slots ``slots`` by exact score: ``(ids (k,),
    scores (k,))``, padded with -1 / -inf."""
    out_i = np.empty(k, dtype=np.int64)
    out_s = np.empty(k, dtype=np.float32)
    _kernel()[5](slots, rows, table.ids, table.vectors, query, out_i, out_s)
    return out_i, out_s


def warm() -> None:
    """Compile (or load) the kernel now rather than in the first query."""
    _kernel()
