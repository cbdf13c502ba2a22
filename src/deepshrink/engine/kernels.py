"""Numba kernels of the inference engine: sparse matrix times activations, sparse convolution.

Most kernels read a *segmented relative-index stream*, the layout built by
:func:`deepshrink.engine.matrix.segmented_stream`: for each segment (a column of
one worker's rows for the CSC kernel, a row for the CSR and convolution kernels)
a run of 8-bit gaps, each "the number of zeros before this weight", and beside
each gap the weight's codebook index. A gap longer than 255 is bridged as EIE
does, with *padding* entries: gap 255 and the index of a zero value, which the
kernels add like any weight. So the inner loops have no branch, and the codebook
handed to these kernels is *extended*: the real centroids, then one zero (the
padding index). A weight's value is looked up on the fly; the dense matrix is
never built.

The dense-activation batch-1 kernel (:func:`sliced_matvec`) reads the *sliced*
layout of :func:`deepshrink.engine.matrix.sliced_rows` instead: eight rows at a
time, each entry a column and a codebook index packed in one integer.

The kernels are dtype-generic: float32 codebook, activations and accumulators
give the fp32 engine; int16 codebook and activations with int64 accumulators give
the 16-bit fixed-point mode (products are formed in int64, so none overflows).
Loop indices are unsigned or int64 (``intp``), so nothing wraps at 65,536.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

#: Bits of one stored gap: one byte keeps loads simple, and at the EIE layers'
#: densities (4-25 %) the mean gap inside a worker's column is 2-13, so padding is rare.
INDEX_BITS = 8
#: The largest gap one entry holds; a padding entry carries it and a zero value.
MAX_GAP = (1 << INDEX_BITS) - 1


_ONE = np.uint64(1)


@njit(cache=True)
def nonzero_columns(x: np.ndarray) -> np.ndarray:
    """Indices (uint64) of the non-zero entries of the 1-D ``x`` (EIE's leading non-zero detection).

    Examples:
        >>> nonzero_columns(np.array([0.0, 2.0, 0.0, -1.0], dtype=np.float32)).tolist()
        [1, 3]
    """
    found = np.empty(x.shape[0], dtype=np.uint64)
    n = 0
    for j in range(x.shape[0]):
        # branch-free: at the EIE layers' 20-40% density a branch here mispredicts so
        # often that it cost ~10 us per 4,096 activations, more than the small layers' products
        found[n] = j
        n += x[j] != 0
    return found[:n]


@njit(cache=True, nogil=True)
def decode_rows(codes: np.ndarray, values: np.ndarray, ids: np.ndarray, out: np.ndarray) -> None:
    """``out[i] = values[codes[ids[i]]]``: the rows of a coded table that ``ids`` (checked in range) name.

    An embedding lookup from a table of one-byte codes. Torch's two gathers (the codes,
    then the values, through int64 indices) took 4x as long for MiniLM's 32 sentences.

    Examples:
        >>> out = np.empty((2, 2), dtype=np.float32)
        >>> decode_rows(np.array([[0, 1], [2, 0]], dtype=np.uint8), np.array([0.5, -1.0, 2.0], dtype=np.float32),
        ...             np.array([1, 0]), out)
        >>> out.tolist()
        [[2.0, 0.5], [0.5, -1.0]]
    """
    for i in range(ids.shape[0]):
        row, dst = codes[ids[i]], out[i]
        for j in range(row.shape[0]):
            dst[j] = values[row[j]]


@njit(parallel=True, cache=True, nogil=True)
def nhwc_patches(x: np.ndarray, kernel, stride, dilation, pad, out_w: int, out: np.ndarray) -> None:
    """im2col from a channels-last image: row ``(b, oy, ox)`` of ``out`` is that output position's patch.

    ``x`` is ``(batch, H, W, C)``; a patch is ``kh * kw`` runs of ``C`` contiguous channels,
    tap by tap (``(i, j, c)``), zeros where a tap falls in the padding (``pad``: top,
    left), so no padded copy of the image is made. ``out`` is ``(batch * out_h * out_w,
    kh * kw * C)``: ``out_h * out_w`` positions per image, ``out_w`` to a row.

    Examples:
        >>> x = np.arange(1, 5, dtype=np.float32).reshape(1, 2, 2, 1)  # [[1, 2], [3, 4]]
        >>> out = np.empty((4, 4), dtype=np.float32)
        >>> nhwc_patches(x, (2, 2), (1, 1), (1, 1), (1, 1), 2, out)  # 2 x 2 kernel, padding 1 on top and left
        >>> out.tolist()[0], out.tolist()[3]
        ([0.0, 0.0, 0.0, 1.0], [1.0, 2.0, 3.0, 4.0])
    """
    batch, height, width, channels = x.shape
    positions = out.shape[0] // max(batch, 1)  # no rows at all for an empty batch
    for t in prange(out.shape[0]):
        b, at = divmod(np.int64(t), positions)  # int64: prange's unsigned index with a signed one gives floats
        oy, ox = divmod(at, out_w)
        k = 0
        for i in range(kernel[0]):
            y = oy * stride[0] + i * dilation[0] - pad[0]
            for j in range(kernel[1]):
                col = ox * stride[1] + j * dilation[1] - pad[1]
                # loops, not slices: a slice is an array object made per tap, and the first layer's taps hold 3
                if 0 <= y < height and 0 <= col < width:
                    for c in range(channels):
                        out[t, k + c] = x[b, y, col, c]
                else:
                    for c in range(channels):
                        out[t, k + c] = 0
                k += channels


@njit(parallel=True, cache=True, nogil=True)
def depthwise_nhwc(
    x: np.ndarray, taps: np.ndarray, kernel, stride, dilation, pad, bias: np.ndarray, out: np.ndarray
) -> None:
    """A depthwise convolution (one filter per channel) on a channels-last image, vectorised over the channels.

    ``x`` is ``(batch, H, W, C)``, ``taps`` ``(kh * kw, C)`` (tap ``(i, j)`` of every
    channel's filter in row ``i * kw + j``, zeros where pruned), ``out`` ``(batch, out_h,
    out_w, C)``; taps in the padding (``pad``: top, left) are skipped.

    Examples:
        >>> x = np.arange(1, 5, dtype=np.float32).reshape(1, 2, 2, 1)  # [[1, 2], [3, 4]]
        >>> out = np.empty((1, 1, 1, 1), dtype=np.float32)
        >>> depthwise_nhwc(x, np.full((4, 1), 0.5, np.float32), (2, 2), (1, 1), (1, 1), (0, 0), np.zeros(1, np.float32), out)
        >>> float(out[0, 0, 0, 0])
        5.0
    """
    batch, height, width, channels = x.shape
    out_h, out_w = out.shape[1], out.shape[2]
    for row in prange(batch * out_h):
        b, oy = divmod(np.int64(row), out_h)  # int64: prange's unsigned index with a signed one gives floats
        for ox in range(out_w):
            acc = out[b, oy, ox]
            acc[:] = bias
            for i in range(kernel[0]):
                y = oy * stride[0] + i * dilation[0] - pad[0]
                if y < 0 or y >= height:
                    continue
                for j in range(kernel[1]):
                    col = ox * stride[1] + j * dilation[1] - pad[1]
                    if col < 0 or col >= width:
                        continue
                    tap, src = taps[i * kernel[1] + j], x[b, y, col]
                    for c in range(channels):
                        acc[c] += tap[c] * src[c]


@intrinsic
def _prefetch(typingctx, array, index):
    """Ask the CPU to fetch the cache line of ``array[index]`` (LLVM's prefetch: read, keep).

    Hand-written because numba exposes no prefetch: EIE's kernel jumps from one
    active column's segment to the next, a cache miss the hardware prefetcher
    cannot foresee; fetching a few columns ahead measured 5-10 % faster on the EIE
    layers whose weights stream from L3 (benchmarks/bench_engine.py).
    """

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        view = context.make_array(array_type)(context, builder, args[0])
        pointer = cgutils.get_item_pointer(context, builder, array_type, view, [args[1]], wraparound=False)
        byte_pointer = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        hint = ir.FunctionType(ir.VoidType(), [byte_pointer, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, hint, "llvm.prefetch.p0i8")
        # read (0), highest temporal locality (3), data cache (1)
        builder.call(fn, [builder.bitcast(pointer, byte_pointer), ir.Constant(i32, 0), ir.Constant(i32, 3),
                          ir.Constant(i32, 1)])  # fmt: skip
        return context.get_dummy_value()

    return types.void(array, index), codegen


#: How many active columns ahead :func:`csc_worker` prefetches.
PREFETCH_COLUMNS = np.uint64(4)


# Loop indices below are uint64 on purpose: numba adds a negative-index
# wrap-around check to every access through a signed index, and mixing uint64
# with a signed integer would promote to float64, hence the typed constants.


@njit(cache=True, fastmath=True)
def csc_worker(ptr, gaps, codes, codebook, x, active, acc, products) -> None:
    """One worker's share of :func:`csc_matvec`: ``acc[i] += W_w[i, j] * x[j]`` over the ``active`` columns.

    ``ptr`` is the worker's ``(cols + 1,)`` column pointers. Per column the
    codebook is multiplied by ``x[j]`` once (``products``, as long as
    ``codebook``), so each weight costs a table lookup and one add, as in EIE's
    arithmetic unit.
    """
    n_active = np.uint64(active.shape[0])
    for t in range(n_active):
        j = active[t]
        if t + PREFETCH_COLUMNS < n_active:  # the start of a segment a few columns on
            start = ptr[active[t + PREFETCH_COLUMNS]]
            _prefetch(gaps, start)
            _prefetch(codes, start)
        for c in range(codebook.shape[0]):
            products[c] = codebook[c] * x[j]
        row = np.uint64(0)  # the next row a gap of 0 would land on
        for k in range(ptr[j], ptr[j + _ONE]):
            row += np.uint64(gaps[k])
            acc[row] += products[codes[k]]
            row += _ONE


@njit(cache=True, fastmath=True)
def _interleaved_output(acc, scale, bias, out) -> None:
    """``out[w + workers * i] = acc[w, i] * scale + bias[...]``: undo the row interleaving."""
    workers, rows = np.uint64(acc.shape[0]), np.uint64(out.shape[0])
    for w in range(workers):  # no division per row: that would cost more than a small layer's product
        r, i = w, np.uint64(0)
        while r < rows:  # acc's rows may be longer (padded): their tails are not outputs
            out[r] = np.float32(acc[w, i] * scale) + bias[r]
            r += workers
            i += _ONE


@njit(parallel=True, cache=True, fastmath=True)
def csc_matvec(col_ptr, gaps, codes, codebook, x, scale, bias, acc, out) -> None:
    """EIE's batch-1 kernel: ``out = scale * (W @ x) + bias``, rows interleaved over workers.

    Args:
        col_ptr: ``(workers, cols + 1)`` uint64 offsets into ``gaps`` / ``codes``.
        gaps: ``(n_entries,)`` uint8 relative local-row indices.
        codes: ``(n_entries,)`` uint8 / uint16 indices into ``codebook``.
        codebook: ``(k + 1,)`` extended codebook (float32, or int16 in fixed point).
        x: ``(cols,)`` activations in the codebook's dtype.
        scale: factor from accumulator units to output units (1.0 in fp32).
        bias: ``(rows,)`` float32 added to the output.
        acc: ``(workers, >= local_rows)`` zeroed accumulators (float32 or int64).
        out: ``(rows,)`` float32 result.

    Worker ``w`` owns rows ``w, w + workers, ...`` (row ``i`` to worker
    ``i mod workers``) and writes only its row of ``acc``, so no two threads
    write one output. Columns whose activation is zero are never visited.
    """
    active = nonzero_columns(x)
    # one row of products per worker, rows a cache line apart: the workers rewrite them at
    # every column, and two small arrays allocated apart may share a line (false sharing)
    products = np.empty((col_ptr.shape[0], (codebook.shape[0] + 31) // 16 * 16), dtype=acc.dtype)
    for w in prange(col_ptr.shape[0]):
        csc_worker(col_ptr[w], gaps, codes, codebook, x, active, acc[w], products[w])
    _interleaved_output(acc, scale, bias, out)


@njit(cache=True, fastmath=True)
def csc_matvec_serial(col_ptr, gaps, codes, codebook, x, scale, bias, acc, out) -> None:
    """:func:`csc_matvec` on the calling thread, for layers too small to repay a parallel launch."""
    active = nonzero_columns(x)
    products = np.empty(codebook.shape[0], dtype=acc.dtype)
    for w in range(col_ptr.shape[0]):
        csc_worker(col_ptr[w], gaps, codes, codebook, x, active, acc[w], products)
    _interleaved_output(acc, scale, bias, out)


#: Rows per slice of the sliced layout (:func:`sliced_matvec`): one register sum per row.
SLICE_ROWS = 8
_EIGHT = np.uint64(SLICE_ROWS)
#: fastmath without reassociation for the sliced kernels: with it, LLVM vectorises each
#: lane's sum along its row, assembling vectors from scalar loads (vinsertps), which
#: measured 10-20 % slower on this kernel than the eight plain scalar sums.
_NO_REASSOC = {"nnan", "ninf", "nsz", "arcp", "contract", "afn"}


@njit(cache=True, fastmath=True)
def fill_slice_values(codebook, x, col_bits, use_table, values) -> None:
    """Fill ``values``, what a packed entry ``p = code << col_bits | col`` of the sliced layout indexes.

    With ``use_table``, the product table ``values[p] = codebook[code] * x[col]``:
    each weight then costs one lookup and one add. Otherwise ``x`` itself
    (``values[col] = x[col]``) and the kernel multiplies by the codebook per
    weight: the table's choice when it would not fit the cache. Either way the
    column ``len(x)`` reads 0: padding entries point there.
    """
    n = np.uint64(x.shape[0])
    if use_table:  # code by code, so the inner loop runs over x and vectorises
        for c in range(np.uint64(codebook.shape[0])):
            base = c << np.uint64(col_bits)
            value = codebook[c]
            for j in range(n):
                values[base + j] = value * x[j]
            values[base + n] = 0
    else:
        for j in range(n):
            values[j] = x[j]
        values[n] = 0


@njit(cache=True)
def slice_values(codebook, x, col_bits, use_table, zero):
    """A new array for :func:`fill_slice_values`, in the accumulator's dtype (``zero``'s), filled."""
    size = (np.uint64(codebook.shape[0]) << np.uint64(col_bits)) if use_table else np.uint64(x.shape[0] + 1)
    values = np.empty(size, dtype=zero.dtype)
    fill_slice_values(codebook, x, col_bits, use_table, values)
    return values


@njit(inline="always", fastmath=True)
def _slice_value(p, values, codebook, col_bits, col_mask, use_table):
    if use_table:  # loop-invariant: LLVM unswitches the loop, so each variant is branch-free
        return values[p]
    return codebook[p >> col_bits] * values[p & col_mask]


@njit(inline="always", fastmath=_NO_REASSOC)
def _slice_accumulate(ptr, packed, values, codebook, col_bits, use_table, slice_rows, s, acc) -> None:
    """Add slice ``s``'s eight row sums to ``acc`` (entry ``k`` of its lane-``l`` row is ``packed[ptr[s] + 8 k + l]``)."""
    bits = np.uint64(col_bits)
    mask = (_ONE << bits) - _ONE
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = values.dtype.type(0)  # the accumulator's dtype
    for b in range(ptr[s], ptr[s + _ONE], _EIGHT):
        a0 += _slice_value(packed[b], values, codebook, bits, mask, use_table)
        a1 += _slice_value(packed[b + np.uint64(1)], values, codebook, bits, mask, use_table)
        a2 += _slice_value(packed[b + np.uint64(2)], values, codebook, bits, mask, use_table)
        a3 += _slice_value(packed[b + np.uint64(3)], values, codebook, bits, mask, use_table)
        a4 += _slice_value(packed[b + np.uint64(4)], values, codebook, bits, mask, use_table)
        a5 += _slice_value(packed[b + np.uint64(5)], values, codebook, bits, mask, use_table)
        a6 += _slice_value(packed[b + np.uint64(6)], values, codebook, bits, mask, use_table)
        a7 += _slice_value(packed[b + np.uint64(7)], values, codebook, bits, mask, use_table)
    lanes = s * _EIGHT  # spelled out, not a loop over a tuple: this runs once per eight rows
    acc[slice_rows[lanes]] += a0
    acc[slice_rows[lanes + np.uint64(1)]] += a1
    acc[slice_rows[lanes + np.uint64(2)]] += a2
    acc[slice_rows[lanes + np.uint64(3)]] += a3
    acc[slice_rows[lanes + np.uint64(4)]] += a4
    acc[slice_rows[lanes + np.uint64(5)]] += a5
    acc[slice_rows[lanes + np.uint64(6)]] += a6
    acc[slice_rows[lanes + np.uint64(7)]] += a7


