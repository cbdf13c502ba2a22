"""The engine-side form of one compressed weight matrix, and its products.

:class:`SparseMatrix` lays a :class:`~deepshrink.tensor.CompressedTensor` out
for the kernels and picks one per call by a cost model (:meth:`SparseMatrix.kernel_for`).
Where the SIMD extension (:mod:`deepshrink.engine._simd`, built by ``pip install``)
is there, fp32 products run on it:

- ``panels``: one-byte codes in 16-row panels, decoded 16 at a time by a register
  permute, every column (dense layout) or only the non-zero 16 x 1 blocks (block
  layout); each decoded vector serves a block of up to 24 tokens held in registers.
  The path for dense and lightly pruned matrices (transformers) and block sparsity;
- ``tiled`` (batch 1, unstructured sparsity): SELL-16 in tiles of 31 columns whose
  activations sit in registers;
- ``rows`` (batches, unstructured sparsity): 4-row groups in 128-column chunks, the
  tokens in the SIMD lanes;

- ``int8`` (``arithmetic="int8"``, every batch): each token quantized to int8 on its
  own, the codebook as int8 with one scale (far centroids apart, in float32), 64
  multiply-adds per VNNI instruction into exact int32 sums: dense int8 speed, the fidelity
  of per-token scales. The cost model weighs it against the float32 kernels below, which
  keep the products they run faster (very sparse layers at small batches);
- ``int8-blocks`` and ``int8-rows`` (``arithmetic="int8"``, sparse matrices): the same
  arithmetic on the kept 16 x 1 blocks only, or, row by row, on the groups of four
  columns holding a kept weight; 16 tokens in the SIMD lanes, so a batch costs the kept
  blocks' (or groups') share of dense int8: 1.6-14x ONNX Runtime's int8 on block-sparse
  EIE layers at batch 16, 1.5-2.7x on unstructured ones at 4-9% density;

and, from the numba kernels (:mod:`deepshrink.engine.kernels`, which also run
everything when the extension is missing and in fixed point):

- ``csc`` (batch 1, EIE's kernel): interleaved CSC, row ``i`` to worker ``i mod
  workers``, 8-bit relative row indices, zero activations skipped: the cheapest
  where activations are very sparse;
- ``sliced`` (batch 1, dense activations, no SIMD extension): SELL-8;
- ``csr`` (batches, no SIMD extension): rows split over threads, each decoded
  weight applied to the whole batch;
- ``samples``: a batch as that many batch-1 products, where that costs less
  (small batches, sparse activations);
- convolutions: the row-major layout, each weight applied to a shifted input
  plane (direct sparse convolution, no im2col).

The stored form stays codes plus codebook: values are looked up on the fly, and
each layout is built the first time a product needs it. This is the API a sparse
LSTM or any other layer calls for its products.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numba
import numpy as np

from deepshrink.arithmetic import MAX_INT8_COLUMNS
from deepshrink.engine import kernels, layouts
from deepshrink.engine.fixedpoint import from_fixed, to_fixed
from deepshrink.errors import DeepShrinkError
from deepshrink.tensor import CompressedTensor

try:
    from deepshrink.engine import _simd
except ImportError:  # not built (no C compiler at install time): the numba kernels run every product
    _simd = None

#: Costs of the batch-1 kernels, in the time EIE's CSC kernel spends on one weight. Its
#: per-segment cost: starting a segment (a column of one worker) costs about as much as
#: this many weights inside one (loop set-up, the mispredicted exit).
SEGMENT_COST = 16
#: A weight in the sliced row kernel with a product table (one load and one add, sums in
#: registers) and without one (a codebook lookup and a multiply more). Measured on the
#: EIE layers with every activation non-zero (benchmarks/bench_engine.py).
TABLE_WEIGHT_COST = 0.55
GATHER_WEIGHT_COST = 0.7
#: Largest product table the sliced kernel builds (bytes): beyond the core's fast
#: caches, a lookup in it costs more than multiplying by the codebook per weight.
TABLE_MAX_BYTES = 24 * 1024
#: Cost of the row (CSR) batch kernel per weight, in the same unit: a fixed part and a part
#: per sample. Its set-up per group of four weights dominates up to ~32 samples, so a
#: batch of 4 costs about 3.7 CSC weights per weight. Least-squares fit over the nine EIE
#: layers at batches 4-32 (benchmarks/bench_engine.py's layers, 2 threads, Zen 4).
ROW_WEIGHT_COST = 3.4
ROW_SAMPLE_COST = 0.075
#: A batch-1 product's cost outside its kernel (the Python call, ~2.6 us), in the same unit.
CALL_COST = 5000
#: Fewest multiply-accumulates worth a parallel launch. A launch costs ~4 us with
#: numba's omp layer (~100 us with workqueue) on an idle 2-core machine and more on a
#: busy one, while these kernels do about 1 ns per weight: LeNet-sized layers run on
#: the calling thread.
PARALLEL_MIN_MACS = 50_000
#: Costs of the SIMD kernels (deepshrink.engine._simd) in the same unit, one thread, Zen 4
#: (measured on the EIE layers and MiniLM's shapes, benchmarks/bench_peers.py): an entry
#: of the tiled layout (padding included); a 16-row panel times one active column at
#: batch 1 (dense layout; a block layout's block costs more: its column is read from
#: the block, its activation fetched at random); a panel's column times one token in a
#: batch, on the dense layout and on the block layout (the block's tokens gathered from
#: scattered columns: ~2.4x, measured on the nine EIE layers at batch 16); an entry of the
#: row-group layout times one pass of up to 16 tokens (32 cost twice that).
TILED_ENTRY_COST = 0.13
PANEL_COLUMN_COST = 1.1
BLOCK_COST = 1.3
PANEL_TOKEN_COST = 0.55
BLOCK_TOKEN_COST = 1.3
ROWS_ENTRY_COST = 1.3
#: Least cost of a product run on several threads (the cost unit is ~0.75 ns: this is ~30 us): below, handing
#: work to a helper thread costs more than it saves, the more so when the other cores are busy with other jobs.
PARALLEL_MIN_COST = 40_000
#: The dense panel layout stores a byte per weight: beyond this many per kept weight it
#: streams more memory than the sparse layouts save in work.
DENSE_PANEL_MAX_BYTES_PER_WEIGHT = 8


#: Costs of the int8 kernel in the same unit, one thread, Zen 4 (fitted on the nine EIE layers at
#: batches 1-64, 2026-12-04): streaming a weight's one-byte code from the last-level cache, and from
#: memory (past :data:`INT8_CACHE_BYTES`, half the last-level cache of a CCD that other jobs share: Alex-6,
#: Alex-7, VGG-6, VGG-7 at 16-100 MiB), and one multiply-add (~185 G a second a core).
INT8_WEIGHT_COST = 0.015
INT8_MEMORY_WEIGHT_COST = 0.05
INT8_CACHE_BYTES = 8 << 20
#: Every int8 kernel's outputs: a row's (its outliers looked up), and a row's per token (scaled, biased, stored);
#: fitted as the difference between the EIE layers of 1,000 and of 8,791 rows at batches 1 and 16.
INT8_OUTPUT_ROW_COST = 5.0
INT8_OUTPUT_COST = 0.9
#: The block layout's int8 kernel (``"int8-blocks"``): a group of four 16 x 1 blocks times a block of up to 16 tokens.
INT8_BLOCK_GROUP_COST = 12.0
#: The row layout's (``"int8-rows"``), per block of up to 16 tokens: a row's group of four columns holding
#: a kept weight (6 bytes: streamed from the cache, or from memory past :data:`INT8_CACHE_BYTES`), and a
#: row's pass over a chunk of columns (its sums loaded and stored, its loop set up); fitted on the nine EIE
#: layers at batches 16 and 64, within 20%. Beyond ``INT8_ROWS_MAX_DENSITY`` the row layout is not offered
#: (dense int8 costs less).
INT8_ROW_GROUP_COST = 0.8
INT8_ROW_MEMORY_GROUP_COST = 1.2
INT8_ROW_PASS_COST = 15.0
INT8_ROWS_MAX_DENSITY = 0.5
INT8_MAC_COST = 0.0075
#: The arithmetics a matrix computes in: float32 (exact to rounding), EIE's 16-bit fixed point
#: (numba), and int8 per token on VNNI.
ARITHMETICS = ("float32", "fixed16", "int8")


def check_arithmetic(arithmetic: str) -> None:
    """Raise a DeepShrinkError naming the choices unless ``arithmetic`` is one of :data:`ARITHMETICS`."""
    if arithmetic not in ARITHMETICS:
        raise DeepShrinkError(f"arithmetic={arithmetic!r} is not one of {', '.join(ARITHMETICS)}")


#: Accumulators per 64-byte cache line (float32; int64 ones take two lines, as safe).
_LINE = 16


def _array_bytes(obj: object) -> int:
    """Bytes of the NumPy arrays in ``obj``: an array, a tuple of them, or a dataclass holding them."""
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, tuple):
        return sum(_array_bytes(o) for o in obj)
    if dataclasses.is_dataclass(obj):
        return sum(_array_bytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    return 0


def _parallel(macs: float) -> bool:
    """Whether a product of ``macs`` multiply-accumulates should launch numba's threads.

    With one thread a launch only hands the work to a pool thread, which on a busy
    machine waits for a core: the calling thread does it instead.
    """
    return macs >= PARALLEL_MIN_MACS and numba.get_num_threads() > 1


def segmented_stream(
    segment: np.ndarray, offset: np.ndarray, codes: np.ndarray, n_segments: int, pad_code: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Relative-index stream with one run per segment, each run's indices restarting at 0.

    Each entry's gap is the number of zeros before it in its segment. A gap over
    :data:`~deepshrink.engine.kernels.MAX_GAP` is bridged, as in EIE, by padding
    entries of gap ``MAX_GAP`` and code ``pad_code`` (a zero value): each stands
    for ``MAX_GAP`` zeros and one zero weight.

    Args:
        segment: ``(nnz,)`` segment of each entry (column of a worker, or row).
        offset: ``(nnz,)`` position inside the segment (local row, or column).
        codes: ``(nnz,)`` codebook index of each entry.
        n_segments: the number of segments (empty ones included).
        pad_code: the codebook index of the zero value.

    Entries must be sorted by ``(segment, offset)``.

    Returns:
        ``ptr`` ``(n_segments + 1,)`` uint64 (segment ``s`` is ``ptr[s]:ptr[s + 1]``),
        ``gaps`` uint8 and ``codes`` aligned with them (uint8, or uint16 when
        ``pad_code`` needs it).

    Examples:
        >>> ptr, gaps, c = segmented_stream(np.array([0, 0, 2]), np.array([1, 300, 0]),
        ...                                 np.array([5, 6, 7]), 3, pad_code=16)
        >>> ptr.tolist(), gaps.tolist(), c.tolist()
        ([0, 3, 3, 4], [1, 255, 42, 0], [5, 16, 6, 7])
    """
    segment = np.asarray(segment, dtype=np.int64)
    offset = np.asarray(offset, dtype=np.int64)
    first = np.ones(len(segment), dtype=bool)
    first[1:] = segment[1:] != segment[:-1]
    previous = np.where(first, -1, np.roll(offset, 1))  # offset of the entry before, -1 at a segment start
    zeros = offset - previous - 1
    pads = zeros // (kernels.MAX_GAP + 1)  # each padding entry covers MAX_GAP zeros and its own zero weight
    slot = np.arange(len(segment)) + np.cumsum(pads)  # where each real entry lands; its pads just before it
    n = int(slot[-1]) + 1 if len(slot) else 0
    gaps = np.full(n, kernels.MAX_GAP, dtype=np.uint8)
    gaps[slot] = zeros % (kernels.MAX_GAP + 1)
    aligned = np.full(n, pad_code, dtype=np.uint8 if pad_code <= np.iinfo(np.uint8).max else np.uint16)
    aligned[slot] = codes
    ptr = np.zeros(n_segments + 1, dtype=np.uint64)
    per_segment = np.bincount(segment, weights=pads + 1, minlength=n_segments).astype(np.uint64)
    np.cumsum(per_segment, out=ptr[1:])
    return ptr, gaps, aligned


