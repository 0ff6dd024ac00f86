"""The compiled loops of query/native.py (numba), imported when the first query needs them.

Every function is defined at module level and calls the others as module globals: numba
caches such functions on disk (next to this module, where that is writable) and loads
them in later processes. Functions defined inside another function see their callees as
closure variables, which numba keys per process: they were compiled again in every
process (~10 s for the first query).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import types
from numba.extending import overload
from numba.typed import List

from ..model.router import compiled_top
from .native import KEPT, MISSING, ROWS, UNREADABLE, UNUSABLE, VISITED

top = compiled_top()

#: Float sums may be reassociated (vectorised) and multiply-adds fused.
FASTMATH = {"reassoc", "contract"}


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


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
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


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def bounds(codes, aux, r0, n, qh, qsum, w, width0, lo, hi, o, scratch):
    """Intervals of rows ``r0 .. r0 + n`` of one chunk into ``lo``/``hi`` from ``o``.
    One block: a dot product per row. Several: see :func:`blocks`. ``scratch``: room for
    the rows' aux as float32 (at least ``n`` rows)."""
    rank = codes.shape[1]
    nb = qsum.shape[0]
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
            est = blocks(codes, r, qh, qsum, a32[i])
        width = width0
        for a in range(na):
            width += abs(a32[i, a]) * w[a]
        lo[o] = est - width
        hi[o] = est + width
        o += 1


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def blocks(codes, r, qh, qsum, a32):
    """Row ``r``'s estimate over several blocks (``a32``: its aux as float32), one
    reduction per block (the block width is known only at run time, so the compiler
    vectorises each; a width fixed at compile time unrolled it into scalar code)."""
    nb = qsum.shape[0]
    bl = codes.shape[1] // nb
    est = np.float32(0.0)
    for b in range(nb):
        base = b * bl
        d = np.float32(0.0)
        for j in range(bl):
            d += np.float32(codes[r, base + j]) * qh[base + j]
        est += a32[nb + b] * d + a32[b] * qsum[b]
    return est


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def dot(x, q):
    s = np.float32(0.0)
    for j in range(q.shape[0]):
        s += x[j] * q[j]
    return s


@numba.njit(cache=True, nogil=True)
def visit(keys, candidates, start, stop, stored, slot, length, coded, readable, stats):
    """How many of the probed buckets ``keys`` a query visits under the ``candidates``
    budget (-1: none), and their live rows: ``(visited, rows)``, into ``stats`` too.
    ``(-1, 0)`` where a bucket is not in the table yet (``stats[MISSING]``), a chunk cannot
    be read (``stats[UNREADABLE]`` = its slot + 1) or has no ``coded`` codes
    (``stats[UNUSABLE]``)."""
    gathered, visited, n = 0, 0, 0
    for p in range(keys.shape[0]):
        if candidates >= 0 and gathered >= candidates:
            break
        b = keys[p]
        if start[b] < 0:  # not in the table yet
            stats[MISSING] = 1
            return -1, 0
        gathered += stored[b]
        visited += 1
        for r in range(start[b], stop[b]):
            if not readable[slot[r]]:
                stats[UNREADABLE] = slot[r] + 1
                return -1, 0
            if not coded[slot[r]]:
                stats[UNUSABLE] = 1
                return -1, 0
            n += length[r]
    stats[VISITED], stats[ROWS] = visited, n
    return visited, n


@numba.njit(cache=True, nogil=True)
def insert(out_i, out_s, s, i):
    """Score ``s`` of id ``i`` into the top k ``out_s``/``out_i`` (score descending, equal
    scores by id; free places hold -inf / -1)."""
    k = out_i.shape[0]
    if s > out_s[k - 1] or (s == out_s[k - 1] and (out_i[k - 1] < 0 or i < out_i[k - 1])):
        at = k - 1
        while at > 0 and (out_s[at - 1] < s or (out_s[at - 1] == s and out_i[at - 1] > i)):
            out_s[at], out_i[at] = out_s[at - 1], out_i[at - 1]
            at -= 1
        out_s[at], out_i[at] = s, i


@numba.njit(cache=True, nogil=True)
def search_one(keys, candidates, start, stop, stored, slot, first, length, usable, readable,
               ids, vecs, codes, aux, qh, qsum, w, width0, q, out_i, out_s, stats):
    k = out_i.shape[0]
    out_i[:] = -1
    out_s[:] = -np.inf
    visited, n = visit(keys, candidates, start, stop, stored, slot, length, usable, readable, stats)
    if visited < 0:
        return
    lo, hi = bucket_bounds(keys[:visited], start, stop, slot, first, length, codes, aux, qh, qsum, w, width0)
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
                    insert(out_i, out_s, _row_dot(v, row, q, v32), idc[row])
                o += 1
    stats[KEPT] = kept


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def sketch_lut(codebook, qy):
    """(m, 256): ``<q_s, centroid_{s,c}>`` of rotated query ``qy`` (model/sketch.py)."""
    m, dsub, nc = codebook.shape
    lut = np.zeros((m, nc), dtype=np.float32)
    for s in range(m):
        for j in range(dsub):
            v = qy[s + m * j]
            for c in range(nc):
                lut[s, c] += v * codebook[s, j, c]
    return lut


