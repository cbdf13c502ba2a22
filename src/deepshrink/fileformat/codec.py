"""The ``.dsz`` codec: bytes <-> a set of CompressedTensors plus plain arrays, safe to open.

This module knows bytes and tensors only: it imports nothing from the model side
(no ``nn.Module`` code, nothing of :mod:`deepshrink.compress`). Saving and
loading models is :mod:`deepshrink.fileformat.model_io`.

Layout (all little-endian; the full spec is ``docs/fileformat.md``)::

    magic    8 bytes   b"DSHRINK\\0"
    version  u16       FORMAT_VERSION
    flags    u16       bit 0: the header is deflated (zlib); other bits 0
    hlen     u32       length of the stored header, <= MAX_HEADER_BYTES
    hcrc     u32       zlib.crc32 of the stored header
    header   hlen bytes, UTF-8 JSON (deflated when flag bit 0 is set)
    sections back to back, no holes, each [length, crc32] listed in the header

The reader checks every count against the bytes that hold it *before* it
allocates, so a damaged file or one claiming 10**12 elements gets a
:class:`FileFormatError`, never a crash or a huge allocation. Nothing in a file
is executed (JSON and raw arrays only, no pickle).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from deepshrink.coding import kernels
from deepshrink.coding.budget import DEFAULT_MAX_ELEMENTS, DecodeBudget, check_max_elements
from deepshrink.coding.relative import decode_relative, encode_relative
from deepshrink.coding.streams import EncodedStream, check_coder, decode_stream, encode_stream
from deepshrink.errors import DeepShrinkError, FileFormatError
from deepshrink.progress import track
from deepshrink.tensor import MAX_CODE_BITS, CompressedTensor

MAGIC = b"DSHRINK\x00"
FORMAT_VERSION = 1
PRELUDE = struct.Struct("<8sHHII")  # magic, version, flags, header length, header crc32
FLAG_DEFLATED_HEADER = 1  # names and CRC digits deflate to about a third: 1 KB of a 30 KB LeNet file
MAX_HEADER_BYTES = 8 << 20  # a header is names and small numbers: about 300 bytes a tensor
MAX_HEADER_VALUES = 1 << 18  # JSON values and keys: ~35 a compressed tensor, so ~7,000 tensors
MAX_SHAPE_ELEMENTS = 1 << 48  # no dimension, and no product of them, may claim more
MAX_DIMS = 16
SECTIONS_PER_TENSOR = 3  # index, codes, codebook; an array uses one
DEFAULT_INDEX_BITS = {"fc": 5, "conv": 8}  # Deep Compression: 5 bits for fully connected, 8 for conv
LAYOUTS = ("auto", "relative", "bitmap", "holes")
CODEBOOK_DTYPES = {"float32": "<f4", "float16": "<f2"}
ARRAY_STORAGE = ("float32", "float16")  # EncodeOptions.array_dtype: float arrays as they are, or rounded to fp16
BITMAP_GROUP = 4  # a bitmap is coded as 4-position nibbles: a 16-symbol table stays tiny
ARRAY_DTYPES = {
    torch.float32: "float32", torch.float64: "float64", torch.float16: "float16", torch.bfloat16: "bfloat16",
    torch.int64: "int64", torch.int32: "int32", torch.int16: "int16", torch.int8: "int8",
    torch.uint8: "uint8", torch.bool: "bool",
}  # fmt: skip
_TORCH_DTYPES = {name: dtype for dtype, name in ARRAY_DTYPES.items()}


@dataclass(frozen=True)
class EncodeOptions:
    """How compressed tensors are written.

    Attributes:
        coder: entropy coder of both streams, ``"huffman"`` (the paper's),
            ``"ans"`` (closer to the entropy) or ``"none"``.
        index_bits: relative-index width, one int for all tensors or
            ``{name: bits}``; tensors not named get 5 (2-D) or 8 (conv) bits.
        layout: positions as ``"relative"`` indices, a ``"bitmap"``, the
            ``"holes"`` (relative indices of the weights *not* kept: nothing at
            all for a tensor kept whole), or ``"auto"``: whichever is smallest
            for each tensor.
        codebook_dtype: ``"float32"`` (exact) or ``"float16"`` (rounds the codebook).
        array_dtype: ``"float32"`` stores every plain array (biases,
            LayerNorm, any weight not compressed) in its own dtype, exactly;
            ``"float16"`` stores float32 and float64 arrays as float16 (half
            their bytes), which the reader casts back to their dtype. An array
            whose finite values overflow float16 is kept exact instead.
    """

    coder: str = "huffman"
    index_bits: int | dict[str, int] | None = None
    layout: str = "auto"
    codebook_dtype: str = "float32"
    array_dtype: str = "float32"

    def __post_init__(self) -> None:
        check_coder(self.coder)
        if self.layout not in LAYOUTS:
            raise DeepShrinkError(f"layout={self.layout!r} must be one of {', '.join(map(repr, LAYOUTS))}")
        if self.codebook_dtype not in CODEBOOK_DTYPES:
            raise DeepShrinkError(f"codebook_dtype={self.codebook_dtype!r} must be one of {', '.join(CODEBOOK_DTYPES)}")
        if self.array_dtype not in ARRAY_STORAGE:
            raise DeepShrinkError(f"array_dtype={self.array_dtype!r} must be one of {', '.join(ARRAY_STORAGE)}")
        per_tensor = self.index_bits.values() if isinstance(self.index_bits, dict) else [self.index_bits]
        for bits in per_tensor:
            if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16):
                raise DeepShrinkError(f"index_bits={bits!r} must be an integer in 1..16")

    def index_bits_for(self, name: str, ct: CompressedTensor) -> int:
        """The relative-index width of tensor ``name``."""
        bits = self.index_bits.get(name) if isinstance(self.index_bits, dict) else self.index_bits
        return bits if bits is not None else DEFAULT_INDEX_BITS["conv" if len(ct.shape) > 2 else "fc"]


@dataclass(frozen=True)
class ReadLimits:
    """What a reader accepts; see :func:`read_limits`.

    Attributes:
        max_elements: the most elements decoding one file may allocate, and
            the most a dense decode of it (export, a model built for it) may.
        allow_nonfinite: accept NaN and infinity in codebooks and float arrays.
    """

    max_elements: int = DEFAULT_MAX_ELEMENTS
    allow_nonfinite: bool = False


_LIMITS: contextvars.ContextVar[ReadLimits] = contextvars.ContextVar(
    "deepshrink_read_limits",
    default=ReadLimits(),  # noqa: B039 (a frozen dataclass: nothing to mutate)
)


@contextlib.contextmanager
def read_limits(max_elements: int | None = None, allow_nonfinite: bool | None = None) -> Iterator[ReadLimits]:
    """Change the reader's defaults inside a ``with`` block (the command line's ``--max-elements``).

    Every read in the block that is not given its own value uses these: also
    those made deep inside other functions (the engine's ``from_file``, the
    simulator, ``info``).

    Examples:
        >>> with read_limits(max_elements=1 << 28) as limits:
        ...     limits.max_elements
        268435456
    """
    limits = current_limits(max_elements, allow_nonfinite)
    token = _LIMITS.set(limits)
    try:
        yield limits
    finally:
        _LIMITS.reset(token)


def current_limits(max_elements: int | None = None, allow_nonfinite: bool | None = None) -> ReadLimits:
    """The given values, the others from the innermost :func:`read_limits` (or the defaults)."""
    current = _LIMITS.get()
    return ReadLimits(
        current.max_elements if max_elements is None else check_max_elements(max_elements),
        current.allow_nonfinite if allow_nonfinite is None else bool(allow_nonfinite),
    )


@dataclass
class DszContents:
    """What a file holds.

    Attributes:
        tensors: compressed tensors by parameter name.
        arrays: every other state-dict entry, as CPU tensors.
        model: ``{"factory": "module:function", "kwargs": {...}}`` or None.
        metadata: free JSON data the writer attached.
        header: the parsed JSON header (stream descriptors, section table).
    """

    tensors: dict[str, CompressedTensor]
    arrays: dict[str, torch.Tensor]
    model: dict | None = None
    metadata: dict = field(default_factory=dict)
    header: dict = field(default_factory=dict)


# -- writing ------------------------------------------------------------------


def _stream_entry(stream: EncodedStream, sections: list[bytes]) -> dict:
    sections.append(stream.data)
    return {"coder": stream.coder, "n": stream.n, "k": stream.k, "t": stream.table_size, "s": len(sections) - 1}


def _bitmap_symbols(ct: CompressedTensor) -> np.ndarray:
    """Positions as a bitmap cut into MSB-first nibbles."""
    bits = np.zeros(-(-ct.numel // BITMAP_GROUP) * BITMAP_GROUP, dtype=np.uint8)
    bits[ct.positions] = 1
    return (bits.reshape(-1, BITMAP_GROUP) @ (1 << np.arange(BITMAP_GROUP - 1, -1, -1))).astype(np.uint8)


def _holes(ct: CompressedTensor) -> np.ndarray:
    """The flat positions not kept, in increasing order."""
    kept = np.zeros(ct.numel, dtype=bool)
    kept[ct.positions] = True
    return np.flatnonzero(~kept)


def encode_positions(ct: CompressedTensor, index_bits: int, layout: str, coder: str) -> tuple[str, EncodedStream]:
    """Code a tensor's positions as relative indices, a bitmap or holes (the smallest under ``"auto"``).

    Returns:
        ``(layout, stream)`` with the layout actually used.
    """
    candidates = []
    if layout in ("auto", "relative"):
        candidates.append(("relative", encode_stream(encode_relative(ct.positions, index_bits), coder, index_bits)))
    if layout in ("auto", "bitmap"):
        candidates.append(("bitmap", encode_stream(_bitmap_symbols(ct), coder, BITMAP_GROUP)))
    if layout in ("auto", "holes"):
        candidates.append(("holes", encode_stream(encode_relative(_holes(ct), index_bits), coder, index_bits)))
    return min(candidates, key=lambda c: c[1].nbytes)  # ties keep relative, the paper's layout


def _refuse_nonfinite(finite: bool, name: str, what: str) -> None:
    if not finite:
        raise DeepShrinkError(f"{name}: {what} holds NaN or infinity (a diverged training run?); "
                              "pass allow_nonfinite=True to store it anyway")  # fmt: skip


def _encode_compressed(
    name: str, ct: CompressedTensor, options: EncodeOptions, sections: list[bytes], allow_nonfinite: bool
) -> dict:
    if not allow_nonfinite:
        _refuse_nonfinite(bool(np.isfinite(ct.codebook).all()), name, "the codebook")
    index_bits = options.index_bits_for(name, ct)
    layout, index_stream = encode_positions(ct, index_bits, options.layout, options.coder)
    codebook = ct.codebook.astype(CODEBOOK_DTYPES[options.codebook_dtype])
    if not np.isfinite(codebook).all() and np.isfinite(ct.codebook).all():
        raise DeepShrinkError(
            f"{name}: codebook values overflow {options.codebook_dtype}; use codebook_dtype='float32'"
        )
    entry = {"name": name, "kind": "compressed", "shape": list(ct.shape), "bits": ct.bits, "nnz": ct.nnz}
    entry["index"] = {"layout": layout, "ib": index_bits, **_stream_entry(index_stream, sections)}
    entry["codes"] = _stream_entry(encode_stream(ct.codes, options.coder, ct.bits), sections)
    sections.append(codebook.tobytes())
    entry["codebook"] = {"dtype": options.codebook_dtype, "k": len(codebook), "s": len(sections) - 1}
    if ct.arithmetic != "float32":  # float32 by default: files from before the field read as they were written
        entry["arithmetic"] = ct.arithmetic
    return entry


def _rounded(tensor: torch.Tensor, array_dtype: str) -> torch.Tensor | None:
    """``tensor`` as float16 when ``array_dtype`` asks for it and no finite value overflows; else None."""
    if array_dtype != "float16" or tensor.dtype not in (torch.float32, torch.float64):
        return None
    half = tensor.to(torch.float16)
    overflows = bool((torch.isfinite(tensor) & ~torch.isfinite(half)).any())
    return None if overflows else half


def _encode_array(
    name: str, value: torch.Tensor | np.ndarray, sections: list[bytes], allow_nonfinite: bool, array_dtype: str
) -> dict:
    tensor = torch.as_tensor(value).detach().cpu().contiguous()
    if tensor.dtype not in ARRAY_DTYPES:
        raise DeepShrinkError(f"{name}: dtype {tensor.dtype} cannot be stored; allowed: {', '.join(_TORCH_DTYPES)}")
    if tensor.is_floating_point() and not allow_nonfinite:
        _refuse_nonfinite(bool(torch.isfinite(tensor).all()), name, "the array")
    entry = {"name": name, "kind": "array"}
    rounded = _rounded(tensor, array_dtype)
    if rounded is not None:
        entry["cast"] = ARRAY_DTYPES[tensor.dtype]  # the dtype the reader gives back
        tensor = rounded
    raw = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor  # numpy has no bfloat16
    sections.append(raw.numpy().astype(raw.numpy().dtype.newbyteorder("<"), copy=False).tobytes())
    return {**entry, "dtype": ARRAY_DTYPES[tensor.dtype], "shape": list(tensor.shape), "s": len(sections) - 1}


def encode_file(
    tensors: dict[str, CompressedTensor],
    arrays: dict[str, torch.Tensor | np.ndarray],
    options: EncodeOptions = EncodeOptions(),
    model: dict | None = None,
    metadata: dict | None = None,
    deflate_header: bool = True,
    allow_nonfinite: bool = False,
) -> bytes:
    """Serialise tensors and arrays into the bytes of a ``.dsz`` file.

    ``deflate_header=False`` keeps the JSON header readable in the file (tests pin such bytes).
    ``allow_nonfinite=True`` stores NaN and infinity (a reader then needs it too).

    Raises:
        DeepShrinkError: a name appears twice, a dtype cannot be stored, a value
            is NaN or infinite, the metadata is not JSON, or the header is over
            its caps (bytes, JSON values).
    """
    clash = set(tensors) & set(arrays)
    if clash:
        raise DeepShrinkError(f"names given both as compressed tensor and plain array: {sorted(clash)}")
    unknown = set(options.index_bits) - set(tensors) if isinstance(options.index_bits, dict) else set()
    if unknown:
        raise DeepShrinkError(f"index_bits names {sorted(unknown)}, which are not compressed tensors; "
                              f"they are: {', '.join(tensors) or 'none'}")  # fmt: skip
    sections: list[bytes] = []
    entries = [
        _encode_compressed(n, ct, options, sections, allow_nonfinite) for n, ct in track(tensors.items(), "encoding")
    ]
    entries += [_encode_array(n, a, sections, allow_nonfinite, options.array_dtype) for n, a in arrays.items()]
    header = {"tensors": entries, "model": model, "meta": metadata or {}, "sections": section_table(sections)}
    try:
        header_bytes = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as err:
        raise DeepShrinkError(f"model kwargs and metadata must be plain JSON data: {err}") from err
    if len(header_bytes) > MAX_HEADER_BYTES or json_values(header_bytes) > MAX_HEADER_VALUES:
        raise DeepShrinkError(f"header of {len(header_bytes):,} bytes and {json_values(header_bytes):,} JSON values "
                              f"exceeds a cap ({MAX_HEADER_BYTES:,} bytes, {MAX_HEADER_VALUES:,} values): too many "
                              "tensors, or metadata to store as one string")  # fmt: skip
    return pack_container(header_bytes, sections, deflate_header)


def section_table(sections: Sequence[bytes]) -> list[list[int]]:
    """The header's ``sections`` field: ``[length, crc32]`` of each section."""
    return [[len(s), zlib.crc32(s)] for s in sections]


