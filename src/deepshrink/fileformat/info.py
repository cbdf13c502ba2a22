"""Exact size accounting of a ``.dsz`` file, and the ``deepshrink info`` tables.

Every byte of the file is attributed: each compressed tensor's index stream,
code stream (tables included) and codebook, the plain arrays, and the header
with its framing. The figures come from the encoded streams themselves, so the
rows add up to the file size exactly.

Examples:
    >>> import tempfile, os, torch
    >>> from deepshrink import save
    >>> t = CompressedTensor.from_dense(torch.tensor([[0.0, 0.5], [0.5, -1.0]]))
    >>> path = os.path.join(tempfile.mkdtemp(), "t.dsz")
    >>> size = save({"w": t}, path)
    >>> report = size_breakdown(path)
    >>> report.total_bytes == size == sum(r.total_bytes for r in report.tensors) + report.overhead_bytes
    True
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass

from rich.console import Console

from deepshrink.atomic import read_bytes, write_atomic
from deepshrink.coding.relative import encode_relative
from deepshrink.coding.streams import CODERS, encode_with
from deepshrink.fileformat.codec import DszContents, decode_file
from deepshrink.progress import quiet, track
from deepshrink.tables import NameTable, print_table
from deepshrink.tensor import CompressedTensor

FP32_BYTES = 4  # the dense baseline of every ratio: fp32 weights, as in Deep Compression's tables


@dataclass(frozen=True)
class TensorSize:
    """Where one compressed tensor's bytes go.

    ``*_bytes`` are the stored section sizes (code tables included);
    ``fixed_*_bits`` are what plain fixed-width coding would take (the paper's
    "P+Q" column): relative indices at ``index_bits`` with escapes, one
    ``bits``-wide code per kept weight, an fp32 codebook.
    """

    name: str
    shape: tuple[int, ...]
    numel: int
    nnz: int
    bits: int
    index_bits: int
    layout: str
    index_coder: str
    codes_coder: str
    index_symbols: int
    index_bytes: int
    index_table_bytes: int
    codes_bytes: int
    codes_table_bytes: int
    codebook_bytes: int
    fixed_index_bits: int
    fixed_code_bits: int
    fixed_codebook_bits: int
    arithmetic: str = "float32"  # what its products compute in (int8 where declared)

    @property
    def total_bytes(self) -> int:
        return self.index_bytes + self.codes_bytes + self.codebook_bytes

    @property
    def dense_bytes(self) -> int:
        return self.numel * FP32_BYTES

    @property
    def fixed_bytes(self) -> float:
        return (self.fixed_index_bits + self.fixed_code_bits + self.fixed_codebook_bits) / 8


@dataclass(frozen=True)
class FileSize:
    """The whole file: tensors, plain arrays, and the header/framing overhead.

    ``total_bytes == sum(t.total_bytes) + array_bytes + overhead_bytes``, the file size.
    """

    tensors: list[TensorSize]
    array_bytes: int
    array_names: list[str]
    array_dtypes: list[str]  # as stored: float16 where written with array_dtype="float16"
    array_dense_bytes: int  # the plain arrays at fp32 (their own size for non-float dtypes)
    overhead_bytes: int
    total_bytes: int

    @property
    def dense_bytes(self) -> int:
        return sum(t.dense_bytes for t in self.tensors) + self.array_dense_bytes

    def to_dict(self) -> dict:
        """Plain data, for JSON output."""
        out = asdict(self)
        out["dense_bytes"] = self.dense_bytes
        return out


def _tensor_size(entry: dict, ct: CompressedTensor, sections: list[int]) -> TensorSize:
    index, codes, book = entry["index"], entry["codes"], entry["codebook"]
    fixed = ct.fixed_width_bits(index["ib"])
    return TensorSize(
        name=entry["name"], shape=ct.shape, numel=ct.numel, nnz=ct.nnz, bits=ct.bits, index_bits=index["ib"],
        layout=index["layout"], index_coder=index["coder"], codes_coder=codes["coder"], index_symbols=index["n"],
        index_bytes=sections[index["s"]], index_table_bytes=index["t"],
        codes_bytes=sections[codes["s"]], codes_table_bytes=codes["t"], codebook_bytes=sections[book["s"]],
        fixed_index_bits=fixed["index"], fixed_code_bits=fixed["codes"], fixed_codebook_bits=fixed["codebook"],
        arithmetic=ct.arithmetic,
    )  # fmt: skip


def breakdown(data: bytes, contents: DszContents | None = None) -> FileSize:
    """Size accounting of the bytes of a file (decoded and validated here unless ``contents`` is given)."""
    contents = contents if contents is not None else decode_file(data)
    sections = [length for length, _ in contents.header["sections"]]
    tensors, array_bytes, array_dense, array_dtypes = [], 0, 0, []
    for entry in contents.header["tensors"]:
        if entry["kind"] == "compressed":
            tensors.append(_tensor_size(entry, contents.tensors[entry["name"]], sections))
        else:
            array = contents.arrays[entry["name"]]
            array_bytes += sections[entry["s"]]
            array_dtypes.append(entry["dtype"])
            array_dense += array.numel() * FP32_BYTES if array.is_floating_point() else sections[entry["s"]]
    overhead = len(data) - sum(sections)
    return FileSize(tensors, array_bytes, list(contents.arrays), array_dtypes, array_dense, overhead, len(data))


def size_breakdown(path: str | os.PathLike) -> FileSize:
    """Size accounting of the file at ``path``; see :class:`FileSize`.

    Raises:
        FileFormatError: the file is damaged.
    """
    return breakdown(read_bytes(path))


def coder_comparison(ct: CompressedTensor, index_bits: int) -> dict[str, dict[str, float]]:
    """Bits per symbol of both streams under every coder, code tables included.

    Returns:
        ``{"index": {"none": ..., "huffman": ..., "ans": ...}, "codes": {...}}``;
        NaN where a coder does not apply (an empty stream, ANS on a stream it
        would make denser than the format allows).
    """
    streams = {"index": (encode_relative(ct.positions, index_bits), index_bits), "codes": (ct.codes, ct.bits)}
    out: dict[str, dict[str, float]] = {}
    for stream, (symbols, width) in streams.items():
        out[stream] = {}
        for coder in CODERS:
            encoded = encode_with(symbols, coder, width)
            out[stream][coder] = (
                encoded.nbytes * 8 / symbols.size if encoded is not None and symbols.size else float("nan")
            )
    return out


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.2f}%" if whole else "-"


def _ratio(part: float, whole: float) -> str:
    return f"{_pct(part, whole)} ({whole / part:.0f}x)" if part and whole else "-"


def _per_kept(n_bits: float, nnz: int) -> str:
    return f"{n_bits / nnz:.2f}" if nnz else "-"


def _count(n: int) -> str:
    """A weight count as the paper writes them: ``500``, ``235.2K``, ``11.7M``."""
    return f"{n:,}" if n < 10_000 else f"{n / 1e3:.1f}K" if n < 1_000_000 else f"{n / 1e6:.1f}M"


def layer_table(report: FileSize, title: str = "", wide: bool = False) -> NameTable:
    """The per-layer table in the shape of Deep Compression's (``P+Q`` / ``P+Q+H``).

    By default it keeps to what fits 80 columns: weights, kept, the coded bits per
    kept weight of codes and of positions, bytes and size against fp32; ``wide``
    adds the fixed-width (``P+Q``) figures, the layout and the coders, and exact counts.
    A tensor declared int8 has ``(int8)`` after its name.
    """
    if wide:
        columns = ["weights", "kept", "weight bits\nP+Q / coded", "index bits\nP+Q / coded", "layout / coders",
                   "bytes", "size vs fp32\nP+Q / coded"]  # fmt: skip
    else:
        columns = ["weights", "kept", "code\nbits", "index\nbits", "bytes", "vs fp32"]
    table = NameTable(columns, title, wide=wide)

    def row(name: str, numel: int, nnz: int, bits: tuple[float, float, float, float], layout: str, total: int,
            fixed: float, dense: int, ratio: Callable[[float, float], str] = _pct, end_section: bool = False) -> None:  # fmt: skip
        fixed_code, code, fixed_index, index = (_per_kept(b, nnz) for b in bits)
        if wide:
            cells = (f"{numel:,}", _pct(nnz, numel), f"{fixed_code} / {code}", f"{fixed_index} / {index}", layout,
                     f"{total:,}", f"{ratio(fixed, dense)} / {ratio(total, dense)}")  # fmt: skip
        else:
            cells = (_count(numel), _pct(nnz, numel), code, index, f"{total:,}", ratio(total, dense))
        table.add_row(name, *cells, end_section=end_section)

    for t in report.tensors:
        name = t.name if t.arithmetic == "float32" else f"{t.name} ({t.arithmetic})"
        row(name, t.numel, t.nnz, (t.fixed_code_bits, 8 * t.codes_bytes, t.fixed_index_bits, 8 * t.index_bytes),
            f"{t.layout}({t.index_bits}) {t.index_coder} / {t.codes_coder}", t.total_bytes, t.fixed_bytes,
            t.dense_bytes)  # fmt: skip
    blank = [""] * (len(columns) - 2)
    if report.array_names:
        n, dtypes = len(report.array_names), ", ".join(sorted(set(report.array_dtypes)))
        vs_fp32 = _pct(report.array_bytes, report.array_dense_bytes)
        table.add_row(f"{n} plain array{'s' * (n != 1)} ({dtypes})", *blank[:-1], "raw" if wide else "",
                      f"{report.array_bytes:,}", f"{vs_fp32} / {vs_fp32}" if wide else vs_fp32)  # fmt: skip
    table.add_row("header + framing", *blank, f"{report.overhead_bytes:,}", end_section=True)
    numel, nnz = sum(t.numel for t in report.tensors), sum(t.nnz for t in report.tensors)
    fixed_total = sum(t.fixed_bytes for t in report.tensors) + report.array_bytes + report.overhead_bytes
    sums = tuple(sum(getattr(t, k) for t in report.tensors) for k in ("fixed_code_bits", "codes_bytes",
                                                                        "fixed_index_bits", "index_bytes"))  # fmt: skip
    row("total (file size)", numel, nnz, (sums[0], 8 * sums[1], sums[2], 8 * sums[3]), "", report.total_bytes,
        fixed_total, report.dense_bytes, _ratio)  # fmt: skip
    return table


def coder_table(contents: DszContents, report: FileSize, title: str = "", wide: bool = False) -> NameTable:
    """Bits per symbol of each stream under fixed width, Huffman and ANS (tables included)."""
    columns = [
        f"{stream}\n{'fixed' if coder == 'none' else coder}" for stream in ("index", "codes") for coder in CODERS
    ]
    table = NameTable(columns, title, wide=wide)
    for t in track(report.tensors, "comparing coders"):
        comparison = coder_comparison(contents.tensors[t.name], t.index_bits)
        table.add_row(t.name, *(f"{comparison[s][c]:.2f}" for s in ("index", "codes") for c in CODERS))
    return table


def print_info(
    path: str | os.PathLike,
    console: Console,
    json_path: str | os.PathLike | None = None,
    wide: bool = False,
    progress: bool = True,
) -> FileSize:
    """``deepshrink info``: the per-layer table and the coder comparison, optionally as JSON too.

    Args:
        path: the ``.dsz`` file.
        console: where the tables go.
        json_path: also write the size breakdown here as JSON.
        wide: the full tables (see :func:`layer_table`), names never broken,
            printed at their full width even past the console's.
        progress: show progress bars while decoding and comparing coders.

    Raises:
        FileFormatError: the file is damaged.
    """
    with quiet(not progress):
        data = read_bytes(path)
        contents = decode_file(data)
        report = breakdown(data, contents)
        coders = coder_table(
            contents, report, "bits per symbol of each stream under each coder (tables included)", wide
        )
    print_table(console, layer_table(report, f"{path}: {report.total_bytes:,} bytes", wide))
    print_table(console, coders)
    if json_path is not None:
        write_atomic(json_path, json.dumps(report.to_dict(), indent=2).encode())
    return report
