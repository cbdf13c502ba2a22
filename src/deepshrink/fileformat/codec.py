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

import json
import math
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

from deepshrink.coding.relative import decode_relative, encode_relative
from deepshrink.coding.streams import EncodedStream, check_coder, decode_stream, encode_stream
from deepshrink.errors import DeepShrinkError, FileFormatError
from deepshrink.progress import track
from deepshrink.tensor import MAX_CODE_BITS, CompressedTensor

MAGIC = b"DSHRINK\x00"
FORMAT_VERSION = 1
PRELUDE = struct.Struct("<8sHHII")  # magic, version, flags, header length, header crc32
FLAG_DEFLATED_HEADER = 1  # names and CRC digits deflate to about a third: 1 KB of a 30 KB LeNet file
MAX_HEADER_BYTES = 16 << 20  # a header is names and small numbers: about 300 bytes a tensor
MAX_ELEMENTS = 1 << 48  # no tensor shape may claim more (products are checked in Python ints)
DEFAULT_INDEX_BITS = {"fc": 5, "conv": 8}  # Deep Compression: 5 bits for fully connected, 8 for conv
LAYOUTS = ("auto", "relative", "bitmap")
CODEBOOK_DTYPES = {"float32": "<f4", "float16": "<f2"}
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
        layout: positions as ``"relative"`` indices, a ``"bitmap"``, or
            ``"auto"``: whichever is smaller for each tensor.
        codebook_dtype: ``"float32"`` (exact) or ``"float16"`` (rounds the codebook).
    """

    coder: str = "huffman"
    index_bits: int | dict[str, int] | None = None
    layout: str = "auto"
    codebook_dtype: str = "float32"

    def __post_init__(self) -> None:
        check_coder(self.coder)
        if self.layout not in LAYOUTS:
            raise DeepShrinkError(f"layout={self.layout!r} must be one of {', '.join(map(repr, LAYOUTS))}")
        if self.codebook_dtype not in CODEBOOK_DTYPES:
            raise DeepShrinkError(f"codebook_dtype={self.codebook_dtype!r} must be one of {', '.join(CODEBOOK_DTYPES)}")
        per_tensor = self.index_bits.values() if isinstance(self.index_bits, dict) else [self.index_bits]
        for bits in per_tensor:
            if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16):
                raise DeepShrinkError(f"index_bits={bits!r} must be an integer in 1..16")

    def index_bits_for(self, name: str, ct: CompressedTensor) -> int:
        """The relative-index width of tensor ``name``."""
        bits = self.index_bits.get(name) if isinstance(self.index_bits, dict) else self.index_bits
        return bits if bits is not None else DEFAULT_INDEX_BITS["conv" if len(ct.shape) > 2 else "fc"]


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


def encode_positions(ct: CompressedTensor, index_bits: int, layout: str, coder: str) -> tuple[str, EncodedStream]:
    """Code a tensor's positions as relative indices or a bitmap (the smaller under ``"auto"``).

    Returns:
        ``(layout, stream)`` with the layout actually used.
    """
    candidates = []
    if layout in ("auto", "relative"):
        candidates.append(("relative", encode_stream(encode_relative(ct.positions, index_bits), coder, index_bits)))
    if layout in ("auto", "bitmap"):
        candidates.append(("bitmap", encode_stream(_bitmap_symbols(ct), coder, BITMAP_GROUP)))
    return min(candidates, key=lambda c: c[1].nbytes)  # ties keep relative, the paper's layout


def _encode_compressed(name: str, ct: CompressedTensor, options: EncodeOptions, sections: list[bytes]) -> dict:
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
    return entry


def _encode_array(name: str, value: torch.Tensor | np.ndarray, sections: list[bytes]) -> dict:
    tensor = torch.as_tensor(value).detach().cpu().contiguous()
    if tensor.dtype not in ARRAY_DTYPES:
        raise DeepShrinkError(f"{name}: dtype {tensor.dtype} cannot be stored; allowed: {', '.join(_TORCH_DTYPES)}")
    raw = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor  # numpy has no bfloat16
    sections.append(raw.numpy().astype(raw.numpy().dtype.newbyteorder("<"), copy=False).tobytes())
    return {"name": name, "kind": "array", "dtype": ARRAY_DTYPES[tensor.dtype], "shape": list(tensor.shape),
            "s": len(sections) - 1}  # fmt: skip


def encode_file(
    tensors: dict[str, CompressedTensor],
    arrays: dict[str, torch.Tensor | np.ndarray],
    options: EncodeOptions = EncodeOptions(),
    model: dict | None = None,
    metadata: dict | None = None,
    deflate_header: bool = True,
) -> bytes:
    """Serialise tensors and arrays into the bytes of a ``.dsz`` file.

    ``deflate_header=False`` keeps the JSON header readable in the file (tests pin such bytes).

    Raises:
        DeepShrinkError: a name appears twice, a dtype cannot be stored, or the
            metadata is not JSON.
    """
    clash = set(tensors) & set(arrays)
    if clash:
        raise DeepShrinkError(f"names given both as compressed tensor and plain array: {sorted(clash)}")
    unknown = set(options.index_bits) - set(tensors) if isinstance(options.index_bits, dict) else set()
    if unknown:
        raise DeepShrinkError(f"index_bits names {sorted(unknown)}, which are not compressed tensors; "
                              f"they are: {', '.join(tensors) or 'none'}")  # fmt: skip
    sections: list[bytes] = []
    entries = [_encode_compressed(n, ct, options, sections) for n, ct in track(tensors.items(), "encoding")]
    entries += [_encode_array(n, a, sections) for n, a in arrays.items()]
    header = {"tensors": entries, "model": model, "meta": metadata or {},
              "sections": [[len(s), zlib.crc32(s)] for s in sections]}  # fmt: skip
    try:
        header_bytes = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as err:
        raise DeepShrinkError(f"model kwargs and metadata must be plain JSON data: {err}") from err
    if len(header_bytes) > MAX_HEADER_BYTES:
        raise DeepShrinkError(f"header of {len(header_bytes)} bytes exceeds the cap of {MAX_HEADER_BYTES}")
    flags = FLAG_DEFLATED_HEADER if deflate_header else 0
    stored = zlib.compress(header_bytes, 9) if deflate_header else header_bytes
    prelude = PRELUDE.pack(MAGIC, FORMAT_VERSION, flags, len(stored), zlib.crc32(stored))
    return b"".join([prelude, stored, *sections])


# -- reading ------------------------------------------------------------------


def _get(obj: dict, key: str, kind: type, where: str) -> object:
    """``obj[key]`` if it has type ``kind`` (bools are not ints here), else a FileFormatError."""
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise FileFormatError(f"{where}: field {key!r} is missing or not {getattr(kind, '__name__', kind)}")
    return value


def _count(obj: dict, key: str, where: str, limit: int = MAX_ELEMENTS) -> int:
    value = _get(obj, key, int, where)
    if not 0 <= value <= limit:
        raise FileFormatError(f"{where}: {key}={value} is outside 0..{limit}")
    return value


def _shape(entry: dict, where: str) -> tuple[int, ...]:
    shape = _get(entry, "shape", list, where)
    if len(shape) > 16 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise FileFormatError(f"{where}: shape {shape} is not a list of at most 16 non-negative ints")
    if math.prod(shape) > MAX_ELEMENTS:
        raise FileFormatError(f"{where}: shape {shape} claims {math.prod(shape)} elements, over {MAX_ELEMENTS}")
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


def split_container(data: bytes) -> tuple[dict, list[memoryview]]:
    """Check the prelude, header and section table; return the header and each section's bytes.

    Raises:
        FileFormatError: wrong magic or version, a header or section that does
            not fit in the file, a checksum mismatch, or bytes left over.
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
    if flags & FLAG_DEFLATED_HEADER:
        header_bytes = _inflate(header_bytes)
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise FileFormatError(f"header is not valid JSON: {err}") from err
    table = _get(header, "sections", list, "header")
    view, offset, sections = memoryview(data), PRELUDE.size + header_len, []
    for i, item in enumerate(table):
        if not (isinstance(item, list) and len(item) == 2 and all(type(v) is int and v >= 0 for v in item)):
            raise FileFormatError(f"section {i}: entry {item!r} is not [length, crc32]")
        length, crc = item
        if length > len(data) - offset:  # compared before any slicing; Python ints cannot overflow
            raise FileFormatError(f"section {i} claims {length} bytes but only {len(data) - offset} remain: truncated")
        sections.append(view[offset : offset + length])
        if zlib.crc32(sections[-1]) != crc:
            raise FileFormatError(f"section {i} checksum mismatch: the file is damaged")
        offset += length
    if offset != len(data):
        raise FileFormatError(f"{len(data) - offset} bytes after the last section")
    return header, sections


