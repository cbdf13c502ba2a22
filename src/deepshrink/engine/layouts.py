"""Layouts of a compressed weight matrix for the SIMD kernels (:mod:`deepshrink.engine._simd`).

Each function turns a :class:`~deepshrink.tensor.CompressedTensor`'s matrix view
(``rows x cols``, codes into a codebook) into the arrays one kernel reads; the values
stay shared (a code per weight, a small table), so nothing here decodes the matrix.

- :func:`panel_codes` (dense) and :func:`block_codes` (16 x 1 blocks): one byte per
  weight in 16-row panels, for ``panels_matmul``. The table (at most 32 values: the
  centroids, and a zero when some weights are pruned) is held in two AVX-512 registers,
  so one permute decodes 16 weights.
- :func:`tiled_entries`: batch 1 on an unstructured sparse matrix (``tiled_matvec``):
  SELL-16 cut into tiles of 31 columns, an entry a 5-bit code and a 5-bit column.
- :func:`row_entries`: batches on an unstructured sparse matrix (``rows_matmul``): rows
  in groups of 4 (SELL-4) cut into 128-column chunks, an entry a one-byte code and a
  one-byte column.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from deepshrink.arithmetic import int8_values
from deepshrink.tensor import CompressedTensor

#: Rows of a panel and of a slice: one AVX-512 register of float32.
LANES = 16
#: Values one permute decodes from two registers (vpermt2ps).
TABLE = 32
#: Panels interleaved column by column in the dense layout: 4 x 16 one-byte codes, one cache line.
SUPER = 4
#: Columns of a tile of the tiled layout; local column 31 is the padding entries' zero.
TILE_COLS = 31
#: Most values :func:`row_entries`' one-byte codes index.
ROW_TABLE = 256
#: Columns of a chunk of :func:`row_entries`: 128 x 32 tokens' float32 activations fill half of L1.
CHUNK_COLS = 128
#: Rows whose chains :func:`row_entries`' kernel runs side by side.
ROW_GROUP = 4


@dataclass(frozen=True)
class Table:
    """The values a matrix's codes index in the panel layouts.

    Attributes:
        values: ``(32,)`` float32: the centroids, then (``zero`` not None) a zero, then padding.
        zero: the code of a pruned weight, or None when no weight is pruned.
    """

    values: np.ndarray
    zero: int | None


def panel_table(tensor: CompressedTensor) -> Table | None:
    """The table of the panel layouts, or None when centroids and zero make more than :data:`TABLE`.

    Examples:
        >>> t = CompressedTensor((2, 2), np.array([0, 3]), np.array([1, 0]), np.array([0.5, -1.0]), 1)
        >>> table = panel_table(t)
        >>> table.values[:3].tolist(), table.zero
        ([0.5, -1.0, 0.0], 2)
    """
    k = len(tensor.codebook)
    zero = k if tensor.nnz < tensor.numel else None
    if k + (zero is not None) > TABLE:
        return None
    values = np.zeros(TABLE, dtype=np.float32)
    values[:k] = tensor.codebook
    return Table(values, zero)


def _shape(tensor: CompressedTensor) -> tuple[int, int]:
    """``(rows, cols)`` of the matrix view, columns counted even when there are no rows."""
    return tensor.shape[0], math.prod(tensor.shape[1:])


def _code_matrix(tensor: CompressedTensor, zero: int | None, rows: int) -> np.ndarray:
    """``(rows, cols)`` uint8 code of every weight (pruned ones ``zero``), rows padded with ``zero or 0``."""
    n_cols = _shape(tensor)[1]
    codes = np.full(rows * n_cols, 0 if zero is None else zero, dtype=np.uint8)
    codes[tensor.positions] = tensor.codes
    return codes.reshape(rows, n_cols)


def _quads(codes: np.ndarray) -> np.ndarray:
    """``(n, 16)`` blocks (``n`` a multiple of 4) as 64-byte quads: byte ``4 i + q`` is lane ``i`` of block ``q``.

    One 64-byte load then holds a lane's four codes in one 32-bit word, and a shift right
    of ``8 q`` exposes block ``q``'s to the permute, which reads index bits 0-4 only.
    """
    return np.ascontiguousarray(codes.reshape(-1, 4, LANES).transpose(0, 2, 1)).reshape(-1, 4 * LANES)


def panel_codes(tensor: CompressedTensor, table: Table) -> np.ndarray:
    """The dense panel layout: every weight's one-byte code; per column, four 16-row panels in one 64-byte quad.

    Panel ``p`` is rows ``16 p .. 16 p + 15`` (rows padded to a multiple of 64); quad
    ``(g, k)``, row ``g * cols + k`` of the result, holds column ``k`` of panels ``4 g ..
    4 g + 3`` (see :func:`_quads`), so at batch 1 an active column is one cache line.

    Examples:
        >>> t = CompressedTensor((2, 3), np.array([0, 4]), np.array([1, 0]), np.array([0.5, -1.0]), 1)
        >>> c = panel_codes(t, panel_table(t))
        >>> c.shape, c[0, [0, 4]].tolist(), c[1, [0, 4]].tolist()  # column 0: rows 0, 1 hold codes 1 and 2 (zero)
        ((3, 64), [1, 2], [2, 0])
    """
    n_cols = _shape(tensor)[1]
    group = LANES * SUPER
    rows = -(-tensor.shape[0] // group) * group
    codes = _code_matrix(tensor, table.zero, rows)  # (rows, cols)
    # (groups, 4 panels, 16 lanes, cols) -> (groups, cols, 4 panels, 16 lanes): a column's blocks in one quad
    blocks = codes.reshape(-1, SUPER, LANES, n_cols).transpose(0, 3, 1, 2)
    return _quads(blocks.reshape(-1, LANES)).reshape(-1, group)


def block_codes(tensor: CompressedTensor, table: Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The block layout: the 16 x 1 blocks (16 rows of a panel, one column) with a non-zero weight, in quads.

    Each panel's blocks are padded to a multiple of 4 with blocks of column ``cols``,
    which the kernel reads as zero activations.

    Returns:
        ``blk_ptr`` ``(panels + 1,)`` int64 (panel ``p``'s blocks are ``blk_ptr[p]:blk_ptr[p + 1]``),
        ``cols`` int32 column of each block, ``codes`` ``(blocks / 4, 64)`` uint8 quads (see :func:`_quads`).

    Examples:
        >>> t = CompressedTensor((2, 3), np.array([0, 4]), np.array([1, 0]), np.array([0.5, -1.0]), 1)
        >>> ptr, cols, codes = block_codes(t, panel_table(t))
        >>> ptr.tolist(), cols.tolist(), codes[0, [0, 1, 4, 5]].tolist()  # lanes 0 and 1 of blocks 0 and 1
        ([0, 4], [0, 1, 3, 3], [1, 2, 2, 0])
    """
    return _block_quads(tensor, tensor.codes.astype(np.uint8), 0 if table.zero is None else table.zero)