@njit(cache=True, fastmath=_NO_REASSOC)
def sliced_worker(ptr, packed, slice_rows, col_bits, codebook, values, use_table, first, step, acc) -> None:
    """Slices ``first, first + step, ...`` of :func:`sliced_matvec`: ``acc[slice_rows[8 s + l]] += row sum``.

    ``acc`` has a place for every lane (``len(slice_rows)``), the padding lanes'
    included, so there is no branch per row.
    """
    for s in range(np.uint64(first), np.uint64(ptr.shape[0] - 1), np.uint64(step)):
        _slice_accumulate(ptr, packed, values, codebook, col_bits, use_table, slice_rows, s, acc)


@njit(cache=True, fastmath=True)
def _finish_rows(acc, scale, bias, out) -> None:
    """``out = acc[:rows] * scale + bias``, in float32."""
    for i in range(np.uint64(out.shape[0])):
        out[i] = np.float32(acc[i] * scale) + bias[i]


@njit(parallel=True, cache=True, fastmath=_NO_REASSOC)
def sliced_matvec(ptr, packed, slice_rows, col_bits, codebook, x, use_table, scale, bias, zero, out,
                  workers) -> None:  # fmt: skip
    """Batch-1 kernel for dense activations: ``out = scale * (W @ x) + bias``, eight rows at a time.

    Args:
        ptr: ``(slices + 1,)`` uint64 offsets of each slice's entries in ``packed``.
        packed: uint16 / uint32 entries ``code << col_bits | col``, column and codebook
            index in one load; slice ``s`` holds its eight rows interleaved (entry ``k``
            of lane ``l`` at ``ptr[s] + 8 k + l``), shorter rows padded with column
            ``len(x)``, which reads 0.
        slice_rows: ``(8 slices,)`` uint64 row of each lane, a permutation: the rows,
            then scratch places for the last slice's padding lanes.
        col_bits: bits of the column field.
        codebook: ``(k,)`` centroids (float32, or int16 in fixed point), not extended.
        x: ``(cols,)`` activations in the codebook's dtype.
        use_table: index a product table (see :func:`fill_slice_values`) instead of ``x``.
        scale, bias: as in :func:`csc_matvec`.
        zero: ``(1,)`` zero in the accumulator's dtype (float32, or int64 in fixed point).
        out: ``(rows,)`` float32 result.
        workers: how many threads share the slices.

    Each lane sums its row in a register, and a slice's rows run in step, so a
    row's end costs no branch of its own (rows are sorted by length, so lanes
    waste little on padding). It visits every weight, zero activation or not: the
    caller picks it when few activations are zero
    (:meth:`~deepshrink.engine.matrix.SparseMatrix.prefers_rows`). Slices go to
    threads round robin (they are sorted longest first), so no two threads write
    one output.
    """
    values = slice_values(codebook, x, col_bits, use_table, zero)
    acc = np.zeros(slice_rows.shape[0], dtype=zero.dtype)
    workers = np.uint64(workers)
    for w in prange(workers):
        sliced_worker(ptr, packed, slice_rows, col_bits, codebook, values, use_table, w, workers, acc)
    _finish_rows(acc, scale, bias, out)