def _section(sections: list[memoryview], used: set[int], ref: dict, where: str) -> memoryview:
    index = _count(ref, "s", where, len(sections) - 1) if sections else -1
    if index < 0 or index in used:
        raise FileFormatError(f"{where}: section {index} is missing or used twice")
    used.add(index)
    return sections[index]


def _decode_stream(ref: dict, sections: list[memoryview], used: set[int], where: str) -> np.ndarray:
    data = _section(sections, used, ref, where)
    return decode_stream(_get(ref, "coder", str, where), _count(ref, "n", where), _count(ref, "k", where),
                         _count(ref, "t", where), np.frombuffer(data, dtype=np.uint8))  # fmt: skip


def _decode_positions(entry: dict, numel: int, sections: list[memoryview], used: set[int], where: str) -> np.ndarray:
    ref = _get(entry, "index", dict, where)
    layout = _get(ref, "layout", str, where)
    if layout == "bitmap":
        if _count(ref, "n", where) != -(-numel // BITMAP_GROUP):
            raise FileFormatError(f"{where}: bitmap of {ref['n']} nibbles does not cover {numel} weights")
        nibbles = _decode_stream(ref, sections, used, where).astype(np.uint8)
        if nibbles.size and nibbles.max() >= 1 << BITMAP_GROUP:
            raise FileFormatError(f"{where}: bitmap symbol over {BITMAP_GROUP} bits")
        bits = np.unpackbits(nibbles[:, None], axis=1)[:, 8 - BITMAP_GROUP :].reshape(-1)
        if bits[numel:].any():
            raise FileFormatError(f"{where}: bitmap has bits set past the tensor's end")
        return np.flatnonzero(bits)
    if layout != "relative":
        raise FileFormatError(f"{where}: unknown index layout {layout!r} (relative or bitmap)")
    index_bits = _count(ref, "ib", where, 16)
    stream = _decode_stream(ref, sections, used, where)
    if index_bits < 1 or (stream.size and int(stream.max()) >= 1 << index_bits):
        raise FileFormatError(f"{where}: a relative index does not fit in ib={index_bits} bits")
    return decode_relative(stream, index_bits)


def _decode_compressed(entry: dict, sections: list[memoryview], used: set[int], where: str) -> CompressedTensor:
    shape = _shape(entry, where)
    nnz, bits = _count(entry, "nnz", where), _count(entry, "bits", where, MAX_CODE_BITS)
    positions = _decode_positions(entry, math.prod(shape), sections, used, where)
    codes_ref = _get(entry, "codes", dict, where)
    if positions.size != nnz or _count(codes_ref, "n", where) != nnz:
        raise FileFormatError(f"{where}: nnz={nnz} but {positions.size} positions and {codes_ref['n']} codes")
    codes = _decode_stream(codes_ref, sections, used, where)
    book = _get(entry, "codebook", dict, where)
    dtype = CODEBOOK_DTYPES.get(_get(book, "dtype", str, where))
    data = _section(sections, used, book, where)
    if dtype is None or len(data) != _count(book, "k", where, 1 << MAX_CODE_BITS) * np.dtype(dtype).itemsize:
        raise FileFormatError(f"{where}: codebook dtype {book['dtype']!r} or size {len(data)} bytes is wrong")
    codebook = np.frombuffer(data, dtype=dtype).astype(np.float32)
    try:
        return CompressedTensor(shape, positions, codes, codebook, bits)
    except DeepShrinkError as err:
        raise FileFormatError(f"{where}: {err}") from err


def _decode_array(entry: dict, sections: list[memoryview], used: set[int], where: str) -> torch.Tensor:
    shape = _shape(entry, where)
    dtype = _TORCH_DTYPES.get(_get(entry, "dtype", str, where))
    if dtype is None:
        raise FileFormatError(f"{where}: dtype {entry['dtype']!r} is not one of {', '.join(_TORCH_DTYPES)}")
    data = _section(sections, used, entry, where)
    storage = torch.int16 if dtype == torch.bfloat16 else dtype
    itemsize = torch.empty(0, dtype=storage).element_size()
    if len(data) != math.prod(shape) * itemsize:  # checked before the array is made
        raise FileFormatError(f"{where}: shape {list(shape)} of {entry['dtype']} needs {math.prod(shape) * itemsize} "
                              f"bytes but the section holds {len(data)}")  # fmt: skip
    np_dtype = torch.empty(0, dtype=storage).numpy().dtype.newbyteorder("<")
    tensor = torch.from_numpy(np.frombuffer(data, dtype=np_dtype).astype(np_dtype.newbyteorder("="))).reshape(shape)
    return tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor


def decode_file(data: bytes) -> DszContents:
    """Parse and fully validate the bytes of a ``.dsz`` file.

    Raises:
        FileFormatError: naming the problem and, where there is one, the tensor.
    """
    header, sections = split_container(data)
    used: set[int] = set()
    tensors, arrays = {}, {}
    for i, entry in enumerate(track(_get(header, "tensors", list, "header"), "decoding")):
        name = _get(entry, "name", str, f"tensor {i}")
        where = f"tensor {name!r}"
        if name in tensors or name in arrays:
            raise FileFormatError(f"{where} appears twice")
        kind = _get(entry, "kind", str, where)
        if kind == "compressed":
            tensors[name] = _decode_compressed(entry, sections, used, where)
        elif kind == "array":
            arrays[name] = _decode_array(entry, sections, used, where)
        else:
            raise FileFormatError(f"{where}: unknown kind {kind!r} (compressed or array)")
    if len(used) != len(sections):
        raise FileFormatError(f"{len(sections) - len(used)} sections belong to no tensor")
    model = header.get("model")
    if model is not None and not isinstance(model, dict):
        raise FileFormatError("header field 'model' is not an object")
    return DszContents(tensors, arrays, model, _get(header, "meta", dict, "header"), header)