def pack_container(header_json: bytes, sections: Sequence[bytes], deflate_header: bool = True) -> bytes:
    """Frame a JSON header (whose section table is filled in) and the sections: the bytes of a file.

    :func:`encode_file` ends here; tools that build files to test a reader
    (``benchmarks/bench_fuzz.py``) start here, with every checksum right.
    """
    flags = FLAG_DEFLATED_HEADER if deflate_header else 0
    stored = zlib.compress(header_json, 9) if deflate_header else header_json
    prelude = PRELUDE.pack(MAGIC, FORMAT_VERSION, flags, len(stored), zlib.crc32(stored))
    return b"".join([prelude, stored, *sections])


# -- reading ------------------------------------------------------------------


def show_value(value: object) -> str:
    """A value from a file for an error message: its repr, cut short (a file may hold megabytes in one field)."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text):,} characters)"


def _get(obj: dict, key: str, kind: type, where: str) -> object:
    """``obj[key]`` if it has type ``kind`` (bools are not ints here), else a FileFormatError."""
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise FileFormatError(f"{where}: field {key!r} is missing or not {getattr(kind, '__name__', kind)}")
    return value


def _count(obj: dict, key: str, where: str, limit: int = MAX_SHAPE_ELEMENTS) -> int:
    value = _get(obj, key, int, where)
    if not 0 <= value <= limit:
        raise FileFormatError(f"{where}: {key}={show_value(value)} is outside 0..{limit}")
    return value


def _shape(entry: dict, where: str) -> tuple[int, ...]:
    """The entry's shape: at most 16 dims, each and the product of the non-zero ones at most 2**48.

    A zero dimension makes the product 0, so every dimension is bounded on its own too:
    ``[2**64, 0]`` is refused here, not by whatever reshapes it later.
    """
    shape = _get(entry, "shape", list, where)
    if len(shape) > MAX_DIMS or not all(type(d) is int and 0 <= d <= MAX_SHAPE_ELEMENTS for d in shape):
        raise FileFormatError(f"{where}: shape {show_value(shape)} is not a list of at most {MAX_DIMS} ints in "
                              f"0..{MAX_SHAPE_ELEMENTS}")  # fmt: skip
    if math.prod(d for d in shape if d) > MAX_SHAPE_ELEMENTS:
        raise FileFormatError(f"{where}: shape {shape} claims {math.prod(shape)} elements, over {MAX_SHAPE_ELEMENTS}")
    return tuple(shape)


def _inflate(stored: bytes) -> bytes:
    """Inflate a header, never past MAX_HEADER_BYTES (a deflate bomb stops there)."""
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(stored, MAX_HEADER_BYTES)
    except zlib.error as err:
        raise FileFormatError(f"header does not inflate: {err}") from err
    if not inflater.eof or inflater.unconsumed_tail or inflater.unused_data:
        raise FileFormatError(f"header inflates past the cap of {MAX_HEADER_BYTES} bytes or has trailing bytes")
    return text


def json_values(text: bytes) -> int:
    """An upper bound on the values and keys in a JSON text: each follows a ``,``, ``[`` or ``{``, or is the first.

    Parsing costs up to ~100 bytes of Python objects per value whatever the
    text, so the reader bounds this count before parsing, not after.
    """
    return text.count(b",") + text.count(b"[") + text.count(b"{") + 1


def _parse_header(text: bytes) -> dict:
    values = json_values(text)
    if values > MAX_HEADER_VALUES:
        raise FileFormatError(f"header holds up to {values:,} JSON values, over the cap of {MAX_HEADER_VALUES:,}")
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise FileFormatError(f"header is not valid JSON: {err}") from err
    if not isinstance(header, dict):
        raise FileFormatError("header is not a JSON object")
    return header


def split_container(data: bytes) -> tuple[dict, list[int]]:
    """Check the prelude, header and section table; return the header and the sections' bounds.

    Returns:
        ``(header, bounds)``: section ``i`` is ``data[bounds[i]:bounds[i + 1]]``.

    Raises:
        FileFormatError: wrong magic or version, a header or section that does
            not fit in the file, more JSON values than the cap, a checksum
            mismatch, or bytes left over.
    """
    if len(data) < PRELUDE.size:
        raise FileFormatError(f"file of {len(data)} bytes is shorter than the {PRELUDE.size}-byte prelude")
    magic, version, flags, header_len, header_crc = PRELUDE.unpack_from(data)
    if magic != MAGIC:
        raise FileFormatError(f"not a deepshrink file: magic {magic!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION or flags & ~FLAG_DEFLATED_HEADER:
        raise FileFormatError(f"format version {version} (flags {flags}) is not supported; this reader reads version "
                              f"{FORMAT_VERSION} with flags 0 or {FLAG_DEFLATED_HEADER}")  # fmt: skip
    if header_len > min(MAX_HEADER_BYTES, len(data) - PRELUDE.size):
        raise FileFormatError(f"header claims {header_len} bytes but the file has {len(data) - PRELUDE.size} "
                              f"after the prelude (cap {MAX_HEADER_BYTES})")  # fmt: skip
    header_bytes = bytes(data[PRELUDE.size : PRELUDE.size + header_len])
    if zlib.crc32(header_bytes) != header_crc:
        raise FileFormatError("header checksum mismatch: the file is damaged")
    header = _parse_header(_inflate(header_bytes) if flags & FLAG_DEFLATED_HEADER else header_bytes)
    table = _get(header, "sections", list, "header")
    entries = _get(header, "tensors", list, "header")
    if len(table) > SECTIONS_PER_TENSOR * len(entries):  # before the loop: its length is the file's word
        raise FileFormatError(f"{len(table):,} sections for {len(entries):,} tensors; each uses at most "
                              f"{SECTIONS_PER_TENSOR}")  # fmt: skip
    view, bounds = memoryview(data), [PRELUDE.size + header_len]
    for i, item in enumerate(table):
        if not (isinstance(item, list) and len(item) == 2 and all(type(v) is int and v >= 0 for v in item)):
            raise FileFormatError(f"section {i}: entry {show_value(item)} is not [length, crc32]")
        length, crc = item
        offset = bounds[-1]
        if length > len(data) - offset:  # compared before any slicing; Python ints cannot overflow
            raise FileFormatError(f"section {i} claims {length} bytes but only {len(data) - offset} remain: truncated")
        if zlib.crc32(view[offset : offset + length]) != crc:
            raise FileFormatError(f"section {i} checksum mismatch: the file is damaged")
        bounds.append(offset + length)
    if bounds[-1] != len(data):
        raise FileFormatError(f"{len(data) - bounds[-1]} bytes after the last section")
    return header, bounds


@dataclass
class _Reader:
    """One file being decoded: its sections, which of them are used, and what it may still allocate."""

    data: memoryview
    bounds: list[int]
    budget: DecodeBudget
    allow_nonfinite: bool
    used: set[int] = field(default_factory=set)

    def section(self, ref: dict, where: str) -> memoryview:
        """The section ``ref["s"]`` names; each may be used once."""
        n = len(self.bounds) - 1
        index = _count(ref, "s", where, n - 1) if n else -1
        if index < 0 or index in self.used:
            raise FileFormatError(f"{where}: section {index} is missing or used twice")
        self.used.add(index)
        return self.data[self.bounds[index] : self.bounds[index + 1]]

    def stream(self, ref: dict, where: str) -> np.ndarray:
        """Decode the stream ``ref`` describes (symbols charged to the budget before they are made)."""
        data = self.section(ref, where)
        coder, n, k, t = (_get(ref, "coder", str, where), _count(ref, "n", where), _count(ref, "k", where),
                          _count(ref, "t", where))  # fmt: skip
        try:
            return decode_stream(coder, n, k, t, np.frombuffer(data, dtype=np.uint8), self.budget)
        except FileFormatError as err:
            raise FileFormatError(f"{where}: {err}") from err

    def charge(self, n: int, where: str, what: str) -> None:
        self.budget.charge(n, f"{where}: {what}")

    def check_finite(self, finite: bool, where: str, what: str) -> None:
        if not finite and not self.allow_nonfinite:
            raise FileFormatError(f"{where}: {what} holds NaN or infinity; pass allow_nonfinite=True to read it anyway")


def _decode_positions(entry: dict, numel: int, nnz: int, reader: _Reader, where: str) -> np.ndarray:
    """The kept positions, counted before they are allocated (the count must be ``nnz``)."""
    ref = _get(entry, "index", dict, where)
    layout = _get(ref, "layout", str, where)
    if layout == "bitmap":
        if _count(ref, "n", where) != -(-numel // BITMAP_GROUP):
            raise FileFormatError(f"{where}: bitmap of {ref['n']} nibbles does not cover {numel} weights")
        nibbles = reader.stream(ref, where)
        if nibbles.size and nibbles.max() >= 1 << BITMAP_GROUP:
            raise FileFormatError(f"{where}: bitmap symbol over {BITMAP_GROUP} bits")
        kept = kernels.bitmap_count(nibbles)
        _check_kept(kept, nnz, where)
        reader.charge(kept, where, "positions")
        positions, status = kernels.bitmap_positions(nibbles, np.int64(numel), np.int64(kept))
        if status != kernels.OK:
            raise FileFormatError(f"{where}: bitmap has bits set past the tensor's end")
        return positions
    if layout not in ("relative", "holes"):
        raise FileFormatError(f"{where}: unknown index layout {show_value(layout)} (relative, bitmap or holes)")
    index_bits = _count(ref, "ib", where, 16)
    stream = reader.stream(ref, where)
    if index_bits < 1 or (stream.size and int(stream.max()) >= 1 << index_bits):
        raise FileFormatError(f"{where}: a relative index does not fit in ib={index_bits} bits")
    listed = int(kernels.relative_count(stream, np.int64((1 << index_bits) - 1)))
    if layout == "relative":
        _check_kept(listed, nnz, where)
        reader.charge(nnz, where, "positions")
        return decode_relative(stream, index_bits)
    _check_kept(numel - listed, nnz, where)
    reader.charge(listed + nnz, where, "holes and positions")
    holes = decode_relative(stream, index_bits)
    if holes.size and holes[-1] >= numel:
        raise FileFormatError(f"{where}: a hole at {int(holes[-1])} is past the tensor's end ({numel} weights)")
    return kernels.complement_positions(holes, np.int64(numel))


def _declared(entry: dict, where: str) -> int:
    """The elements a header entry says decoding it makes, its fields checked for type and range.

    Summed over the file and compared with the budget before anything is
    decoded, so an over-budget file costs no memory at all; decoding then
    checks that every stream holds exactly what its entry declares.
    """
    kind = _get(entry, "kind", str, where)
    shape = _shape(entry, where)
    if kind == "array":
        return math.prod(shape)
    if kind != "compressed":
        raise FileFormatError(f"{where}: unknown kind {show_value(kind)} (compressed or array)")
    streams = [_count(_get(entry, key, dict, where), "n", where) for key in ("index", "codes")]
    book = _count(_get(entry, "codebook", dict, where), "k", where, 1 << MAX_CODE_BITS)
    return sum(streams) + _count(entry, "nnz", where) + book


def _check_kept(kept: int, nnz: int, where: str) -> None:
    if kept != nnz:
        raise FileFormatError(f"{where}: nnz={nnz} but the index stream holds {kept} positions")


def _decode_compressed(entry: dict, reader: _Reader, where: str) -> CompressedTensor:
    shape = _shape(entry, where)
    nnz, bits = _count(entry, "nnz", where), _count(entry, "bits", where, MAX_CODE_BITS)
    codes_ref = _get(entry, "codes", dict, where)
    if _count(codes_ref, "n", where) != nnz:
        raise FileFormatError(f"{where}: nnz={nnz} but the codes stream holds {codes_ref['n']} codes")
    positions = _decode_positions(entry, math.prod(shape), nnz, reader, where)
    codes = reader.stream(codes_ref, where)
    book = _get(entry, "codebook", dict, where)
    dtype = CODEBOOK_DTYPES.get(_get(book, "dtype", str, where))
    data = reader.section(book, where)
    if dtype is None or len(data) != _count(book, "k", where, 1 << MAX_CODE_BITS) * np.dtype(dtype).itemsize:
        raise FileFormatError(f"{where}: codebook dtype {show_value(book['dtype'])} or size {len(data)} bytes is wrong")
    reader.charge(book["k"], where, "codebook")
    codebook = np.frombuffer(data, dtype=dtype).astype(np.float32)
    reader.check_finite(bool(np.isfinite(codebook).all()), where, "the codebook")
    try:  # the tensor checks the arithmetic too
        return CompressedTensor(shape, positions, codes, codebook, bits, entry.get("arithmetic", "float32"))
    except DeepShrinkError as err:
        raise FileFormatError(f"{where}: {err}") from err


def _decode_array(entry: dict, reader: _Reader, where: str) -> torch.Tensor:
    shape = _shape(entry, where)
    dtype = _TORCH_DTYPES.get(_get(entry, "dtype", str, where))
    if dtype is None:
        raise FileFormatError(f"{where}: dtype {show_value(entry['dtype'])} is not one of {', '.join(_TORCH_DTYPES)}")
    data = reader.section(entry, where)
    storage = torch.int16 if dtype == torch.bfloat16 else dtype
    itemsize = torch.empty(0, dtype=storage).element_size()
    if len(data) != math.prod(shape) * itemsize:  # checked before the array is made
        raise FileFormatError(f"{where}: shape {list(shape)} of {entry['dtype']} needs {math.prod(shape) * itemsize} "
                              f"bytes but the section holds {len(data)}")  # fmt: skip
    reader.charge(math.prod(shape), where, "array elements")
    np_dtype = torch.empty(0, dtype=storage).numpy().dtype.newbyteorder("<")
    tensor = torch.from_numpy(np.frombuffer(data, dtype=np_dtype).astype(np_dtype.newbyteorder("="))).reshape(shape)
    tensor = tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor
    if tensor.is_floating_point():
        reader.check_finite(bool(torch.isfinite(tensor).all()), where, "the array")
    if "cast" in entry:
        tensor = tensor.to(_cast(entry, where))
    return tensor


def _cast(entry: dict, where: str) -> torch.dtype:
    """The dtype an array stored rounded to float16 is given back in (its ``cast`` field)."""
    cast = _get(entry, "cast", str, where)
    if entry["dtype"] != "float16" or cast not in ("float32", "float64"):
        raise FileFormatError(f"{where}: cast {show_value(cast)} of a {entry['dtype']} array; only float16 arrays "
                              "are cast, to float32 or float64")  # fmt: skip
    return _TORCH_DTYPES[cast]


def decode_file(data: bytes, *, max_elements: int | None = None, allow_nonfinite: bool | None = None) -> DszContents:
    """Parse and fully validate the bytes of a ``.dsz`` file.

    Args:
        data: the file's bytes.
        max_elements: the most elements decoding may allocate (symbols,
            positions, codes, array elements, decode tables), checked before
            each allocation; raise it for a file you trust that needs more.
            Default: :func:`read_limits`'s (``2**26``).
        allow_nonfinite: accept NaN and infinity in codebooks and float arrays
            (default: :func:`read_limits`'s, False).

    Raises:
        FileFormatError: naming the problem and, where there is one, the tensor.
    """
    limits = current_limits(max_elements, allow_nonfinite)
    header, bounds = split_container(data)
    reader = _Reader(memoryview(data), bounds, DecodeBudget(limits.max_elements), limits.allow_nonfinite)
    places = [
        f"tensor {show_value(_get(entry, 'name', str, f'tensor {i}'))}" for i, entry in enumerate(header["tensors"])
    ]
    declared = sum(_declared(entry, where) for entry, where in zip(header["tensors"], places))
    reader.budget.require(declared, "the file's tensors")
    tensors, arrays = {}, {}
    for entry, where in track(list(zip(header["tensors"], places)), "decoding"):
        name = entry["name"]
        if name in tensors or name in arrays:
            raise FileFormatError(f"{where} appears twice")
        if entry["kind"] == "compressed":
            tensors[name] = _decode_compressed(entry, reader, where)
        else:
            arrays[name] = _decode_array(entry, reader, where)
    if len(reader.used) != len(bounds) - 1:
        raise FileFormatError(f"{len(bounds) - 1 - len(reader.used)} sections belong to no tensor")
    model = header.get("model")
    if model is not None and not isinstance(model, dict):
        raise FileFormatError("header field 'model' is not an object")
    return DszContents(tensors, arrays, model, _get(header, "meta", dict, "header"), header)


def check_dense(contents: DszContents, purpose: str, max_elements: int | None = None) -> int:
    """Check what decoding every tensor of a file densely allocates (export, a model built for it, the simulator).

    A 250-byte file can name a 2**20 x 2**20 weight that keeps no element: its
    compressed form is empty, its dense form 4 TiB.

    Args:
        contents: a read file.
        purpose: what needs them dense, for the message.
        max_elements: the limit (default: :func:`read_limits`'s).

    Returns:
        The dense elements.

    Raises:
        FileFormatError: they are over ``max_elements``.
    """
    max_elements = current_limits(max_elements).max_elements
    dense = sum(ct.numel for ct in contents.tensors.values()) + sum(a.numel() for a in contents.arrays.values())
    if dense > max_elements:
        raise FileFormatError(f"{purpose} needs the file's tensors dense: {dense:,} elements, over max_elements="
                              f"{max_elements:,}; if you trust this file, pass a larger max_elements "
                              "(--max-elements on the command line)")  # fmt: skip
    return dense