@njit(cache=True, fastmath=_NO_REASSOC)
def sliced_matvec_serial(ptr, packed, slice_rows, col_bits, codebook, x, use_table, scale, bias, zero, out,
                         workers=1) -> None:  # fmt: skip
    """:func:`sliced_matvec` on the calling thread (``workers`` is ignored)."""
    values = slice_values(codebook, x, col_bits, use_table, zero)
    acc = np.zeros(slice_rows.shape[0], dtype=zero.dtype)
    sliced_worker(ptr, packed, slice_rows, col_bits, codebook, values, use_table, 0, 1, acc)
    _finish_rows(acc, scale, bias, out)


@njit(cache=True, fastmath=True)
def _csr_rows(row_ptr, gaps, codes, codebook, xt, out, first, stop) -> None:
    """Rows ``first .. stop - 1`` of :func:`csr_matmul`.

    Four weights of a row go through the batch together, so the output row is
    loaded and stored once per four weights instead of once per weight (about
    1.2-1.5x faster on the EIE layers at batch 16).
    """
    batch = np.uint64(xt.shape[1])
    two, three, four = np.uint64(2), np.uint64(3), np.uint64(4)
    for i in range(np.uint64(first), np.uint64(stop)):
        col = np.uint64(0)  # the next column a gap of 0 would land on
        k, end = row_ptr[i], row_ptr[i + _ONE]
        while k + four <= end:
            c0 = col + np.uint64(gaps[k])
            c1 = c0 + _ONE + np.uint64(gaps[k + _ONE])
            c2 = c1 + _ONE + np.uint64(gaps[k + two])
            c3 = c2 + _ONE + np.uint64(gaps[k + three])
            v0, v1 = codebook[codes[k]], codebook[codes[k + _ONE]]
            v2, v3 = codebook[codes[k + two]], codebook[codes[k + three]]
            for b in range(batch):  # unsigned: no wrap-around checks, so this loop vectorises
                out[i, b] += v0 * xt[c0, b] + v1 * xt[c1, b] + v2 * xt[c2, b] + v3 * xt[c3, b]
            col = c3 + _ONE
            k += four
        for k in range(k, end):  # noqa: B020 (the tail after the blocks of four)
            col += np.uint64(gaps[k])
            value = codebook[codes[k]]
            for b in range(batch):
                out[i, b] += value * xt[col, b]
            col += _ONE