def _block_quads(tensor: CompressedTensor, entries: np.ndarray, fill: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`block_codes` with each kept weight's byte ``entries`` (pruned ones ``fill``)."""
    n_rows, n_cols = _shape(tensor)
    panels = -(-n_rows // LANES)
    rows, cols = tensor.rows_cols()
    present = np.unique((rows // LANES) * n_cols + cols)  # block keys, panel-major then column
    per_panel = np.bincount(present // max(n_cols, 1), minlength=panels)
    padded = -(-per_panel // 4) * 4
    blk_ptr = np.zeros(panels + 1, dtype=np.int64)
    np.cumsum(padded, out=blk_ptr[1:])
    panel_of = present // max(n_cols, 1)
    slot = blk_ptr[panel_of] + np.arange(len(present)) - np.searchsorted(panel_of, panel_of)
    block_cols = np.full(int(blk_ptr[-1]), n_cols, dtype=np.int32)
    block_cols[slot] = present % max(n_cols, 1)
    quads = np.full((int(blk_ptr[-1]), LANES), fill, dtype=np.uint8)
    quads[slot[np.searchsorted(present, (rows // LANES) * n_cols + cols)], rows % LANES] = entries
    return blk_ptr, block_cols, _quads(quads)


@dataclass(frozen=True)
class _LaneGroups:
    """Rows in groups of lanes, columns in spans: where each kept weight goes (see :func:`_lane_groups`)."""

    lane_rows: np.ndarray  # (groups * lanes,) int32: the row of each lane; padding lanes numbered from rows on
    steps: np.ndarray  # (segments,) the longest lane's count of weights in each segment
    segment: np.ndarray  # (nnz,) each weight's segment
    lane: np.ndarray  # (nnz,) its lane in the group
    step: np.ndarray  # (nnz,) its place among its lane's weights in the segment


def _lane_groups(tensor: CompressedTensor, lanes: int, span: int, span_major: bool) -> _LaneGroups:
    """Sort rows longest first into groups of ``lanes`` and cut the columns into spans of ``span``.

    A segment is one group's weights in one span: numbered span by span (``span_major``)
    or group by group. A lane's weights keep their column order in a segment.
    """
    n_rows, n_cols = _shape(tensor)
    groups, spans = -(-n_rows // lanes), -(-n_cols // span)
    rows, cols = tensor.rows_cols()
    order = np.argsort(-np.bincount(rows, minlength=n_rows), kind="stable")
    lane_rows = np.arange(groups * lanes, dtype=np.int32)
    lane_rows[:n_rows] = order
    place = np.empty(n_rows, dtype=np.int64)
    place[order] = np.arange(n_rows)
    group, lane, column_span = place[rows] // lanes, place[rows] % lanes, cols // span
    segment = column_span * groups + group if span_major else group * spans + column_span
    count = np.zeros((groups * spans, lanes), dtype=np.int64)
    np.add.at(count, (segment, lane), 1)
    # positions are row-major, so a stable sort by (segment, lane) keeps each lane's columns ascending
    key = segment * lanes + lane
    by_key = np.argsort(key, kind="stable")
    step = np.empty(len(key), dtype=np.int64)
    step[by_key] = np.arange(len(key)) - np.searchsorted(key[by_key], key[by_key])
    return _LaneGroups(lane_rows, count.max(axis=1, initial=0), segment, lane, step)


@dataclass(frozen=True)
class Tiles:
    """The tiled layout of ``tiled_matvec`` (see :func:`tiled_entries`)."""

    ptr: np.ndarray
    steps: np.ndarray
    entries: np.ndarray
    slice_rows: np.ndarray
    table: np.ndarray

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.ptr, self.steps, self.entries, self.slice_rows, self.table))


def tiled_entries(tensor: CompressedTensor) -> Tiles | None:
    """SELL-16 in tiles of 31 columns, or None when the codebook has more than 32 values.

    Rows are sorted longest first into slices of 16 (``slice_rows``: the row of each lane,
    padding lanes numbered from ``rows`` on). Slice ``s`` covers every tile ``c`` (columns
    ``31 c .. 31 c + 30``) in order, in ``steps[s, c]`` steps of 16 entries, one per lane:
    ``code << 5 | column - 31 c``. A lane with fewer weights in the tile is padded with
    column 31, which the kernel reads as a zero activation, so pruned weights need no code.
    Steps are stored in pairs, lane by lane (entry ``2 i + h`` of a pair is lane ``i`` of
    its step ``h``: one 32-bit load holds both, and shifts decode them); an odd last step
    of a tile is stored plain.

    Examples:
        >>> t = CompressedTensor((2, 40), np.array([0, 1, 75]), np.array([1, 0, 1]), np.array([0.5, -1.0]), 1)
        >>> tiles = tiled_entries(t)
        >>> tiles.steps.tolist(), tiles.slice_rows[:2].tolist()  # row 0 has 2 weights in tile 0, row 1 one in tile 1
        ([[2, 1]], [0, 1])
        >>> (tiles.entries[:4] & 31).tolist(), (tiles.entries[32:34] & 31).tolist()  # tile 0 paired, tile 1 plain
        ([0, 1, 31, 31], [31, 4])
    """
    if len(tensor.codebook) > TABLE:
        return None
    _, n_cols = _shape(tensor)
    tiles = -(-n_cols // TILE_COLS)
    g = _lane_groups(tensor, LANES, TILE_COLS, span_major=False)
    slices = len(g.lane_rows) // LANES
    step_start = np.zeros(slices * tiles + 1, dtype=np.int64)
    np.cumsum(g.steps, out=step_start[1:])
    ptr = step_start[::tiles] * LANES if tiles else np.zeros(slices + 1, dtype=np.int64)
    entries = np.full(int(step_start[-1]) * LANES, TILE_COLS, dtype=np.uint16)
    # steps go in pairs, lane by lane (entry 2 lane + h of a pair is step h's), an odd last step plain
    n = g.steps[g.segment]
    in_pair = g.step < n - n % 2
    slot = step_start[g.segment] * LANES + np.where(
        in_pair, 2 * LANES * (g.step // 2) + 2 * g.lane + g.step % 2, LANES * g.step + g.lane
    )
    _, cols = tensor.rows_cols()
    entries[slot] = (tensor.codes.astype(np.uint16) << 5) | (cols % TILE_COLS).astype(np.uint16)
    table = np.zeros(TABLE, dtype=np.float32)
    table[: len(tensor.codebook)] = tensor.codebook
    return Tiles(
        np.ascontiguousarray(ptr), g.steps.reshape(slices, tiles).astype(np.uint8), entries, g.lane_rows, table
    )


def row_entries(tensor: CompressedTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """Rows in groups of 4, columns in chunks of :data:`CHUNK_COLS`; None past 256 codebook values.

    Rows are sorted longest first into groups of :data:`ROW_GROUP` (``group_rows``: the row
    of each lane, padding lanes numbered from ``rows`` on). Segment ``(c, g)`` holds group
    ``g``'s weights in chunk ``c`` in steps of 4 entries, entry ``j`` of lane ``l`` at
    ``4 j + l``, each ``code << 8 | column - 128 c`` in a uint16; lanes with fewer weights
    there are padded with column 128, which the kernel reads as a zero activation.

    Returns:
        ``seg_ptr`` ``(chunks * groups + 1,)`` int64, ``entries`` uint16, ``group_rows``
        int32 and the ``(256,)`` float32 table.

    Examples:
        >>> t = CompressedTensor((2, 130), np.array([0, 129, 260 - 1]), np.array([1, 0, 1]), np.array([0.5, -1.0]), 1)
        >>> ptr, entries, group_rows, table = row_entries(t)
        >>> ptr.tolist(), group_rows.tolist()  # row 0 (two weights) first
        ([0, 4, 8], [0, 1, 2, 3])
        >>> (entries & 255).tolist(), (entries >> 8).tolist()  # chunk 0: row 0, column 0; chunk 1: columns 1, 1
        ([0, 128, 128, 128, 1, 1, 128, 128], [1, 0, 0, 0, 0, 1, 0, 0])
    """
    if len(tensor.codebook) > ROW_TABLE:
        return None
    g = _lane_groups(tensor, ROW_GROUP, CHUNK_COLS, span_major=True)
    seg_ptr = np.zeros(len(g.steps) + 1, dtype=np.int64)
    np.cumsum(g.steps * ROW_GROUP, out=seg_ptr[1:])
    _, cols = tensor.rows_cols()
    entries = np.full(int(seg_ptr[-1]), CHUNK_COLS, dtype=np.uint16)
    entries[seg_ptr[g.segment] + ROW_GROUP * g.step + g.lane] = (tensor.codes.astype(np.uint16) << 8) | (
        cols % CHUNK_COLS
    ).astype(np.uint16)
    table = np.zeros(ROW_TABLE, dtype=np.float32)
    table[: len(tensor.codebook)] = tensor.codebook
    return seg_ptr, entries, g.lane_rows, table


#: Values one vpermb decodes from (``int8_matmul``'s table).
INT8_TABLE = 64
#: Groups of four columns a chunk of the int8 row layout spans (16 tokens' activations: 16 KiB, in L1).
INT8_ROW_CHUNK = 256


@dataclass(frozen=True)
class Int8Panels:
    """A matrix laid out for ``int8_matmul`` (see :func:`int8_panels`).

    Attributes:
        codes: per 16-row panel and group of 4 columns, 64 codes, code ``4 i + q`` that of row
            ``16 p + i``, column ``4 c + q``: ``(panels * groups, 64)`` uint8, or, ``packed``,
            ``(panels * groups, 32)`` with code ``j`` in the low nibble of byte ``j`` (``j < 32``)
            or the high nibble of byte ``j - 32``.
        packed: whether every code is below 16, stored two to a byte (half the bytes to stream).
        table: ``(64,)`` int8: the codebook as integers (0 for outliers), then a zero for pruned
            and padding weights where no centroid is 0 already; None when the codebook has more
            values than that: the codes are then the int8 weights.
        rowsum: ``(panels * 16,)`` int32: each row's sum of int8 weights.
        scale: a weight is its int8 value times this.
        outliers: ``(ptr, cols, values)``: the outlier weights in CSR (int64 ``rows + 1``, int32,
            float32), computed in float32.
        sparse: None (dense), or ``(ptr, cols, by_rows)`` of a sparse layout, ``codes`` then
            the int8 weights (``table`` None): the block layout (``by_rows`` False) keeps the
            16 x 1 blocks holding a kept weight (``ptr`` and ``cols`` those of :func:`block_codes`
            as uint16), four to a group, byte ``4 i + q`` of a group row ``i`` of its block ``q``;
            the row layout (``by_rows``) keeps, row by row, each group of four columns holding a
            kept weight: ``cols`` its number (uint16), ``codes`` its four int8 weights (zeros
            included); the groups are cut into chunks of :data:`INT8_ROW_CHUNK`, row ``r``'s
            in chunk ``c`` at ``ptr[c * rows + r]:ptr[c * rows + r + 1]``, padded to a multiple
            of 4 with zeros.
    """

    codes: np.ndarray
    packed: bool
    table: np.ndarray | None
    rowsum: np.ndarray
    scale: np.float32
    outliers: tuple[np.ndarray, np.ndarray, np.ndarray]
    sparse: tuple[np.ndarray, np.ndarray, bool] | None = None


def _int8_zero(values: np.ndarray) -> int:
    """The code of pruned and padding weights: a centroid rounded to 0 (or an outlier's) serves, else one past them."""
    zeros = np.flatnonzero(values == 0)
    return int(zeros[0]) if len(zeros) else len(values)


def int8_packs(tensor: CompressedTensor) -> bool:
    """Whether :func:`int8_panels` stores this matrix's codes two to a byte (every code, the zero's too, below 16).

    Examples:
        >>> t = CompressedTensor((2, 3), np.array([0, 4]), np.array([1, 0]), np.array([0.5, -1.0]), 1)
        >>> int8_packs(t)
        True
    """
    return _packs(tensor, int8_values(tensor)[0])


def _packs(tensor: CompressedTensor, values: np.ndarray) -> bool:
    """:func:`int8_packs` with the int8 codebook ``values`` already computed."""
    rows, n_cols = _shape(tensor)
    padded = tensor.nnz < tensor.numel or rows % LANES or n_cols % 4
    largest = max(int(tensor.codes.max(initial=0)), _int8_zero(values) if padded else 0)
    return len(values) < INT8_TABLE and largest < 16


def int8_panels(tensor: CompressedTensor, layout: str = "dense") -> Int8Panels:
    """Every weight of the matrix as a code of an int8 value (pruned and padding ones a zero), grouped for vpdpbusd.

    ``layout``: ``"dense"``; ``"blocks"``: only the 16 x 1 blocks holding a kept weight; ``"rows"``: only the kept
    weights, row by row (see :class:`Int8Panels`).

    Examples:
        >>> t = CompressedTensor((2, 3), np.array([0, 4]), np.array([1, 0]), np.array([0.5, -1.0]), 1)
        >>> p = int8_panels(t)  # codes 0, 1 and the zero, 2: packed, byte j holds codes j and j + 32 (rows 8-15)
        >>> p.packed, p.codes.shape, p.codes[0, :8].tolist(), p.rowsum[:3].tolist()  # (0, 0) is code 1, (1, 1) code 0
        (True, (1, 32), [33, 34, 34, 34, 34, 32, 34, 34], [-127, 64, 0])
        >>> r = int8_panels(t, "rows")  # each row's one group of columns, padded to four groups with zeros
        >>> r.sparse[0].tolist(), r.codes.view(np.int8)[[0, 17]].tolist()  # -1.0 and 0.5 as int8
        ([0, 4, 8], [-127, 64])
    """
    rows, n_cols = _shape(tensor)
    values, scale, outlier = int8_values(tensor)
    panels, groups = -(-rows // LANES), -(-n_cols // 4)
    row, col = np.divmod(tensor.positions, max(n_cols, 1))
    weights = values[tensor.codes]
    rowsum = np.bincount(row, weights=weights, minlength=panels * LANES).astype(np.int32)
    far = outlier[tensor.codes]  # positions ascend: the list is row-major
    ptr = np.concatenate([[0], np.cumsum(np.bincount(row[far], minlength=rows))]).astype(np.int64)
    outliers = (ptr, col[far].astype(np.int32), tensor.codebook[tensor.codes[far]].astype(np.float32))
    if layout == "blocks":
        blk_ptr, cols, quads = _block_quads(tensor, weights.view(np.uint8), 0)
        return Int8Panels(quads, False, None, rowsum, scale, outliers, (blk_ptr, cols.astype(np.uint16), False))
    if layout == "rows":
        chunks = -(-groups // INT8_ROW_CHUNK)
        segment = (col // 4 // INT8_ROW_CHUNK) * rows + row  # (chunk, row)
        keys, slot = np.unique(segment * groups + col // 4, return_inverse=True)
        # each (chunk, row) padded to a multiple of 4 groups (zeros): the kernel's four chains need no tail loop
        counts = np.bincount(keys // groups, minlength=chunks * rows)
        ptr = np.zeros(chunks * rows + 1, dtype=np.int64)
        np.cumsum(-(-counts // 4) * 4, out=ptr[1:])
        key_segment = keys // groups
        place = ptr[key_segment] + np.arange(len(keys)) - (np.cumsum(counts) - counts)[key_segment]
        entries = np.zeros((int(ptr[-1]), 4), dtype=np.uint8)
        entries[place[slot], col % 4] = weights.view(np.uint8)
        quads = np.zeros(int(ptr[-1]), dtype=np.uint16)
        quads[place] = keys % groups
        return Int8Panels(entries.reshape(-1), False, None, rowsum, scale, outliers, (ptr, quads, True))
    if len(values) < INT8_TABLE:
        zero = _int8_zero(values)
        table = np.zeros(INT8_TABLE, dtype=np.int8)
        table[: len(values)] = values
        full = np.full((panels * LANES, groups * 4), zero, dtype=np.uint8)
        full[row, col] = tensor.codes
    else:
        table = None
        full = np.zeros((panels * LANES, groups * 4), dtype=np.uint8)
        full[row, col] = weights.view(np.uint8)
    codes = np.ascontiguousarray(full.reshape(panels, LANES, groups, 4).transpose(0, 2, 1, 3)).reshape(-1, 4 * LANES)
    packed = _packs(tensor, values)
    if packed:
        codes = codes[:, :32] | (codes[:, 32:] << 4)
    return Int8Panels(codes, packed, table, rowsum, scale, outliers)