def sliced_rows(
    rows: np.ndarray, cols: np.ndarray, codes: np.ndarray, shape: tuple[int, int], n_codes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The sliced layout of :func:`~deepshrink.engine.kernels.sliced_matvec` (SELL-8 with rows sorted by length).

    Rows are ordered longest first and cut into slices of
    :data:`~deepshrink.engine.kernels.SLICE_ROWS`; a slice stores its rows' entries
    interleaved, each row padded to the slice's longest with column ``shape[1]``
    (the zero the kernels append). An entry is ``code << col_bits | col`` in one
    uint16 when that fits, else uint32: one load per weight, absolute columns (so
    no add chain between entries), codebook indices as stored.

    Args:
        rows, cols, codes: ``(nnz,)`` coordinates and codebook index of each weight,
            in row-major order.
        shape: ``(rows, cols)`` of the matrix.
        n_codes: the codebook's size.

    Returns:
        ``ptr`` ``(slices + 1,)`` uint64 entry offsets, ``packed`` entries,
        ``slice_rows`` ``(8 slices,)`` uint64 row of each lane (the last slice's
        padding lanes get ``shape[0]`` and up, so it is a permutation), and ``col_bits``.

    Examples:
        >>> ptr, packed, slice_rows, col_bits = sliced_rows(
        ...     np.array([0, 0, 2]), np.array([1, 2, 0]), np.array([3, 1, 2]), (3, 3), n_codes=4)
        >>> ptr.tolist(), col_bits, slice_rows.tolist()
        ([0, 16], 2, [0, 2, 1, 3, 4, 5, 6, 7])
        >>> packed.reshape(2, 8)[:, :3].tolist()  # row 0: (col 1, code 3), (col 2, code 1); row 2: (col 0, code 2)
        [[13, 8, 3], [6, 3, 3]]
    """
    n_rows, n_cols = shape
    lanes = kernels.SLICE_ROWS
    col_bits = max(int(n_cols).bit_length(), 1)  # column n_cols is the padding's
    entry_bits = col_bits + max(int(n_codes - 1).bit_length(), 0)
    dtype = np.uint16 if entry_bits <= 16 else np.uint32
    if entry_bits > 32:
        raise DeepShrinkError(f"a {n_rows} x {n_cols} matrix with {n_codes} codes does not fit 32-bit entries")
    length = np.bincount(rows, minlength=n_rows)
    order = np.argsort(-length, kind="stable")  # longest first
    n_slices = -(-n_rows // lanes)
    slice_rows = np.arange(n_slices * lanes, dtype=np.uint64)  # the padding lanes keep their own places
    slice_rows[:n_rows] = order
    lane_length = np.zeros(n_slices * lanes, dtype=np.int64)
    lane_length[:n_rows] = length[order]
    ptr = np.zeros(n_slices + 1, dtype=np.uint64)
    np.cumsum(lane_length.reshape(n_slices, lanes).max(axis=1, initial=0) * lanes, out=ptr[1:])
    packed = np.full(int(ptr[-1]), n_cols, dtype=dtype)
    slot = np.empty(n_rows, dtype=np.int64)
    slot[order] = np.arange(n_rows)
    first = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(length, out=first[1:])
    rows = np.asarray(rows, dtype=np.int64)
    k = np.arange(len(rows)) - first[rows]  # each weight's place in its row
    lane_slot = slot[rows]
    packed[ptr[lane_slot // lanes].astype(np.int64) + k * lanes + lane_slot % lanes] = (
        np.asarray(codes, dtype=np.int64) << col_bits
    ) | cols
    return ptr, packed, slice_rows, col_bits


class SparseMatrix:
    """A compressed weight matrix laid out for the engine's kernels.

    Args:
        tensor: the weight; its matrix view (``rows = shape[0]``) is used.
        workers: threads of a product, and how many workers the batch-1 CSC layout
            interleaves rows over; defaults to numba's thread count.
        arithmetic: ``"float32"`` (default; outputs those of the decoded matrix up to
            float rounding); ``"fixed16"``: EIE's 16-bit fixed point (int16 codebook and
            activations, int64 accumulators, numba kernels); ``"int8"``: every token's
            activations and the codebook rounded to int8 (one scale each), exact int32
            sums on VNNI (:func:`~deepshrink.arithmetic.int8_matmul_reference`
            is its bit-exact reference): dense int8 speed, every weight visited. Where a
            float32 kernel is cheaper (very sparse layers at small batches) it runs
            instead, so a token's result can differ by int8 rounding between batch
            sizes; ``run(x, "int8")`` forces int8. A tensor declared int8
            (``tensor.arithmetic``) runs every product in int8: it is the model.
            ``None`` (default): the tensor's own arithmetic.

    Raises:
        DeepShrinkError: if ``workers`` is not a positive integer, ``tensor`` is 0-D,
            ``arithmetic`` is unknown, or ``"int8"`` cannot run here (no SIMD extension,
            65,536 columns or more).

    Examples:
        >>> import torch
        >>> w = CompressedTensor.from_dense(torch.tensor([[0.0, 2.0], [1.0, 0.0], [0.0, -1.0]]))
        >>> SparseMatrix(w, workers=2).matvec(np.array([1.0, 3.0], dtype=np.float32)).tolist()
        [6.0, 1.0, -3.0]
    """

    def __init__(self, tensor: CompressedTensor, workers: int | None = None, arithmetic: str | None = None) -> None:
        workers = numba.get_num_threads() if workers is None else workers
        arithmetic = tensor.arithmetic if arithmetic is None else arithmetic
        if not isinstance(workers, (int, np.integer)) or workers < 1:
            raise DeepShrinkError(f"workers={workers!r} must be a positive integer")
        if not tensor.shape:
            raise DeepShrinkError("a 0-D tensor has no matrix view; the engine needs at least 1-D weights")
        check_arithmetic(arithmetic)
        self.tensor = tensor
        # not tensor.matrix_shape: that reports 0 columns when there are 0 rows
        self.shape = (tensor.shape[0], math.prod(tensor.shape[1:]))
        if arithmetic == "int8" and _simd is None:
            raise DeepShrinkError("arithmetic='int8' runs on the SIMD extension, which this install lacks "
                                  "(pip install builds it where a C compiler is found)")  # fmt: skip
        if arithmetic == "int8" and self.shape[1] > MAX_INT8_COLUMNS:
            raise DeepShrinkError(f"arithmetic='int8' takes fewer than 65,536 columns (int32 sums), the matrix has "
                                  f"{self.shape[1]}")  # fmt: skip
        self.workers = int(workers)
        self.arithmetic = arithmetic
        #: every product in int8, whichever kernel is cheaper: the tensor is declared int8
        self.exact_int8 = arithmetic == "int8" and tensor.arithmetic == "int8"
        fixed_point = self.fixed_point = arithmetic == "fixed16"
        codebook, self.codebook_frac = to_fixed(tensor.codebook) if fixed_point else (tensor.codebook, 0)
        # the kernels' extended codebook: the centroids, then the zero that padding entries point at
        self.codebook = np.append(codebook, codebook.dtype.type(0))
        #: the centroids in the kernels' dtype, not extended (the sliced kernel pads with a zero column)
        self.centroids = codebook
        self.pad_code = len(codebook)
        self._layouts: dict[str, object] = {}  # each built on first use
        self._int8_settled: dict[int, str | None] = {}  # token count -> the int8 kernel beating every other (_plan)
        self._line_costs_by_batch: dict[int, dict[str, float]] = {}
        self._no_bias = np.zeros(self.shape[0], dtype=np.float32)
        # each worker's accumulator row padded to whole cache lines, with a line of slack:
        # two threads adding into one shared line pass it back and forth (false sharing),
        # which cost ~10% on 1000-row layers
        self._acc_shape = (self.workers, -(-self.local_rows // _LINE) * _LINE + _LINE)
        self._zero = np.zeros(1, dtype=np.int64 if fixed_point else np.float32)
        # Chosen once: batch 1 is the latency-bound case, where a per-call choice costs more
        # than small layers take (nnz bounds the work; zero activations only lower it).
        parallel = self.workers > 1 and tensor.nnz >= PARALLEL_MIN_MACS
        self._csc_kernel = kernels.csc_matvec if parallel else kernels.csc_matvec_serial
        self._sliced_kernel = kernels.sliced_matvec if parallel else kernels.sliced_matvec_serial
        table_bytes = len(codebook) * (self.shape[1] + 1) * self._zero.itemsize
        #: whether the sliced kernel indexes a product table (see kernels.fill_slice_values)
        self.use_table = table_bytes <= TABLE_MAX_BYTES
        #: whether float32 products run on the SIMD extension where it pays (extension built)
        self.simd = _simd is not None and not fixed_point
        self._table = layouts.panel_table(tensor) if self.simd else None
        self._csc_column_cost = tensor.nnz / max(self.shape[1], 1) + SEGMENT_COST * self.workers
        # numba's choices (no SIMD extension, or fixed point): counting the activations (a
        # microsecond) only pays if some count can favour the sliced kernel
        self._rows_may_win = self._sliced_cost() < self.shape[1] * self._csc_column_cost
        #: the most a numba batch-1 product can cost (every activation non-zero), its call included
        self._sample_max_cost = min(self._sliced_cost(), self.shape[1] * self._csc_column_cost) + CALL_COST

    @property
    def local_rows(self) -> int:
        """Rows per worker (the last workers may own one row fewer)."""
        return -(-self.shape[0] // self.workers)

    @property
    def nbytes(self) -> int:
        """Bytes of the batch-1 CSC layout: pointers, gaps, codes and codebook."""
        return sum(a.nbytes for a in (self.col_ptr, self.col_gaps, self.col_codes, self.codebook))

    @property
    def held_bytes(self) -> int:
        """Bytes this matrix holds now: the compressed tensor's arrays and every layout built so far.

        Layouts are built by the first product that needs them, so this grows with use;
        it is what a model on the engine really keeps in memory (no dense weight).
        """
        return self.tensor.nbytes + sum(_array_bytes(a) for a in (self._table, *self._layouts.values()))

    def _layout(self, name: str, build: Callable[[], object]) -> object:
        if name not in self._layouts:
            self._layouts[name] = build()
        return self._layouts[name]

    @property
    def col_ptr(self) -> np.ndarray:
        """``(workers, cols + 1)`` segment offsets of the interleaved CSC layout (see :func:`kernels.csc_matvec`)."""
        return self._interleaved_csc()[0]

    @property
    def col_gaps(self) -> np.ndarray:
        """8-bit relative row indices of the interleaved CSC layout."""
        return self._interleaved_csc()[1]

    @property
    def col_codes(self) -> np.ndarray:
        """Codebook indices of the interleaved CSC layout, aligned with :attr:`col_gaps`."""
        return self._interleaved_csc()[2]

    def _interleaved_csc(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        def build() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            rows, cols = self.tensor.rows_cols()  # empty when there are 0 rows, so no division by 0 columns
            n_cols = self.shape[1]
            worker, local = rows % self.workers, rows // self.workers
            segment = worker * n_cols + cols
            # positions are row-major, so a stable sort by segment keeps each segment's rows ascending
            order = np.argsort(segment, kind="stable")
            ptr, gaps, codes = segmented_stream(
                segment[order], local[order], self.tensor.codes[order], self.workers * n_cols, self.pad_code
            )
            # worker w's column j is segment w * n_cols + j: view the pointers as (workers, cols + 1)
            col_ptr = ptr[np.arange(self.workers)[:, None] * n_cols + np.arange(n_cols + 1)]
            return col_ptr, gaps, codes

        return self._layout("csc", build)

    def row_major(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The CSR layout ``(row_ptr, gaps, codes)`` for the numba batch and convolution kernels (built once)."""
        rows_cols = self.tensor.rows_cols
        return self._layout("csr", lambda: segmented_stream(*rows_cols(), self.tensor.codes, self.shape[0],
                                                             self.pad_code))  # fmt: skip

    def sliced(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """The sliced layout ``(ptr, packed, slice_rows, col_bits)`` of the numba dense-activation kernel (built once)."""
        return self._layout("sliced", lambda: sliced_rows(*self.tensor.rows_cols(), self.tensor.codes, self.shape,
                                                           self.pad_code))  # fmt: skip

    # -- the SIMD layouts and their costs -----------------------------------------------

    def _blocks(self) -> int:
        """Number of 16 x 1 blocks (16 rows of a panel, one column) holding a kept weight."""
        return self._layout("blocks", lambda: int(self._panel_blocks().sum()))

    def _panel_blocks(self) -> np.ndarray:
        """Each 16-row panel's count of 16 x 1 blocks holding a kept weight."""

        def count() -> np.ndarray:
            panels = -(-self.shape[0] // layouts.LANES)
            if self.tensor.whole:  # every block holds weights: no positions to make and divide
                return np.full(panels, self.shape[1])
            rows, cols = self.tensor.rows_cols()
            grid = np.zeros((panels, self.shape[1]), dtype=bool)
            grid[rows // layouts.LANES, cols] = True
            return np.count_nonzero(grid, axis=1)

        return self._layout("block_counts", count)

    def _blocky(self) -> bool:
        """Whether under 90% of the 16 x 1 blocks hold a weight: the block layouts pay (see :func:`layouts.block_codes`)."""
        return self._blocks() < 0.9 * -(-self.shape[0] // layouts.LANES) * self.shape[1]

    def _panel_kind(self) -> str | None:
        """``"dense"`` or ``"block"``: the panel layout this matrix would use, or None without one."""

        def kind() -> str | None:
            if self._table is None or not self.tensor.nnz:
                return None
            if self._blocky():
                return "block"
            padded = -(-self.shape[0] // (layouts.LANES * layouts.SUPER)) * layouts.LANES * layouts.SUPER
            return "dense" if padded * self.shape[1] <= DENSE_PANEL_MAX_BYTES_PER_WEIGHT * self.tensor.nnz else None

        return self._layout("panel_kind", kind)

    def _batch_lines(self) -> list[tuple[str, float]]:
        """Each SIMD batch kernel's cost per token (the row kernel's per pass of 16), for :meth:`kernel_for`."""

        def lines() -> list[tuple[str, float]]:
            found = []
            if self._panel_kind() is not None:
                panels = -(-self.shape[0] // layouts.LANES)
                dense = self._panel_kind() == "dense"
                per_token = panels * self.shape[1] * PANEL_TOKEN_COST if dense else self._blocks() * BLOCK_TOKEN_COST
                found.append(("panels", per_token))
            if len(self.centroids) <= layouts.ROW_TABLE:
                found.append(("rows", self.tensor.nnz * 1.15 * ROWS_ENTRY_COST))  # ~15% padding
            return found

        return self._layout("batch_lines", lines)

    def _panels(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """``(codes, blk_ptr, cols)`` of the panel layout (``blk_ptr`` and ``cols`` None for the dense one)."""

        def build() -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
            if self._panel_kind() == "dense":
                return layouts.panel_codes(self.tensor, self._table), None, None
            blk_ptr, cols, codes = layouts.block_codes(self.tensor, self._table)
            return codes, blk_ptr, cols

        return self._layout("panels", build)

    def _tiles(self) -> layouts.Tiles | None:
        return self._layout("tiles", lambda: layouts.tiled_entries(self.tensor))

    def _row_groups(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        return self._layout("row_groups", lambda: layouts.row_entries(self.tensor))

    def _untiled_lines(self) -> list[tuple[str, float, float]]:
        """Each batch-1 kernel's cost as ``(name, per active column, fixed)``, the tiled kernel's left out.

        EIE's kernel costs per active column, the dense panel layout too (a panel's 16
        codes per column); the sliced and block kernels visit every weight or block
        whatever the activations.
        """

        def lines() -> list[tuple[str, float, float]]:
            found = [("csc", self._csc_column_cost, 0.0)]
            if not self.simd:
                return [*found, ("sliced", 0.0, self._sliced_cost())]
            if self._panel_kind() == "dense":
                found.append(("panels", -(-self.shape[0] // layouts.LANES) * PANEL_COLUMN_COST, 0.0))
            elif self._panel_kind() == "block":
                found.append(("panels", 0.0, self._blocks() * BLOCK_COST))
            return found

        return self._layout("untiled_lines", lines)

    def _tiled_may_win(self) -> bool:
        """Whether the tiled kernel's least cost (no padding) is below every other batch-1 kernel's most."""
        most = min(slope * self.shape[1] + fixed for _, slope, fixed in self._untiled_lines())
        return self.simd and len(self.centroids) <= layouts.TABLE and self.tensor.nnz * TILED_ENTRY_COST < most

    def _vector_lines(self) -> list[tuple[str, float, float]]:
        """Every batch-1 kernel's cost line (see :meth:`_untiled_lines`); the tiled layout is built where it may win."""

        def lines() -> list[tuple[str, float, float]]:
            tiled = [("tiled", 0.0, len(self._tiles().entries) * TILED_ENTRY_COST)] if self._tiled_may_win() else []
            return [*self._untiled_lines(), *tiled]

        return self._layout("vector_lines", lines)

    def _vector_bound(self) -> tuple[float, float]:
        """The cheapest batch-1 cost with no active column and with every column active, the tiled kernel's
        counted without its padding: bounding a batch's per-sample cost builds no tiled layout."""

        def bound() -> tuple[float, float]:
            tiled = [("tiled", 0.0, self.tensor.nnz * TILED_ENTRY_COST)] if self._tiled_may_win() else []
            lines = [*self._untiled_lines(), *tiled]
            return min(fixed for _, _, fixed in lines), min(slope * self.shape[1] + fixed for _, slope, fixed in lines)

        return self._layout("vector_bound", bound)

    def _vector_costs(self, active: int) -> dict[str, float]:
        """Each batch-1 kernel's cost for ``active`` non-zero activations (int8's too, in int8)."""
        costs = {name: slope * active + fixed for name, slope, fixed in self._vector_lines()}
        return {**costs, **self._layout("int8_vector_costs", lambda: self._int8_costs(1))}

    def _batch_costs(self, x: np.ndarray, every: bool = False) -> dict[str, float]:
        """Each SIMD batch kernel's cost for the ``(batch, cols)`` ``x``; ``"samples"`` only where it may win (or ``every``)."""
        batch = x.shape[0]
        costs = self._line_costs(batch)
        none, every_column = self._vector_bound()
        # per sample, the cheapest line is a concave function of the active count, so it lies above its chord
        # from 0 to every column: the batch's total count bounds the sum, and the lines are weighed sample by
        # sample only when that bound may win
        total, active = self._active(x)
        least = batch * none + (every_column - none) * total / max(self.shape[1], 1)
        if every or least + batch * CALL_COST < min(costs.values(), default=math.inf):
            cheapest = np.min([slope * active + fixed for _, slope, fixed in self._vector_lines()], axis=0)
            costs["samples"] = float(cheapest.sum()) + batch * CALL_COST
        return costs

    def _active(self, x: np.ndarray) -> tuple[int, np.ndarray]:
        """The non-zero activations of the contiguous ``(cols,)`` or ``(batch, cols)`` ``x``: in all, and per sample.

        Counted in C (only the SIMD kernels' cost model asks): NumPy's count of a float array costs a
        small layer's product time (40 us for 16 x 4,096; the C count 3 us).
        """
        n = 1 if x.ndim == 1 else x.shape[0]
        active = np.empty(n, dtype=np.int64)
        return _simd.count_nonzero(x, active, n, self.shape[1]), active

    def _line_costs(self, batch: int) -> dict[str, float]:
        """Each SIMD batch kernel's cost for ``batch`` tokens (int8's too, in int8): none depends on their values."""
        cached = self._line_costs_by_batch.get(batch)
        if cached is None:
            passes = 1 if batch <= 16 else -(-batch // 32) * 2  # the row kernel: 16 tokens, or 32 at twice the cost
            costs = {name: per * (batch if name == "panels" else passes) for name, per in self._batch_lines()}
            costs.update(self._int8_costs(batch))
            cached = self._line_costs_by_batch[batch] = {name: cost + CALL_COST for name, cost in costs.items()}
        return dict(cached)

    def _plan(self, x: np.ndarray) -> tuple[str, float]:
        """:meth:`kernel_for`'s choice and its estimated cost (``nan`` where numba's own rules chose).

        In int8 the int8 products are more lines of the cost model, so a float32 kernel still
        runs the products it does faster (sparse layers at small batches): more exact, and
        sooner. Where an int8 kernel beats every float32 kernel whatever the activations (a
        dense or block-sparse layer's case) that is settled once per batch size: weighing the
        kernels again, the activations counted, costs a small layer's product time.
        """
        tokens = 1 if x.ndim == 1 else x.shape[0]
        settled = self.int8_kernel(tokens)
        if settled:
            return settled, self._line_costs_by_batch[tokens][settled]
        if tokens == 1:
            if self.simd:
                costs = self._vector_costs(self._active(x)[0])
                return min(costs.items(), key=lambda c: c[1])
            return ("sliced" if self.prefers_rows(x) else "csc"), math.nan
        if self.simd and (self._batch_lines() or self.arithmetic == "int8"):
            return min(self._batch_costs(x).items(), key=lambda c: c[1])
        return ("samples" if self.prefers_samples(x) else "csr"), math.nan  # numba's, or a codebook past the tables

    def int8_kernel(self, tokens: int) -> str | None:
        """The int8 kernel that runs every product of ``tokens`` tokens, or ``None`` when none is settled.

        ``None`` outside int8, at one token, and where a float32 kernel may be cheaper (then
        the activations decide, product by product); for a tensor declared int8, the cheapest
        int8 kernel at every token count.
        """
        if self.exact_int8 and tokens not in self._int8_settled:
            costs = {k: v for k, v in self._line_costs(tokens).items() if k.startswith("int8")}  # caches them too
            self._int8_settled[tokens] = min(costs, key=costs.get)
        if self.arithmetic != "int8" or (tokens < 2 and not self.exact_int8):
            return None
        if tokens not in self._int8_settled:
            lines = self._line_costs(tokens)
            per_sample = tokens * (self._vector_bound()[0] + CALL_COST)  # "samples", every count at its least
            cheapest = min(lines, key=lines.get)
            int8 = cheapest.startswith("int8") and lines[cheapest] <= per_sample
            self._int8_settled[tokens] = cheapest if int8 else None
        return self._int8_settled[tokens]

    def _int8_costs(self, tokens: int) -> dict[str, float]:
        """The int8 kernels' costs for ``tokens`` (none outside int8): dense, and the sparse layouts' where they may pay.

        Each also pays its outputs (scaled, biased, stored, the row's outliers looked up) row by row.
        """
        if self.arithmetic != "int8":
            return {}
        outputs = self.shape[0] * (INT8_OUTPUT_ROW_COST + tokens * INT8_OUTPUT_COST)
        costs = {"int8": self._int8_cost(tokens)}
        passes = -(-tokens // 16)  # the sparse layouts' kernels: 16 tokens at a time, the lanes
        if self._blocky():
            groups = self._layout("int8_groups", lambda: int((-(-self._panel_blocks() // 4)).sum()))  # of 4 blocks
            costs["int8-blocks"] = groups * passes * INT8_BLOCK_GROUP_COST
        if self.tensor.nnz <= INT8_ROWS_MAX_DENSITY * self.shape[0] * self.shape[1]:
            row_groups = self._layout("int8_row_groups", self._row_groups_of_four)
            chunks = -(-self.shape[1] // (4 * layouts.INT8_ROW_CHUNK))
            per_group = INT8_ROW_GROUP_COST if 6 * row_groups <= INT8_CACHE_BYTES else INT8_ROW_MEMORY_GROUP_COST
            costs["int8-rows"] = (row_groups * per_group + self.shape[0] * chunks * INT8_ROW_PASS_COST) * passes
        return {name: cost + outputs for name, cost in costs.items()}

    def _row_groups_of_four(self) -> int:
        """Groups of the row layout: each row's groups of four columns holding a kept weight."""
        rows, cols = self.tensor.rows_cols()
        keys = rows * -(-self.shape[1] // 4) + cols // 4  # non-decreasing: positions are row-major
        return int(np.count_nonzero(np.diff(keys))) + 1 if len(keys) else 0

    def _int8_cost(self, tokens: int) -> float:
        weights = self.shape[0] * self.shape[1]
        packed = self._layout("int8_packs", lambda: layouts.int8_packs(self.tensor))  # 4-bit codes, two to a byte
        streamed = weights / 2 if packed else weights
        return streamed * (INT8_WEIGHT_COST if streamed <= INT8_CACHE_BYTES else INT8_MEMORY_WEIGHT_COST) + (
            weights * tokens * INT8_MAC_COST
        )

    def _int8(self, x: np.ndarray, bias: np.ndarray, kernel: str, threads: int) -> np.ndarray:
        """``x @ W.T + bias`` in int8 for a contiguous ``(batch, cols)`` ``x``: ``"int8"``, ``"int8-blocks"`` or ``"int8-rows"``."""
        p = self._layout(kernel, lambda: layouts.int8_panels(self.tensor, kernel.partition("-")[2] or "dense"))
        out = np.empty((x.shape[0], self.shape[0]), dtype=np.float32)
        _simd.int8_matmul(p.codes, p.packed, p.table, p.rowsum, p.outliers, float(p.scale), x, out, bias,
                          self.shape[0], self.shape[1], x.shape[0], self.shape[1], self.shape[0], threads,
                          p.sparse)  # fmt: skip
        return out

    def kernel_for(self, x: np.ndarray) -> str:
        """The kernel a product with the ``(cols,)`` or ``(batch, cols)`` ``x`` runs, by the cost model.

        Batch 1: ``"csc"``, ``"sliced"``, ``"tiled"`` or ``"panels"``; batches: ``"panels"``,
        ``"rows"``, ``"csr"`` or ``"samples"`` (the batch-1 choice once per sample); in int8
        also ``"int8"``, ``"int8-blocks"`` and ``"int8-rows"``. See the module docstring for what each does.
        """
        return self._plan(np.ascontiguousarray(x))[0]

    def _threads_for(self, cost: float) -> int:
        """Threads for a product of ``cost``: one below :data:`PARALLEL_MIN_COST` (a hand-off costs more there)."""
        return self.workers if not cost < PARALLEL_MIN_COST else 1  # nan (no estimate): the kernels' own rule

    def _check_input(self, x: np.ndarray, ndim: int) -> None:
        if x.ndim != ndim or x.shape[-1] != self.shape[1]:
            raise DeepShrinkError(
                f"input of shape {x.shape} does not fit a {self.shape[0]} x {self.shape[1]} matrix; "
                f"expected {'(cols,)' if ndim == 1 else '(batch, cols)'} with cols={self.shape[1]}"
            )
        if x.dtype != np.float32:
            raise DeepShrinkError(f"input dtype {x.dtype} is not supported; the engine takes float32")

    def check_bias(self, bias: np.ndarray | None) -> np.ndarray:
        """``bias`` checked against the rows (float32), or zeros for ``None``.

        Raises:
            DeepShrinkError: a wrong shape or dtype.
        """
        if bias is None:
            return self._no_bias
        if bias.shape != (self.shape[0],) or bias.dtype != np.float32:
            raise DeepShrinkError(f"bias must be float32 of shape ({self.shape[0]},), got {bias.dtype} {bias.shape}")
        return bias

    def _quantize(self, x: np.ndarray, axis: int | None = None) -> tuple[np.ndarray, int | np.ndarray]:
        """Activations in the kernels' dtype; in fixed point one Q format per sample (along ``axis``)."""
        return to_fixed(x, axis) if self.fixed_point else (x, 0)

    def _accumulators(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.zeros(shape, dtype=self._zero.dtype)

    def _finish(self, acc: np.ndarray, frac: int) -> np.ndarray:
        return from_fixed(acc, frac + self.codebook_frac) if self.fixed_point else acc

    def _sliced_cost(self) -> float:
        """Cost of numba's sliced kernel: every weight, one lookup (or a lookup and a multiply) and an add each."""
        return self.tensor.nnz * (TABLE_WEIGHT_COST if self.use_table else GATHER_WEIGHT_COST)

    def prefers_rows(self, x: np.ndarray) -> bool:
        """Whether numba's sliced row kernel is cheaper than EIE's CSC kernel for ``x`` (no SIMD extension).

        CSC visits only the active columns' weights, plus a segment per (worker,
        active column); the sliced kernel visits every weight, but each costs less
        (no scattered add, see :data:`TABLE_WEIGHT_COST`).
        """
        # Python numbers: arithmetic on NumPy scalars would cost more than the count
        return self._rows_may_win and self._sliced_cost() < int(np.count_nonzero(x)) * self._csc_column_cost

    def prefers_samples(self, x: np.ndarray) -> bool:
        """Whether the batch-1 path once per sample of the ``(batch, cols)`` ``x`` is cheaper than numba's row kernel.

        The row kernel visits every weight once for the whole batch; the batch-1
        path visits, per sample, only its active columns' weights (or the sliced
        kernel's every weight). Activations are counted only when the bounds do not
        settle it.
        """
        batch = x.shape[0]
        row = self.tensor.nnz * (ROW_WEIGHT_COST + ROW_SAMPLE_COST * batch) + CALL_COST
        if batch * CALL_COST >= row:
            return False
        if batch * self._sample_max_cost < row:
            return True
        active = np.count_nonzero(x, axis=1)
        # min(): where the sliced kernel cannot win, its cost is above any count's CSC cost
        per_sample = np.minimum(active * self._csc_column_cost, self._sliced_cost()).sum() + batch * CALL_COST
        return float(per_sample) < row

    def kernels(self, batch: int) -> tuple[str, ...]:
        """The kernels that can run a product of ``batch`` samples here (see :meth:`kernel_for`)."""
        simd = list(self._int8_costs(batch))
        if self.simd and self._panel_kind() is not None:
            simd.append("panels")
        if batch == 1:
            if self.simd and len(self.centroids) <= layouts.TABLE:
                simd.append("tiled")
            return ("csc", "sliced", *simd)
        if self.simd and len(self.centroids) <= layouts.ROW_TABLE:
            simd.append("rows")
        return ("samples", "csr", *simd)

    def _matvec(self, x: np.ndarray, bias: np.ndarray) -> np.ndarray:
        """The batch-1 product of one contiguous float32 vector; ``bias`` already checked.

        Lean on purpose: at batch 1 a small layer's product takes a few microseconds,
        so every Python step here shows in the latency.
        """
        kernel, cost = self._plan(x)
        return self._vector(x, bias, kernel, self._threads_for(cost))

    def _vector(self, x: np.ndarray, bias: np.ndarray, kernel: str, threads: int) -> np.ndarray:
        """``W @ x + bias`` by the named batch-1 kernel (``threads``: the SIMD kernels')."""
        if kernel.startswith("int8"):
            return self._int8(x.reshape(1, -1), bias, kernel, threads).reshape(-1)
        out = np.empty(self.shape[0], dtype=np.float32)
        if kernel == "tiled":
            t = self._tiles()
            _simd.tiled_matvec(t.ptr, t.steps, t.entries, t.slice_rows, t.table, x, out, bias, self.shape[0],
                               self.shape[1], threads)  # fmt: skip
            return out
        if kernel == "panels":
            codes, blk_ptr, cols = self._panels()
            _simd.panels_matmul(codes, blk_ptr, cols, self._table.values, x, out, bias, self.shape[0], self.shape[1],
                                1, self.shape[1], self.shape[0], threads)  # fmt: skip
            return out
        if self.fixed_point:
            xk, frac = to_fixed(x)
            scale = 2.0 ** -(frac + self.codebook_frac)
        else:
            xk, scale = x, 1.0
        if kernel == "sliced":
            self._sliced_kernel(*self.sliced(), self.centroids, xk, self.use_table, scale, bias, self._zero, out,
                                self.workers)  # fmt: skip
        elif self.simd:  # EIE's kernel in C: nothing to compile at a model's first call
            _simd.csc_matvec(self.col_ptr, self.col_gaps, self.col_codes, self.codebook, x, out, bias, self.shape[0],
                             self.shape[1], self.workers, self.col_codes.dtype == np.uint16, threads)  # fmt: skip
        else:
            acc = self._accumulators(self._acc_shape)
            self._csc_kernel(self.col_ptr, self.col_gaps, self.col_codes, self.codebook, xk, scale, bias, acc, out)
        return out

    def run(self, x: np.ndarray, kernel: str, bias: np.ndarray | None = None) -> np.ndarray:
        """``x @ W.T + bias`` for a ``(batch, cols)`` float32 batch with the named kernel (one of :meth:`kernels`).

        For benchmarks and tests; :meth:`matmul` picks the kernel itself.

        Raises:
            DeepShrinkError: on a wrong shape or dtype, or a kernel that cannot run this product.
        """
        self._check_input(x, 2)
        if kernel not in self.kernels(x.shape[0]):
            raise DeepShrinkError(f"kernel {kernel!r} cannot run a batch of {x.shape[0]} here; "
                                  f"available: {', '.join(self.kernels(x.shape[0]))}")  # fmt: skip
        x, bias = np.ascontiguousarray(x), self.check_bias(bias)
        if x.shape[0] == 1:
            cost = self._vector_costs(self._active(x)[0]).get(kernel, math.nan) if self.simd else math.nan
            return self._vector(x[0], bias, kernel, self._threads_for(cost)).reshape(1, -1)
        cost = self._batch_costs(x, every=True).get(kernel, math.nan) if self.simd else math.nan
        return self._batch(x, bias, kernel, self._threads_for(cost))

    def _batch(self, x: np.ndarray, bias: np.ndarray, kernel: str, threads: int) -> np.ndarray:
        """``x @ W.T + bias`` for a contiguous ``(batch, cols)`` batch by the named batch kernel."""
        if kernel.startswith("int8"):
            return self._int8(x, bias, kernel, threads)
        if kernel == "samples":
            return np.stack([self._matvec(row, bias) for row in x])
        if kernel == "csr":
            out = self.matmul_columns(np.ascontiguousarray(x.T)).T
            out += bias
            return out
        out = np.empty((x.shape[0], self.shape[0]), dtype=np.float32)
        if kernel == "panels":
            codes, blk_ptr, cols = self._panels()
            _simd.panels_matmul(codes, blk_ptr, cols, self._table.values, x, out, bias, self.shape[0], self.shape[1],
                                x.shape[0], self.shape[1], self.shape[0], threads)  # fmt: skip
        else:
            seg_ptr, entries, group_rows, table = self._row_groups()
            _simd.rows_matmul(seg_ptr, entries, group_rows, table, x, out, bias, self.shape[0], self.shape[1],
                              x.shape[0], self.shape[1], self.shape[0], threads)  # fmt: skip
        return out

    def matvec(self, x: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
        """``W @ x + bias`` for one ``(cols,)`` float32 vector, with the batch-1 kernel :meth:`kernel_for` picks.

        Returns:
            ``(rows,)`` float32.

        Raises:
            DeepShrinkError: on a wrong shape or dtype.
        """
        self._check_input(x, 1)
        return self._matvec(np.ascontiguousarray(x), self.check_bias(bias))

    def matmul(self, x: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
        """``x @ W.T + bias`` for a ``(batch, cols)`` float32 batch, kernel chosen by cost (:meth:`kernel_for`).

        Returns:
            ``(batch, rows)`` float32.

        Raises:
            DeepShrinkError: on a wrong shape or dtype.
        """
        self._check_input(x, 2)
        bias = self.check_bias(bias)
        if x.shape[0] == 1:  # the main case, without the loop
            return self._matvec(np.ascontiguousarray(x[0]), bias).reshape(1, -1)
        if x.shape[0] == 0:
            return np.broadcast_to(bias, (0, self.shape[0])).copy()
        return self._product(np.ascontiguousarray(x), bias)

    def _product(self, x: np.ndarray, bias: np.ndarray) -> np.ndarray:
        """``x @ W.T + bias`` for a contiguous ``(batch > 1, cols)`` float32 batch, ``bias`` checked: the layers' path."""
        kernel, cost = self._plan(x)
        return self._batch(x, bias, kernel, self._threads_for(cost))

    def matmul_columns(self, xt: np.ndarray) -> np.ndarray:
        """``W @ xt`` for a ``(cols, n)`` float32 array with the row-parallel kernel.

        Returns:
            ``(rows, n)`` float32.

        Raises:
            DeepShrinkError: on a wrong shape or dtype.
        """
        if xt.ndim != 2 or xt.shape[0] != self.shape[1] or xt.dtype != np.float32:
            raise DeepShrinkError(
                f"input of shape {xt.shape} and dtype {xt.dtype} does not fit; expected float32 "
                f"(cols, n) with cols={self.shape[1]}"
            )
        row_ptr, gaps, codes = self.row_major()
        xk, frac = self._quantize(np.ascontiguousarray(xt), axis=1)
        out = self._accumulators((self.shape[0], xt.shape[1]))
        kernel = kernels.csr_matmul if _parallel(self.tensor.nnz * xt.shape[1]) else kernels.csr_matmul_serial
        kernel(row_ptr, gaps, codes, self.codebook, xk, out)
        return self._finish(out, frac)

    def conv2d(
        self,
        x: np.ndarray,
        kernel: tuple[int, int],
        stride: tuple[int, int],
        dilation: tuple[int, int],
        bias: np.ndarray | None = None,
        groups: int = 1,
    ) -> np.ndarray:
        """A convolution by this ``(out, in / groups * kh * kw)`` matrix: direct, each weight over a shifted plane.

        Args:
            x: ``(batch, in, H, W)`` float32, already zero-padded.
            kernel, stride, dilation: ``(h, w)`` pairs as in ``nn.Conv2d``.
            bias: ``(out,)`` float32 or ``None``.
            groups: as in ``nn.Conv2d`` (``in`` channels = matrix columns / taps x groups).

        Returns:
            ``(batch, out, out_h, out_w)`` float32.

        Raises:
            DeepShrinkError: ``x`` does not fit the matrix or is smaller than the dilated kernel.
        """
        area = kernel[0] * kernel[1]
        channels = self.shape[1] // area * groups
        if self.shape[0] % groups or channels * area != self.shape[1] * groups:
            raise DeepShrinkError(f"a {self.shape[0]} x {self.shape[1]} matrix is no convolution with kernel "
                                  f"{kernel} in {groups} groups")  # fmt: skip
        if x.ndim != 4 or x.shape[1] != channels or x.dtype != np.float32:
            raise DeepShrinkError(
                f"input of shape {x.shape} and dtype {x.dtype} does not fit a convolution of {self.shape[1]} taps "
                f"with kernel {kernel}; expected float32 (batch, {channels}, H, W)"
            )
        out_h, out_w = [
            (size - dil * (k - 1) - 1) // s + 1 for size, k, s, dil in zip(x.shape[2:], kernel, stride, dilation)
        ]
        if min(out_h, out_w) < 1:
            raise DeepShrinkError(f"input of {x.shape[2:]} is smaller than the dilated kernel {kernel}")
        if self.arithmetic == "int8":
            raise DeepShrinkError("an int8 convolution is one product of its patches: SparseConv2d runs it (this "
                                  "direct convolution computes in float32 or fixed16)")  # fmt: skip
        row_ptr, gaps, codes = self.row_major()
        xk, frac = self._quantize(np.ascontiguousarray(x), axis=0)
        scale = np.exp2(-(np.ravel(frac) + self.codebook_frac)) if self.fixed_point else np.ones(x.shape[0])
        width = x.shape[3] if tuple(stride) == (1, 1) else out_w  # the kernel's flat fast path, see there
        acc = self._accumulators((x.shape[0], self.shape[0], out_h, width))
        out = np.empty((x.shape[0], self.shape[0], out_h, out_w), dtype=np.float32)
        parallel = _parallel(self.tensor.nnz * out_h * width * x.shape[0])
        if self.simd:  # the same direct convolution in C: nothing to compile at a model's first call
            geometry = (x.shape[0], x.shape[1], x.shape[2], x.shape[3], self.shape[0], out_h, out_w, width, *kernel)
            _simd.conv2d(row_ptr, gaps, codes, self.codebook, xk, acc, out, self.check_bias(bias), geometry,
                         (*stride, *dilation, groups), codes.dtype == np.uint16, self.workers if parallel else 1)  # fmt: skip
            return out
        fn = kernels.conv2d if parallel else kernels.conv2d_serial
        fn(row_ptr, gaps, codes, self.codebook, xk, acc, tuple(kernel), tuple(stride), tuple(dilation), groups,
           scale, self.check_bias(bias), out)  # fmt: skip
        return out

    def __repr__(self) -> str:
        return (f"SparseMatrix({self.shape[0]}x{self.shape[1]}, nnz={self.tensor.nnz}, workers={self.workers}, "
                f"{self.arithmetic})")  # fmt: skip