@njit(parallel=True, cache=True, fastmath=True)
def csr_matmul(row_ptr, gaps, codes, codebook, xt, out) -> None:
    """Row-parallel kernel for batches: ``out[i, :] += W[i, j] * xt[j, :]``.

    Args:
        row_ptr: ``(rows + 1,)`` uint64 offsets into ``gaps`` / ``codes``.
        gaps, codes, codebook: as in :func:`csc_matvec`, one segment per row.
        xt: ``(cols, batch)`` activations, batch contiguous.
        out: ``(rows, batch)`` zeroed accumulators.

    Each weight is decoded once and applied to the whole batch with a
    contiguous (vectorised) inner loop; rows are split over threads, so no two
    threads write one output.
    """
    for i in prange(row_ptr.shape[0] - 1):
        _csr_rows(row_ptr, gaps, codes, codebook, xt, out, i, i + 1)


@njit(cache=True, fastmath=True)
def csr_matmul_serial(row_ptr, gaps, codes, codebook, xt, out) -> None:
    """:func:`csr_matmul` on the calling thread, for small products."""
    _csr_rows(row_ptr, gaps, codes, codebook, xt, out, 0, row_ptr.shape[0] - 1)


@njit(cache=True, fastmath=True)
def _conv_channel(row_ptr, gaps, codes, codebook, x, out, o, kernel, stride, dilation, groups) -> None:
    """Output channel ``o`` of :func:`conv2d`: each weight of filter ``o`` over every image and position."""
    o = np.uint64(o)
    # filter o sees its group's input channels only: its matrix row numbers them from 0
    group_size = np.uint64(x.shape[1] // groups)
    first_channel = o // np.uint64((row_ptr.shape[0] - 1) // groups) * group_size
    kernel_w = np.uint64(kernel[1])
    area = np.uint64(kernel[0]) * kernel_w  # weights per input channel
    sh, sw = np.uint64(stride[0]), np.uint64(stride[1])
    dh, dw = np.uint64(dilation[0]), np.uint64(dilation[1])
    batch, width = np.uint64(x.shape[0]), np.uint64(x.shape[3])
    out_h, out_w = np.uint64(out.shape[2]), np.uint64(out.shape[3])
    # At stride 1 with out as wide as x, output (oy, ox) reads input (oy + ky dh, ox + kx dw):
    # one constant shift of the flattened planes, so each weight is one long vectorised loop.
    flat = sh == _ONE and sw == _ONE and out_w == width
    x_planes = x.reshape((x.shape[0], x.shape[1], x.shape[2] * x.shape[3]))
    out_planes = out.reshape((out.shape[0], out.shape[1], out.shape[2] * out.shape[3]))
    span = out_h * width - (kernel_w - _ONE) * dw  # flat positions up to the last valid output
    col = np.uint64(0)  # (channel, ky, kx) flattened, as in the weight's matrix view
    for k in range(row_ptr[o], row_ptr[o + _ONE]):
        col += np.uint64(gaps[k])
        value = codebook[codes[k]]
        if value != 0:  # padding entries (and zero centroids) would cost a whole plane each
            c, tap = first_channel + col // area, col % area
            ky, kx = tap // kernel_w, tap % kernel_w
            if flat:
                shift = ky * dh * width + kx * dw
                for b in range(batch):
                    for i in range(span):
                        out_planes[b, o, i] += value * x_planes[b, c, i + shift]
            else:
                for b in range(batch):
                    for oy in range(out_h):
                        iy = oy * sh + ky * dh
                        for ox in range(out_w):
                            out[b, o, oy, ox] += value * x[b, c, iy, kx * dw + ox * sw]
        col += _ONE


@njit(cache=True, fastmath=True)
def _conv_output(acc, scale, bias, out) -> None:
    """``out[b, o] = acc[b, o, :, :out_w] * scale[b] + bias[o]``: drop the scratch columns, finish."""
    for b in range(out.shape[0]):
        for o in range(out.shape[1]):
            for oy in range(out.shape[2]):
                for ox in range(out.shape[3]):
                    out[b, o, oy, ox] = np.float32(acc[b, o, oy, ox] * scale[b]) + bias[o]


@njit(parallel=True, cache=True, fastmath=True)
def conv2d(row_ptr, gaps, codes, codebook, x, acc, kernel, stride, dilation, groups, scale, bias, out) -> None:
    """Direct sparse convolution: ``out[b, o] = scale[b] * sum W[o, c, ky, kx] x[b, c, shifted] + bias[o]``.

    Args:
        row_ptr, gaps, codes, codebook: the ``(out_channels, in_channels / groups * kh * kw)``
            matrix view, one segment per output channel (as for :func:`csr_matmul`).
        x: ``(batch, in_channels, H, W)`` input, already zero-padded, C-contiguous.
        acc: ``(batch, out_channels, out_h, out_w)`` zeroed accumulators, C-contiguous.
            At stride 1 it may be ``W`` wide instead of ``out_w``: the fast layout,
            whose columns from ``out_w`` on are scratch.
        kernel, stride, dilation: ``(h, w)`` pairs, as in ``nn.Conv2d``.
        groups: as in ``nn.Conv2d``: output channel ``o`` sees input group
            ``o // (out_channels / groups)``.
        scale: ``(batch,)`` accumulator units to output units (ones in fp32).
        bias: ``(out_channels,)`` float32.
        out: ``(batch, out_channels, out_h, out_w)`` float32 result.

    Each kept weight is decoded once and multiplies a whole shifted input plane,
    so there is no im2col copy; output channels are split over threads.
    """
    for o in prange(row_ptr.shape[0] - 1):
        _conv_channel(row_ptr, gaps, codes, codebook, x, acc, o, kernel, stride, dilation, groups)
    _conv_output(acc, scale, bias, out)


@njit(cache=True, fastmath=True)
def conv2d_serial(row_ptr, gaps, codes, codebook, x, acc, kernel, stride, dilation, groups, scale, bias, out) -> None:
    """:func:`conv2d` on the calling thread, for small convolutions."""
    for o in range(row_ptr.shape[0] - 1):
        _conv_channel(row_ptr, gaps, codes, codebook, x, acc, o, kernel, stride, dilation, groups)
    _conv_output(acc, scale, bias, out)
