"""One query's search in one compiled call (numba), read in place from the memory maps.

A query alone is too little work for a matrix product: its cost is the per-call overhead of
numpy and Python across its stages. :func:`search_one` runs them all in one compiled
function over the flat bucket table of the view (table.py):

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
next to this module where that is writable (else compiled once per process).
"""

from __future__ import annotations

import functools

import numpy as np

#: Fields of the ``stats`` array :func:`search_one` fills.
VISITED, ROWS, KEPT, UNUSABLE, UNREADABLE, MISSING = range(6)


@functools.cache
def _kernel():
    import numba
    from numba import types
    from numba.extending import overload

    from ..model.router import compiled_top

    top = compiled_top()

    def _row_dot(vecs, row, q, v32):  # pragma: no cover - compiled from the overload below
        raise NotImplementedError

    @overload(_row_dot)
    def _row_dot_impl(vecs, row, q, v32):
        """``vecs[row] @ q`` in float32: float16 rows (uint16 bit patterns) decoded first."""
        if vecs.dtype == types.uint16:
            def f16(vecs, row, q, v32):
                halves(vecs[row], v32)
                return dot(v32, q)
            return f16
        return lambda vecs, row, q, v32: dot(vecs[row], q)

    fast = {"reassoc", "contract"}

    @numba.njit(cache=True, nogil=True, fastmath=fast)
    def halves(src, out):
        """float16 bit patterns ``src`` (uint16, contiguous) as float32 into ``out`` (same
        shape, contiguous). Exact for every finite value, subnormals included: the bits
        shifted into a float32's place, then scaled by 2**112 (the exponent biases'
        difference). Arithmetic over one flat run, which vectorises; a lookup table
        (256 KiB) misses the cache, ~5x slower."""
        s = src.reshape(-1)
        o = out.reshape(-1)
        bits = o.view(np.uint32)
        for i in range(s.shape[0]):
            h = np.uint32(s[i])
            bits[i] = ((h & np.uint32(0x7FFF)) << np.uint32(13)) | ((h & np.uint32(0x8000)) << np.uint32(16))
        for i in range(s.shape[0]):
            o[i] *= np.float32(2.0**112)

    @numba.njit(cache=True, nogil=True, fastmath=fast)
    def bounds(codes, aux, r0, n, qh, qsum, w, width0, lo, hi, o, acc, scratch):
        """Intervals of rows ``r0 .. r0 + n`` of one chunk into ``lo``/``hi`` from ``o``.
        One block: a dot product per row. Several: see :func:`blocks`. ``acc``: room for
        one block; ``scratch``: for the rows' aux as float32 (at least ``n`` rows)."""
        rank = codes.shape[1]
        nb = qsum.shape[0]
        bl = rank // nb
        na = aux.shape[1]
        a32 = scratch[:n]
        halves(aux[r0 : r0 + n], a32)
        for i in range(n):
            r = r0 + i
            est = np.float32(0.0)
            if nb == 1:  # one block (the default): one dot product
                d = np.float32(0.0)
                for j in range(rank):
                    d += np.float32(codes[r, j]) * qh[j]
                est = a32[i, 0] * qsum[0] + a32[i, 1] * d
            else:
                est = blocks(codes, r, qh, qsum, a32[i], acc)
            width = width0
            for a in range(na):
                width += abs(a32[i, a]) * w[a]
            lo[o] = est - width
            hi[o] = est + width
            o += 1

    @numba.njit(cache=True, nogil=True, fastmath=fast)
    def blocks(codes, r, qh, qsum, a32, acc):
        """Row ``r``'s estimate over several blocks (``a32``: its aux as float32). The
        blocks are summed lane by lane into ``acc`` (one block wide), each block's products
        scaled as they are added: no per-block reduction, which would keep the compiler
        from vectorising the loop (~5x slower here)."""
        nb = qsum.shape[0]
        bl = codes.shape[1] // nb
        for j in range(bl):
            acc[j] = 0.0
        est = np.float32(0.0)
        for b in range(nb):
            sc = a32[nb + b]
            est += a32[b] * qsum[b]
            base = b * bl
            for j in range(bl):
                acc[j] += sc * (np.float32(codes[r, base + j]) * qh[base + j])
        for j in range(bl):
            est += acc[j]
        return est

    @numba.njit(cache=True, nogil=True, fastmath=fast)
    def dot(x, q):
        s = np.float32(0.0)
        for j in range(q.shape[0]):
            s += x[j] * q[j]
        return s

    @numba.njit(cache=True, nogil=True)
    def search_one(keys, candidates, start, stop, stored, slot, first, length, usable, readable,
                   ids, vecs, codes, aux, qh, qsum, w, width0, q, out_i, out_s, stats):
        k = out_i.shape[0]
        out_i[:] = -1
        out_s[:] = -np.inf
        gathered, visited, n, longest = 0, 0, 0, 0
        for p in range(keys.shape[0]):
            if candidates >= 0 and gathered >= candidates:
                break
            b = keys[p]
            if start[b] < 0:  # not in the table yet
                stats[MISSING] = 1
                return
            gathered += stored[b]
            visited += 1
            for r in range(start[b], stop[b]):
                if not readable[slot[r]]:
                    stats[UNREADABLE] = slot[r] + 1
                    return
                if not usable[slot[r]]:
                    stats[UNUSABLE] = 1
                    return
                n += length[r]
                longest = max(longest, length[r])
        stats[VISITED], stats[ROWS] = visited, n
        lo = np.empty(n, dtype=np.float32)
        hi = np.empty(n, dtype=np.float32)
        acc = np.empty(qh.shape[0] // qsum.shape[0], dtype=np.float32)
        scratch = np.empty((longest, w.shape[0]), dtype=np.float32)
        o = 0
        for p in range(visited):
            b = keys[p]
            for r in range(start[b], stop[b]):
                c = slot[r]
                bounds(codes[c], aux[c], first[r], length[r], qh, qsum, w, width0, lo, hi, o, acc, scratch)
                o += length[r]
        thr = -np.inf
        if n >= k:
            thr = np.partition(lo, n - k)[n - k]
        kept = 0
        v32 = np.empty(q.shape[0], dtype=np.float32)
        o = 0
        for p in range(visited):
            b = keys[p]
            for r in range(start[b], stop[b]):
                c = slot[r]
                v, idc = vecs[c], ids[c]
                for row in range(first[r], first[r] + length[r]):
                    if hi[o] >= thr:
                        kept += 1
                        s = _row_dot(v, row, q, v32)
                        i = idc[row]
                        if s > out_s[k - 1] or (s == out_s[k - 1] and (out_i[k - 1] < 0 or i < out_i[k - 1])):
                            at = k - 1  # insert: score descending, equal scores by id
                            while at > 0 and (out_s[at - 1] < s or (out_s[at - 1] == s and out_i[at - 1] > i)):
                                out_s[at], out_i[at] = out_s[at - 1], out_i[at - 1]
                                at -= 1
                            out_s[at], out_i[at] = s, i
                    o += 1
        stats[KEPT] = kept

    @numba.njit(cache=True, nogil=True, fastmath=fast)
    def gemv(m, x, bias, out):
        for i in range(m.shape[0]):
            s = np.float32(0.0)
            for j in range(x.shape[0]):
                s += m[i, j] * x[j]
            out[i] = s + bias[i] if bias.shape[0] else s

    @numba.njit(cache=True, nogil=True)
    def route(x, rotation, probe, probe_bias, home, home_bias, keys, qy):
        gemv(rotation, x, probe_bias[:0], qy)
        s = np.empty(probe.shape[0], dtype=np.float32)
        gemv(probe, x, probe_bias, s)
        if home.shape[0]:
            hs = np.empty(home.shape[0], dtype=np.float32)
            gemv(home, x, home_bias, hs)
            s[np.argmax(hs)] = np.inf
        top(s.reshape(1, -1), keys.reshape(1, -1))

    @numba.njit(cache=True, nogil=True)
    def route_tree(x, rotation, cell, cell_bias, nodes, node_off, leaves, leaf_off, node_root, split_w,
                   split_next, assign, t, keys, qy):
        """router.TreeRouting's probe order of ``x``: its first keys.shape[0] buckets into
        ``keys`` (fewer where its cells hold fewer: the count is returned)."""
        gemv(rotation, x, cell_bias[:0], qy)
        cs = np.empty(cell.shape[0], dtype=np.float32)
        gemv(cell, x, cell_bias, cs)
        cells = np.empty((1, t), dtype=np.int64)
        top(cs.reshape(1, -1), cells)
        best, node = -np.inf, 0
        for slot in range(min(assign, t)):  # its best node: better cell, then lower node, for ties
            c = cells[0, slot]
            for m in range(node_off[c], node_off[c + 1]):
                v = dot(nodes[m], x)
                if v > best:
                    best, node = v, m
        ref = node_root[node]
        while ref >= 0:  # down the node's split tree
            ref = split_next[ref, 1 if dot(split_w[ref], x) < 0 else 0]
        own = -ref - 1
        width = 0
        for c in range(leaf_off.shape[0] - 1):
            width = max(width, leaf_off[c + 1] - leaf_off[c])
        ls = np.full(t * width, -np.inf, dtype=np.float32)
        lk = np.full(t * width, -1, dtype=np.int64)
        valid = 0
        for slot in range(t):  # leaves in (cell slot, leaf) order: ties go to the earlier
            c = cells[0, slot]
            for j in range(leaf_off[c + 1] - leaf_off[c]):
                leaf = leaf_off[c] + j
                ls[slot * width + j] = np.inf if leaf == own else dot(leaves[leaf], x)
                lk[slot * width + j] = leaf
                valid += 1
        p = min(keys.shape[0], valid)
        cols = np.empty((1, p), dtype=np.int64)
        top(ls.reshape(1, -1), cols)
        for i in range(p):
            keys[i] = lk[cols[0, i]]
        return p

    @numba.njit(cache=True, nogil=True)
    def intervals(keys, start, stop, slot, first, length, ids, codes, aux, qh, qsum, w, width0):
        n, longest = 0, 0
        for b in keys:
            for r in range(start[b], stop[b]):
                n += length[r]
                longest = max(longest, length[r])
        lo = np.empty(n, dtype=np.float32)
        hi = np.empty(n, dtype=np.float32)
        out_i = np.empty(n, dtype=np.int64)
        acc = np.empty(qh.shape[0] // qsum.shape[0], dtype=np.float32)
        scratch = np.empty((longest, w.shape[0]), dtype=np.float32)
        o = 0
        for b in keys:
            for r in range(start[b], stop[b]):
                c = slot[r]
                bounds(codes[c], aux[c], first[r], length[r], qh, qsum, w, width0, lo, hi, o, acc, scratch)
                out_i[o : o + length[r]] = ids[c][first[r] : first[r] + length[r]]
                o += length[r]
        return lo, hi, out_i

    return search_one, intervals, route, route_tree


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


def warm() -> None:
    """Compile (or load) the kernel now rather than in the first query."""
    _kernel()