@numba.njit(cache=True, nogil=True)
def sketch_candidates(keys, candidates, start, stop, stored, slot, first, length, sketched, readable,
                      sketch, codebook, qy, offsets, rerank, cand_slot, cand_row, stats):
    """The ``rerank`` probed rows with the best sketch scores (all of them where fewer),
    as chunk slots and rows into ``cand_slot``/``cand_row`` in table order; returns how
    many (-1 where :func:`visit` found a problem). A row of the bucket ``keys[p]`` scores
    ``offsets[p]`` plus its lookups (a residual sketch's centre term; else 0). Equal
    scores at the cut go to the earlier rows in table order."""
    visited, n = visit(keys, candidates, start, stop, stored, slot, length, sketched, readable, stats)
    if visited < 0:
        return -1
    lut = sketch_lut(codebook, qy)
    m = lut.shape[0]
    approx = np.empty(n, dtype=np.float32)
    o = 0
    for p in range(visited):
        b = keys[p]
        for r in range(start[b], stop[b]):
            codes = sketch[slot[r]]
            for row in range(first[r], first[r] + length[r]):
                acc = offsets[p]
                for s in range(m):
                    acc += lut[s, codes[row, s]]
                approx[o] = acc
                o += 1
    thr = -np.inf
    if n > rerank:
        thr = np.partition(approx, n - rerank)[n - rerank]
    above = 0  # rows strictly above the cut all go; rows at it fill what is left
    for o in range(n):
        if approx[o] > thr:
            above += 1
    ties = rerank - above
    o, got = 0, 0
    for p in range(visited):
        b = keys[p]
        for r in range(start[b], stop[b]):
            for row in range(first[r], first[r] + length[r]):
                take = approx[o] > thr
                if not take and approx[o] == thr and ties > 0:
                    take = True
                    ties -= 1
                if take:
                    cand_slot[got], cand_row[got] = slot[r], row
                    got += 1
                o += 1
    return got


@numba.njit(cache=True, nogil=True)
def rescore(cand_slot, cand_row, ids, vecs, q, out_i, out_s):
    """Exact scores of the candidate rows into the top k ``out_i``/``out_s``."""
    out_i[:] = -1
    out_s[:] = -np.inf
    v32 = np.empty(q.shape[0], dtype=np.float32)
    for t in range(cand_slot.shape[0]):
        c, row = cand_slot[t], cand_row[t]
        insert(out_i, out_s, _row_dot(vecs[c], row, q, v32), ids[c][row])


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
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
def bucket_bounds(keys, start, stop, slot, first, length, codes, aux, qh, qsum, w, width0):
    """LRSQ lower and upper bounds of every row of the buckets ``keys``, in table order."""
    n, longest = 0, 0
    for b in keys:
        for r in range(start[b], stop[b]):
            n += length[r]
            longest = max(longest, length[r])
    lo = np.empty(n, dtype=np.float32)
    hi = np.empty(n, dtype=np.float32)
    scratch = np.empty((longest, w.shape[0]), dtype=np.float32)
    o = 0
    for b in keys:
        for r in range(start[b], stop[b]):
            c = slot[r]
            bounds(codes[c], aux[c], first[r], length[r], qh, qsum, w, width0, lo, hi, o, scratch)
            o += length[r]
    return lo, hi


@numba.njit(cache=True, nogil=True)
def intervals(keys, start, stop, slot, first, length, ids, codes, aux, qh, qsum, w, width0):
    """:func:`bucket_bounds`, and the rows' ids."""
    lo, hi = bucket_bounds(keys, start, stop, slot, first, length, codes, aux, qh, qsum, w, width0)
    out_i = np.empty(len(lo), dtype=np.int64)
    o = 0
    for b in keys:
        for r in range(start[b], stop[b]):
            out_i[o : o + length[r]] = ids[slot[r]][first[r] : first[r] + length[r]]
            o += length[r]
    return lo, hi, out_i


@numba.njit(cache=True)
def new_list(first):
    """A typed list holding ``first``. Made and appended to in compiled code, whose
    machine code loads from numba's cache: a list appended to from Python compiles its
    methods again in every process (~0.25 s per array type)."""
    out = List()
    out.append(first)
    return out


@numba.njit(cache=True)
def list_append(items, item):
    items.append(item)
