"""safetensors files: a writer that shards like Hugging Face (files + .index.json), a reader that validates.

Both sides handle the format themselves (8-byte little-endian header length, a JSON header, then the raw
little-endian tensor bytes), because safetensors' numpy API has no bfloat16; files are byte-compatible with
safetensors' own writer (tests read them back with ``safe_open``). The metadata always carries ``"format": "pt"``:
transformers' loader refuses a file without it. Listing and checking a folder's tensors reads only headers;
arrays are memory-mapped one at a time.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterable, Iterator

import ml_dtypes
import numpy as np

from graphq.errors import GraphqError

DTYPE_NAMES = {
    np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.int16): "I16", np.dtype(np.int32): "I32",
    np.dtype(np.int64): "I64", np.dtype(np.float16): "F16", np.dtype(np.float32): "F32", np.dtype(np.float64): "F64",
    np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.bool_): "BOOL",
}
NUMPY_OF_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}
BYTES_PER_ELEMENT = {"I8": 1, "U8": 1, "I16": 2, "I32": 4, "I64": 8, "F16": 2, "BF16": 2, "F32": 4, "F64": 8, "BOOL": 1}
#: transformers' safetensors loader refuses a file whose metadata lacks format "pt" (or "np"/"flax"/"mlx").
FORMAT_METADATA = {"format": "pt"}


def save_file(tensors: dict[str, np.ndarray], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file for numpy arrays of any DTYPE_NAMES type (bfloat16 included), tensors written in
    name order as safetensors sorts them; ``format: pt`` is added to the metadata."""
    header: dict[str, object] = {"__metadata__": {**FORMAT_METADATA, **{k: str(v) for k, v in (metadata or {}).items()}}}
    offset = 0
    ordered = sorted(tensors.items())
    for name, array in ordered:
        if array.dtype not in DTYPE_NAMES:
            raise GraphqError(f"{name} has dtype {array.dtype}, which safetensors cannot store")
        header[name] = {"dtype": DTYPE_NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for _, array in ordered:
            array = np.ascontiguousarray(array)
            f.write(array.view(np.uint8).reshape(-1).data if array.size else b"")
GB = 10**9  # --part-file-size counts decimal gigabytes, as Hugging Face's max_shard_size does


def _normal_permissions(path: Path) -> None:
    """safetensors creates files private (0600); give them the permissions of any other output file."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def _sort_header_metadata(path: Path) -> None:
    """Rewrite the header's ``__metadata__`` with its keys sorted, in place, so two identical runs write equal bytes.

    safetensors keeps the metadata in a hash map and writes it in a different order every process; the header is
    otherwise deterministic. The sorted header has the same length (the same keys and values, compact JSON), padded
    with spaces as safetensors pads it."""
    with open(path, "r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        if "__metadata__" not in header:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        ordered = {"__metadata__": header.pop("__metadata__"), **header}
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > length:
            raise GraphqError(f"cannot sort the safetensors header of {path}: it would grow")
        f.seek(8)
        f.write(text.ljust(length, b" "))


def _save(tensors: dict[str, np.ndarray], path: Path, metadata: dict[str, str]) -> None:
    try:
        save_file(tensors, str(path), metadata=metadata)
    except OSError:
        raise
    except Exception as exc:  # safetensors reports write errors (a full disk) as its own SafetensorError
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GraphqError(f"cannot write {path.name}: {first_line}; free some space or choose another place") from exc
    _sort_header_metadata(path)


def shard_name(stem: str, index: int, total: int) -> str:
    return f"{stem}-{index:05d}-of-{total:05d}.safetensors"


def index_name(stem: str) -> str:
    return f"{stem}.safetensors.index.json"


def write_safetensors(
    tensors: Iterable[tuple[str, np.ndarray]], out_dir: Path, stem: str, part_bytes: int | None = None,
    metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Write ``stem.safetensors``, or with ``part_bytes`` shards of at most that size (a larger tensor gets a shard
    of its own) plus ``stem.safetensors.index.json`` mapping each tensor to its shard. Returns the files written.

    Each shard is written as soon as it is full, so at most one shard's tensors are held at a time (``tensors`` may
    be a generator reading them lazily); shards get their final ``-0000i-of-0000n`` names once n is known.
    """
    metadata = {**FORMAT_METADATA, **(metadata or {})}
    if part_bytes is None:
        path = out_dir / f"{stem}.safetensors"
        _save({name: np.ascontiguousarray(a) for name, a in tensors}, path, metadata)
        _normal_permissions(path)
        return [path]
    pending: list[tuple[Path, list[str]]] = []
    shard: dict[str, np.ndarray] = {}
    size = total = 0

    def flush() -> None:
        path = out_dir / f".{stem}-part{len(pending) + 1:05d}.safetensors"
        _save(shard, path, metadata)
        pending.append((path, list(shard)))

    for name, array in tensors:
        array = np.ascontiguousarray(array)
        if shard and size + array.nbytes > part_bytes:
            flush()
            shard, size = {}, 0
        shard[name] = array
        size += array.nbytes
        total += array.nbytes
    if shard or not pending:
        flush()
    files: list[Path] = []
    weight_map: dict[str, str] = {}
    for i, (path, names) in enumerate(pending, start=1):
        final = out_dir / shard_name(stem, i, len(pending))
        path.rename(final)
        _normal_permissions(final)
        files.append(final)
        weight_map.update({name: final.name for name in names})
    index = {"metadata": {"total_size": total, **metadata}, "weight_map": weight_map}
    (out_dir / index_name(stem)).write_text(json.dumps(index, indent=2) + "\n")
    files.append(out_dir / index_name(stem))
    return files


def read_header(path: Path) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str]]:
    """(name -> (dtype, shape), metadata) from a safetensors file's header."""
    specs, metadata, _ = read_header_offsets(path)
    return specs, metadata


