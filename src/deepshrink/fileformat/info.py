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
from dataclasses import asdict, dataclass

from rich.console import Console
from rich.table import Table

from deepshrink.atomic import read_bytes, write_atomic
from deepshrink.coding.relative import encode_relative
from deepshrink.coding.streams import CODERS, encode_with
from deepshrink.fileformat.codec import DszContents, decode_file
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
    )  # fmt: skip


def breakdown(data: bytes, contents: DszContents | None = None) -> FileSize:
    """Size accounting of the bytes of a file (decoded and validated here unless ``contents`` is given)."""
    contents = contents if contents is not None else decode_file(data)
    sections = [length for length, _ in contents.header["sections"]]
    tensors, array_bytes, array_dense = [], 0, 0
    for entry in contents.header["tensors"]:
        if entry["kind"] == "compressed":
            tensors.append(_tensor_size(entry, contents.tensors[entry["name"]], sections))
        else:
            array = contents.arrays[entry["name"]]
            array_bytes += sections[entry["s"]]
            array_dense += array.numel() * FP32_BYTES if array.is_floating_point() else sections[entry["s"]]
    overhead = len(data) - sum(sections)
    return FileSize(tensors, array_bytes, list(contents.arrays), array_dense, overhead, len(data))


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


def layer_table(report: FileSize, title: str = "") -> Table:
    """The per-layer table in the shape of Deep Compression's (``P+Q`` / ``P+Q+H``)."""
    table = Table(title=title, title_justify="left")
    for col in ("layer", "weights", "kept", "weight bits\nP+Q / coded", "index bits\nP+Q / coded", "layout / coders",
                "bytes", "size vs fp32\nP+Q / coded"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("layer", "layout / coders") else "right")
    for t in report.tensors:
        table.add_row(
            t.name, f"{t.numel:,}", _pct(t.nnz, t.numel),
            f"{_per_kept(t.fixed_code_bits, t.nnz)} / {_per_kept(8 * t.codes_bytes, t.nnz)}",
            f"{_per_kept(t.fixed_index_bits, t.nnz)} / {_per_kept(8 * t.index_bytes, t.nnz)}",
            f"{t.layout}({t.index_bits}) {t.index_coder} / {t.codes_coder}", f"{t.total_bytes:,}",
            f"{_pct(t.fixed_bytes, t.dense_bytes)} / {_pct(t.total_bytes, t.dense_bytes)}",
        )  # fmt: skip
    if report.array_names:
        shown = ", ".join(report.array_names[:4]) + (", ..." if len(report.array_names) > 4 else "")
        table.add_row(f"plain arrays ({shown})", "", "", "", "", "raw", f"{report.array_bytes:,}", "")
    table.add_row("header + section framing", "", "", "", "", "", f"{report.overhead_bytes:,}", "", end_section=True)
    numel, nnz = sum(t.numel for t in report.tensors), sum(t.nnz for t in report.tensors)
    fixed_total = sum(t.fixed_bytes for t in report.tensors) + report.array_bytes + report.overhead_bytes
    table.add_row(
        "total (file size)", f"{numel:,}", _pct(nnz, numel),
        f"{_per_kept(sum(t.fixed_code_bits for t in report.tensors), nnz)} / "
        f"{_per_kept(8 * sum(t.codes_bytes for t in report.tensors), nnz)}",
        f"{_per_kept(sum(t.fixed_index_bits for t in report.tensors), nnz)} / "
        f"{_per_kept(8 * sum(t.index_bytes for t in report.tensors), nnz)}",
        "", f"{report.total_bytes:,}",
        f"{_ratio(fixed_total, report.dense_bytes)} / {_ratio(report.total_bytes, report.dense_bytes)}",
    )  # fmt: skip
    return table


def coder_table(contents: DszContents, report: FileSize, title: str = "") -> Table:
    """Bits per symbol of each stream under fixed width, Huffman and ANS (tables included)."""
    table = Table(title=title, title_justify="left")
    table.add_column("layer", justify="left")
    for stream in ("index", "codes"):
        for coder in CODERS:
            table.add_column(f"{stream}\n{'fixed' if coder == 'none' else coder}", justify="right")
    for t in report.tensors:
        comparison = coder_comparison(contents.tensors[t.name], t.index_bits)
        table.add_row(t.name, *(f"{comparison[s][c]:.2f}" for s in ("index", "codes") for c in CODERS))
    return table


def print_info(path: str | os.PathLike, console: Console, json_path: str | os.PathLike | None = None) -> FileSize:
    """``deepshrink info``: the per-layer table and the coder comparison, optionally as JSON too.

    Raises:
        FileFormatError: the file is damaged.
    """
    data = read_bytes(path)
    contents = decode_file(data)
    report = breakdown(data, contents)
    console.print(layer_table(report, f"{path}: {report.total_bytes:,} bytes"))
    console.print(
        coder_table(contents, report, "bits per symbol of each stream under each coder (code tables included)")
    )
    if json_path is not None:
        write_atomic(json_path, json.dumps(report.to_dict(), indent=2).encode())
    return report