def read_header_offsets(path: Path) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str], dict[str, tuple[int, int]]]:
    """read_header plus each tensor's absolute (start, end) byte offsets in the file."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100 * 2**20:
                raise ValueError("header too large")
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error) as exc:
        raise GraphqError(f"{path} is not a readable safetensors file ({exc}): write the artifacts again") from exc
    metadata = header.pop("__metadata__", None) or {}
    try:
        specs = {name: (entry["dtype"], tuple(int(d) for d in entry["shape"])) for name, entry in header.items()}
        offsets = {name: (8 + length + entry["data_offsets"][0], 8 + length + entry["data_offsets"][1])
                   for name, entry in header.items()}
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise GraphqError(f"{path} has a malformed safetensors header ({exc}): write the artifacts again") from exc
    _check_byte_ranges(path, header, 8 + length)
    return specs, metadata, offsets


def _check_byte_ranges(path: Path, header: dict, data_start: int) -> None:
    """Every tensor's bytes lie inside the file and have the size its dtype and shape need.

    A truncated copy keeps a valid header; without this check it would be reported healthy and fail (or read
    garbage) only when the tensor is read."""
    data_size = path.stat().st_size - data_start
    for name, entry in header.items():
        try:
            begin, end = (int(v) for v in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise GraphqError(f"{path.name}: tensor {name} has no valid data_offsets: write the artifacts again") from None
        needed = int(np.prod(entry["shape"], dtype=np.int64)) * BYTES_PER_ELEMENT.get(entry["dtype"], 1)
        if not 0 <= begin <= end or end - begin != needed:
            raise GraphqError(
                f"{path.name}: tensor {name} spans bytes {begin}..{end} but its {entry['dtype']} {entry['shape']} "
                f"needs {needed}: the file is damaged, write the artifacts again"
            )
        if end > data_size:
            raise GraphqError(
                f"{path.name} is truncated: tensor {name} ends at byte {data_start + end} but the file has "
                f"{data_start + data_size} bytes; copy the file again"
            )


class SafetensorsStore:
    """The tensors of one artifact (a single file, or shards with their index), checked on opening."""

    def __init__(self, directory: Path, stem: str):
        self.directory = directory
        self.specs: dict[str, tuple[str, tuple[int, ...]]] = {}
        self.file_of: dict[str, Path] = {}
        self.metadata: dict[str, str] = {}
        self.offsets: dict[str, tuple[int, int]] = {}
        single = directory / f"{stem}.safetensors"
        index = directory / index_name(stem)
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                    raise TypeError("weight_map is not a mapping of tensor to file name")
            except (ValueError, KeyError, TypeError) as exc:
                raise GraphqError(f"{index} is not a safetensors index (no weight_map): write the artifacts again") from exc
            files: dict[str, list[str]] = {}
            for tensor, file in weight_map.items():
                files.setdefault(file, []).append(tensor)
            for file, names in files.items():
                path = directory / file
                if not path.is_file():
                    raise GraphqError(f"{index.name} maps {names[0]} to {file}, which does not exist: copy every shard")
                specs, self.metadata, offsets = read_header_offsets(path)
                self.offsets.update(offsets)
                for name in names:
                    if name not in specs:
                        raise GraphqError(f"{index.name} maps {name} to {file}, but that shard has no such tensor")
                for name in specs:
                    if weight_map.get(name) != file:
                        raise GraphqError(f"{file} holds {name}, which {index.name} does not map to it")
                    self.specs[name] = specs[name]
                    self.file_of[name] = path
        elif single.is_file():
            self.specs, self.metadata, self.offsets = read_header_offsets(single)
            self.file_of = {name: single for name in self.specs}
        else:
            raise GraphqError(f"{directory} has neither {single.name} nor {index.name}: write the artifacts again")

    @property
    def files(self) -> list[Path]:
        return sorted(set(self.file_of.values()))

    def nbytes(self, name: str) -> int:
        dtype, shape = self.specs[name]
        return int(np.prod(shape, dtype=np.int64)) * BYTES_PER_ELEMENT.get(dtype, 1)

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only memory map of its file (bfloat16 as ml_dtypes.bfloat16)."""
        dtype_name, shape = self.specs[name]
        if dtype_name not in NUMPY_OF_NAME:
            raise GraphqError(f"{name} has safetensors dtype {dtype_name}, which graphq cannot read")
        start, end = self.offsets[name]
        dtype = NUMPY_OF_NAME[dtype_name]
        count = int(np.prod(shape, dtype=np.int64))
        if end - start != count * dtype.itemsize:
            raise GraphqError(f"{name} claims {list(shape)} {dtype_name} but holds {end - start} bytes: the file is damaged")
        if count == 0:
            return np.zeros(shape, dtype=dtype)
        return np.memmap(self.file_of[name], dtype=dtype, mode="r", offset=start, shape=tuple(shape))

    def items(self, names: Iterable[str]) -> Iterator[tuple[str, np.ndarray]]:
        for name in names:
            yield name, self.get(name)
