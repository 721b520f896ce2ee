"""W8A8SC: W8A8S artifacts split over tensor-parallel ranks and compressed losslessly, tile by tile.

Layout (MindIE's): ``OUT/part{i}-of-{N}/quant_model_weight_w8a8sc.safetensors`` and
``quant_model_description_w8a8sc.json`` (``model_quant_type`` "W8A8SC") per rank i. Before compression the weights
are split as tensor parallelism runs them: column-parallel linears (q/k/v, gate/up, and any other) by output
channel, row-parallel ones (o_proj, down_proj) by input channel. Per linear, per rank:

- ``weight``  int8 [x]: the compressed stream, the tiles' streams back to back;
- ``index``   int8 [y], y = k_index * n_index * 8: one 8-byte entry per tile (tiles ordered by output tile, then
  input tile), little-endian: bytes 0-3 the tile stream's offset in ``weight`` (uint32), byte 4 its mode, bytes 5-7
  its length in bytes (uint24). k_index = ceil(k1 / TILING_K), n_index = ceil(n1 / TILING_N), k1 = ceil(k / 32),
  n1 = ceil(n / 16): a tile is 16 * TILING_N output channels by 32 * TILING_K input channels (the last ones cut
  to the matrix; nothing outside it is stored);
- ``info``    int64 [8]: n, k, tile rows, tile columns, n_index, k_index, nonzero weights, codec version;
- ``input_scale``, ``input_offset``, ``deq_scale``, ``quant_bias``: W8A8's, for this rank's slice (a row-parallel
  rank's ``quant_bias`` holds the bias only on rank 0, and -input_offset * its own partial weight sums: the
  ranks' sums add up to the unsplit one exactly).

Tile modes (the stream of one tile, row-major over the tile's rows r and columns c):

- 0 raw: the r * c int8 values;
- 1 sparse: a bitmap of the nonzero positions (r * c bits, numpy packbits order), then the nonzero int8 values;
- 2 lowbit: the bitmap, then one step byte m (1..16) per row, then a 4-bit code per nonzero value (two per byte,
  the first in the low nibble): j in [-7, 7] stands for the value j * m, code 0x8 escapes to the next byte of the
  escape list that closes the stream. W8A8S inliers are multiples of their channel's step (graphq.algorithms.lowbit).
- mode byte + 0x80 (codec version 2): the stream of mode 1 or 2 deflated (zlib, RFC 1950, level 9); the 4-bit codes
  of bell-shaped weights are far from uniform, which saves about 7% of the lowbit bytes of a real model.

The compressor writes each tile in its smallest mode, so the codec is lossless for any int8 weight. Float tensors
(embeddings, norms, float linears) are copied unsplit into every rank.
"""

from __future__ import annotations

import json
import shutil
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from graphq.artifacts.description import FLOAT
from graphq.artifacts.reader import Artifacts, open_artifacts
from graphq.artifacts.safetensors_io import BYTES_PER_ELEMENT, SafetensorsStore, write_safetensors
from graphq.errors import GraphqError
from graphq.model_io import atomic_output_dir

TILE_ROWS, TILE_COLS = 16, 32  # the basic block: n1 = n / 16, k1 = k / 32
TILING_N, TILING_K = 4, 4  # basic blocks per tile along n and k
CODEC_VERSION = 2
READABLE_CODEC_VERSIONS = (1, 2)  # version 1: no deflated tiles
MODE_RAW, MODE_SPARSE, MODE_LOWBIT = 0, 1, 2
DEFLATED = 0x80
ESCAPE = 0x8
MAX_STEP = 16
TYPE = "W8A8SC"
STEM = "quant_model_weight_w8a8sc"
DESCRIPTION = "quant_model_description_w8a8sc.json"
ROW_PARALLEL = ("o_proj", "down_proj")
SPLIT_SUFFIXES = ("weight", "input_scale", "input_offset", "deq_scale", "quant_bias")
COMPRESSED_SUFFIXES = ("weight", "index", "info", "input_scale", "input_offset", "deq_scale", "quant_bias")


def part_name(rank: int, tp: int) -> str:
    return f"part{rank}-of-{tp}"


def tile_grid(n: int, k: int) -> tuple[int, int, int, int]:
    """(n_index, k_index, tile rows, tile columns) of an [n, k] weight."""
    n1, k1 = -(-n // TILE_ROWS), -(-k // TILE_COLS)
    return -(-n1 // TILING_N), -(-k1 // TILING_K), TILE_ROWS * TILING_N, TILE_COLS * TILING_K


# --- the tile codec -------------------------------------------------------------------------------------------


def _lowbit_steps(tile: np.ndarray) -> tuple[np.ndarray, int]:
    """Per row, the step m in 1..16 leaving the fewest escapes; returns (steps, escapes)."""
    values = tile.astype(np.int16)
    nonzero = values != 0
    best_steps = np.ones(tile.shape[0], dtype=np.int16)
    best = np.full(tile.shape[0], np.iinfo(np.int32).max)
    for m in range(1, MAX_STEP + 1):
        j = values // m
        ok = (values == j * m) & (j >= -7) & (j <= 7)
        escapes = (nonzero & ~ok).sum(axis=1)
        better = escapes < best
        best[better] = escapes[better]
        best_steps[better] = m
    return best_steps, int(best.sum())


def encode_tile(tile: np.ndarray) -> tuple[int, bytes]:
    """(mode, stream) of one int8 tile, in the mode that gives the fewest bytes."""
    tile = np.ascontiguousarray(tile, dtype=np.int8)
    flat = tile.reshape(-1)
    nonzero = flat != 0
    bitmap = np.packbits(nonzero).tobytes()
    values = flat[nonzero]
    candidates = [(MODE_RAW, flat.tobytes()), (MODE_SPARSE, bitmap + values.tobytes())]
    if values.size:
        steps, escapes = _lowbit_steps(tile)
        if len(bitmap) + tile.shape[0] + (values.size + 1) // 2 + escapes < len(candidates[1][1]):
            rows = np.repeat(np.arange(tile.shape[0]), tile.shape[1])[nonzero]
            m = steps[rows].astype(np.int16)
            v = values.astype(np.int16)
            j = v // m
            ok = (v == j * m) & (j >= -7) & (j <= 7)
            codes = np.where(ok, j & 0xF, ESCAPE).astype(np.uint8)
            if codes.size % 2:
                codes = np.append(codes, np.uint8(0))
            nibbles = (codes[0::2] | (codes[1::2] << 4)).astype(np.uint8)
            stream = bitmap + steps.astype(np.uint8).tobytes() + nibbles.tobytes() + values[~ok].tobytes()
            candidates.append((MODE_LOWBIT, stream))
    candidates += [(mode | DEFLATED, zlib.compress(stream, 9)) for mode, stream in candidates if mode != MODE_RAW]
    return min(candidates, key=lambda c: len(c[1]))


def decode_tile(mode: int, stream: bytes, rows: int, cols: int) -> np.ndarray:
    """Inverse of encode_tile: the int8 [rows, cols] tile."""
    size = rows * cols
    if mode & DEFLATED and mode & ~DEFLATED in (MODE_SPARSE, MODE_LOWBIT):
        try:
            stream = zlib.decompress(stream)
        except zlib.error as error:
            raise GraphqError(f"a deflated W8A8SC tile does not inflate ({error}): the artifact is corrupt") from None
        mode &= ~DEFLATED
    if mode == MODE_RAW:
        if len(stream) != size:
            raise GraphqError(f"a raw W8A8SC tile holds {len(stream)} bytes, expected {size}: the artifact is corrupt")
        return np.frombuffer(stream, dtype=np.int8).reshape(rows, cols).copy()
    bitmap_bytes = -(-size // 8)
    nonzero = np.unpackbits(np.frombuffer(stream[:bitmap_bytes], dtype=np.uint8), count=size).astype(bool)
    count = int(nonzero.sum())
    flat = np.zeros(size, dtype=np.int8)
    if mode == MODE_SPARSE:
        values = np.frombuffer(stream[bitmap_bytes:], dtype=np.int8)
        if values.size != count:
            raise GraphqError("a sparse W8A8SC tile's values do not match its bitmap: the artifact is corrupt")
        flat[nonzero] = values
        return flat.reshape(rows, cols)
    if mode != MODE_LOWBIT:
        raise GraphqError(f"W8A8SC tile mode {mode} is unknown (graphq writes 0, 1, 2, and 129, 130 deflated)")
    steps = np.frombuffer(stream[bitmap_bytes : bitmap_bytes + rows], dtype=np.uint8).astype(np.int16)
    start = bitmap_bytes + rows
    packed = np.frombuffer(stream[start : start + (count + 1) // 2], dtype=np.uint8)
    codes = np.empty(packed.size * 2, dtype=np.uint8)
    codes[0::2] = packed & 0x0F
    codes[1::2] = packed >> 4
    codes = codes[:count]
    escaped = np.frombuffer(stream[start + (count + 1) // 2 :], dtype=np.int8)
    is_escape = codes == ESCAPE
    if int(is_escape.sum()) != escaped.size:
        raise GraphqError("a lowbit W8A8SC tile's escapes do not match its codes: the artifact is corrupt")
    row_of = np.repeat(np.arange(rows), cols)[nonzero]
    j = np.where(codes >= 8, codes.astype(np.int16) - 16, codes.astype(np.int16))
    values = (j * steps[row_of]).astype(np.int16)
    values[is_escape] = escaped
    flat[nonzero] = values.astype(np.int8)
    return flat.reshape(rows, cols)


def compress_weight(weight: np.ndarray) -> dict[str, np.ndarray]:
    """int8 [n, k] -> {"weight": int8 [x], "index": int8 [y], "info": int64 [8]}."""
    n, k = weight.shape
    n_index, k_index, tile_rows, tile_cols = tile_grid(n, k)
    streams, index = [], np.zeros((n_index * k_index, 8), dtype=np.uint8)
    offset = 0
    for nt in range(n_index):
        for kt in range(k_index):
            tile = weight[nt * tile_rows : (nt + 1) * tile_rows, kt * tile_cols : (kt + 1) * tile_cols]
            mode, stream = encode_tile(tile)
            entry = index[nt * k_index + kt]
            entry[0:4] = np.frombuffer(np.uint32(offset).tobytes(), dtype=np.uint8)
            entry[4] = mode
            entry[5:8] = np.frombuffer(np.uint32(len(stream)).tobytes()[:3], dtype=np.uint8)
            streams.append(stream)
            offset += len(stream)
    if offset >= 2**32:
        raise GraphqError("a W8A8SC weight stream exceeds 4 GiB: split it over more --tp ranks")
    info = np.array([n, k, tile_rows, tile_cols, n_index, k_index, int(np.count_nonzero(weight)), CODEC_VERSION],
                    dtype=np.int64)
    return {"weight": np.frombuffer(b"".join(streams), dtype=np.int8).copy(), "index": index.reshape(-1).view(np.int8),
            "info": info}


def decompress_weight(stream: np.ndarray, index: np.ndarray, info: np.ndarray, name: str = "weight") -> np.ndarray:
    """Inverse of compress_weight: the int8 [n, k] weight."""
    n, k, tile_rows, tile_cols, n_index, k_index, nonzero, version = (int(v) for v in info)
    if version not in READABLE_CODEC_VERSIONS:
        raise GraphqError(f"{name}: W8A8SC codec version {version}, this graphq reads versions "
                          f"{', '.join(map(str, READABLE_CODEC_VERSIONS))}: update graphq")
    if (n_index, k_index, tile_rows, tile_cols) != tile_grid(n, k) or index.size != n_index * k_index * 8:
        raise GraphqError(f"{name}: its index and info disagree with the tiling of a [{n}, {k}] weight")
    data = stream.view(np.uint8).tobytes()
    entries = index.view(np.uint8).reshape(-1, 8)
    weight = np.zeros((n, k), dtype=np.int8)
    for nt in range(n_index):
        for kt in range(k_index):
            entry = entries[nt * k_index + kt]
            offset = int(entry[0:4].view(np.uint32)[0])
            length = int(entry[5]) | int(entry[6]) << 8 | int(entry[7]) << 16
            r0, c0 = nt * tile_rows, kt * tile_cols
            rows, cols = min(tile_rows, n - r0), min(tile_cols, k - c0)
            if offset + length > len(data):
                raise GraphqError(f"{name}: tile ({nt}, {kt}) points past the end of the stream: the artifact is corrupt")
            weight[r0 : r0 + rows, c0 : c0 + cols] = decode_tile(int(entry[4]), data[offset : offset + length], rows, cols)
    if int(np.count_nonzero(weight)) != nonzero:
        raise GraphqError(f"{name}: decompressed {np.count_nonzero(weight)} nonzero weights, info says {nonzero}")
    return weight


# --- tensor-parallel split ------------------------------------------------------------------------------------


def is_row_parallel(layer_name: str) -> bool:
    return layer_name.rsplit(".", 1)[-1] in ROW_PARALLEL


def _heads(config: dict) -> dict[str, int]:
    heads = config.get("num_attention_heads")
    kv = config.get("num_key_value_heads", heads)
    return {k: v for k, v in (("attention heads", heads), ("key/value heads", kv)) if isinstance(v, int)}


def compressed_layers(artifacts: Artifacts) -> list[str]:
    """The W8A8S linears, split and compressed; any other quantized layer (an int8 embedding from
    --quantize-embeddings, typed W8A16) is copied unsplit into every rank with its own type, like the float tensors."""
    return [name for name in artifacts.layers if artifacts.layer_schemes[name] == "w8a8s"]


def check_tp(artifacts: Artifacts, tp: int, model_config: dict) -> None:
    """--tp must divide the heads and every split dimension (the error names the first layer it does not)."""
    check_tp_shapes({name: artifacts.layers[name] for name in compressed_layers(artifacts)}, tp, model_config)


def check_tp_shapes(layers: dict[str, tuple[int, int]], tp: int, model_config: dict) -> None:
    """check_tp on {linear name: (out, in)}: quantize --compress checks its W8A8S linears before the work."""
    if not isinstance(tp, int) or tp < 1:
        raise GraphqError(f"--tp must be a positive integer, got {tp!r}")
    if tp == 1:
        return
    for what, count in _heads(model_config).items():
        if count % tp:
            projection = "q_proj" if what == "attention heads" else "k_proj"
            first = next((n for n in layers if n.endswith(projection)), next(iter(layers), "the model"))
            raise GraphqError(f"--tp {tp} does not divide the {count} {what} of {first}: choose a divisor of {count}")
    for name, (n, k) in layers.items():
        size, axis = (k, "input channels") if is_row_parallel(name) else (n, "output channels")
        if size % tp:
            raise GraphqError(f"--tp {tp} does not divide the {size} {axis} of {name}")


def split_layer(tensors: dict[str, np.ndarray], row_parallel: bool, tp: int) -> list[dict[str, np.ndarray]]:
    """One W8A8S layer's tensors -> per rank, W8A8 tensors of that rank's slice."""
    weight = tensors["weight"]
    n, k = weight.shape
    offset = int(round(float(tensors["input_offset"][0])))
    parts = []
    for rank in range(tp):
        part = {"input_scale": tensors["input_scale"], "input_offset": tensors["input_offset"]}
        if row_parallel:
            step = k // tp
            piece = weight[:, rank * step : (rank + 1) * step]
            full_sums = weight.astype(np.int64).sum(axis=1)
            bias_term = tensors["quant_bias"].astype(np.int64) + offset * full_sums  # round(bias / deq_scale)
            quant_bias = (bias_term if rank == 0 else 0) - offset * piece.astype(np.int64).sum(axis=1)
            if np.abs(quant_bias).max(initial=0) >= 2**31:
                raise GraphqError("a row-parallel quant_bias slice overflows int32")
            part.update(weight=np.ascontiguousarray(piece), deq_scale=tensors["deq_scale"],
                        quant_bias=quant_bias.astype(np.int32))
        else:
            step = n // tp
            rows = slice(rank * step, (rank + 1) * step)
            part.update(weight=np.ascontiguousarray(weight[rows]), deq_scale=tensors["deq_scale"][rows],
                        quant_bias=tensors["quant_bias"][rows])
        parts.append(part)
    return parts


def merge_layer(parts: list[dict[str, np.ndarray]], row_parallel: bool) -> dict[str, np.ndarray]:
    """Inverse of split_layer (on decompressed weights): the unsplit W8A8S tensors."""
    first = parts[0]
    merged = {"input_scale": first["input_scale"], "input_offset": first["input_offset"]}
    if row_parallel:
        merged["weight"] = np.concatenate([p["weight"] for p in parts], axis=1)
        merged["deq_scale"] = first["deq_scale"]
        merged["quant_bias"] = np.sum([p["quant_bias"].astype(np.int64) for p in parts], axis=0).astype(np.int32)
    else:
        merged["weight"] = np.concatenate([p["weight"] for p in parts], axis=0)
        merged["deq_scale"] = np.concatenate([p["deq_scale"] for p in parts])
        merged["quant_bias"] = np.concatenate([p["quant_bias"] for p in parts])
    return merged


# --- compress ---------------------------------------------------------------------------------------------------


def _model_config(directory: Path) -> dict:
    path = directory / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def compress(artifact_dir: str | Path, output_dir: str | Path, tp: int = 1, overwrite: bool = False,
             progress: bool = True) -> Path:
    """``graphq compress``: a W8A8S artifact folder -> the W8A8SC folders; returns ``output_dir``."""
    artifact_dir, output_dir = Path(artifact_dir), Path(output_dir)
    artifacts = open_artifacts(artifact_dir, scheme="w8a8s")
    if artifacts.scheme != "w8a8s":
        raise GraphqError(f"{artifact_dir} holds {artifacts.scheme} artifacts: compress takes W8A8S (--scheme w8a8s)")
    check_tp(artifacts, tp, _model_config(artifact_dir))
    with atomic_output_dir(output_dir, overwrite=overwrite, inputs=[artifact_dir]) as staging:
        report = compress_into(artifacts, artifact_dir, staging, tp, progress)
    print(f"graphq: compressed {len(report['layers'])} W8A8S layers over {tp} rank(s): quantized weights "
          f"{report['weight_bytes_before'] / 2**20:.2f} MiB -> {report['weight_bytes_after'] / 2**20:.2f} MiB "
          f"(ratio {report['compression_ratio']:.3f}); wrote {output_dir}", file=sys.stderr)
    return output_dir


def compress_artifacts_dir(artifact_dir: Path, target: Path, tp: int, progress: bool = True) -> dict:
    """Check and compress a W8A8S folder into ``target`` (quantize --compress); returns the summary."""
    artifacts = open_artifacts(artifact_dir, scheme="w8a8s")
    check_tp(artifacts, tp, _model_config(artifact_dir))
    report = compress_into(artifacts, artifact_dir, target, tp, progress)
    return {k: v for k, v in report.items() if k != "layers"}


def compress_into(artifacts: Artifacts, artifact_dir: Path, target: Path, tp: int, progress: bool = True) -> dict:
    """The W8A8SC folders of ``artifacts`` (read from ``artifact_dir``) in ``target`` (created), with the side
    files (config.json marked "w8a8sc", tokenizer, report.json for load-artifacts) and compression.json."""
    target.mkdir(parents=True, exist_ok=True)
    report = write_compressed(artifacts, target, tp, progress)
    for side in artifact_dir.iterdir():
        if side.is_file() and side.suffix in (".json", ".txt", ".model", ".jinja") and not side.name.startswith("quant_model_"):
            shutil.copy2(side, target / side.name)
    config_file = target / "config.json"
    if config_file.is_file():
        data = json.loads(config_file.read_text())
        data["quantize"] = "w8a8sc"
        config_file.write_text(json.dumps(data, indent=2) + "\n")
    (target / "compression.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def write_compressed(artifacts: Artifacts, out_dir: Path, tp: int, progress: bool = True) -> dict:
    """Write every rank's folder under ``out_dir``; returns the compression report (per layer and in total).

    Ranks are written one after the other; each layer's slice is split and compressed as its rank is written."""
    store = artifacts.store
    compressed = compressed_layers(artifacts)
    copied_layers = set(artifacts.layers) - set(compressed)
    copied = [tensor for tensor in artifacts.types if tensor.rpartition(".")[0] in copied_layers]
    layer_report: dict[str, dict] = {}
    for rank in range(tp):
        part_dir = out_dir / part_name(rank, tp)
        part_dir.mkdir(parents=True)
        types: dict[str, str] = {}

        def tensors():
            for name in artifacts.float_names:
                types[name] = FLOAT
                yield name, store.get(name)
            for name in copied:
                types[name] = artifacts.types[name]
                yield name, store.get(name)
            for name in tqdm(compressed, desc=f"compress {part_name(rank, tp)}", unit="layer",
                             disable=not progress, file=sys.stderr):
                layer = {s: store.get(f"{name}.{s}") for s in SPLIT_SUFFIXES}
                part = split_layer(layer, is_row_parallel(name), tp)[rank]
                packed = compress_weight(part["weight"])
                entry = layer_report.setdefault(name, {"bytes_before": 0, "bytes_after": 0, "parallel":
                                                       "row" if is_row_parallel(name) else "column"})
                entry["bytes_before"] += part["weight"].nbytes
                entry["bytes_after"] += packed["weight"].nbytes + packed["index"].nbytes + packed["info"].nbytes
                for suffix in COMPRESSED_SUFFIXES:
                    array = packed[suffix] if suffix in packed else part[suffix]
                    types[f"{name}.{suffix}"] = TYPE
                    yield f"{name}.{suffix}", array

        metadata = {**store.metadata, "scheme": "w8a8sc", "tp_size": str(tp), "rank": str(rank),
                    "tiling": f"{TILING_N}x{TILING_K} blocks of {TILE_ROWS}x{TILE_COLS}"}
        write_safetensors(tensors(), part_dir, STEM, None, metadata)
        data = {"model_quant_type": TYPE, "version": store.metadata.get("graphq_version", ""), **types}
        (part_dir / DESCRIPTION).write_text(json.dumps(data, indent=2) + "\n")
    for entry in layer_report.values():
        entry["compression_ratio"] = entry["bytes_after"] / entry["bytes_before"]
    before = sum(e["bytes_before"] for e in layer_report.values())
    after = sum(e["bytes_after"] for e in layer_report.values())
    files = sorted(p for p in out_dir.rglob("*") if p.is_file())
    return {
        "tp_size": tp,
        "tiling": {"tile_rows": TILE_ROWS * TILING_N, "tile_columns": TILE_COLS * TILING_K},
        "weight_bytes_before": before,
        "weight_bytes_after": after,
        "compression_ratio": after / before if before else 1.0,
        "artifact_bytes": sum(p.stat().st_size for p in files),
        "layers": layer_report,
    }


# --- read back (load-artifacts) ---------------------------------------------------------------------------------


def is_compressed(directory: Path) -> bool:
    return any(directory.glob("part0-of-*")) and any(directory.glob(f"part0-of-*/{DESCRIPTION}"))


@dataclass
class DecompressedStore:
    """The W8A8S tensors a W8A8SC folder stands for, decompressed and merged on demand (one layer at a time)."""

    specs: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    getters: dict[str, Callable[[], np.ndarray]] = field(default_factory=dict)
    part_files: list[Path] = field(default_factory=list)

    @property
    def files(self) -> list[Path]:
        return self.part_files

    def nbytes(self, name: str) -> int:
        dtype, shape = self.specs[name]
        return int(np.prod(shape, dtype=np.int64)) * BYTES_PER_ELEMENT.get(dtype, 1)

    def get(self, name: str) -> np.ndarray:
        return self.getters[name]()


def open_compressed(directory: str | Path) -> Artifacts:
    """A W8A8SC folder as the W8A8S ``Artifacts`` it compresses (checked: every rank present and consistent)."""
    directory = Path(directory)
    parts = sorted(directory.glob("part*-of-*"))
    tp = int(parts[0].name.rsplit("-", 1)[-1]) if parts else 0
    expected = [directory / part_name(rank, tp) for rank in range(tp)]
    missing = next((p for p in expected if not (p / DESCRIPTION).is_file()), None)
    if not parts or missing is not None:
        raise GraphqError(f"{directory} is not a complete W8A8SC folder: {missing or 'part0-of-N'} / {DESCRIPTION} is missing")
    stores, descriptions = [], []
    for part in expected:
        data = json.loads((part / DESCRIPTION).read_text())
        if data.get("model_quant_type") != TYPE:
            raise GraphqError(f"{part / DESCRIPTION}: model_quant_type is {data.get('model_quant_type')!r}, not {TYPE}")
        descriptions.append({k: v for k, v in data.items() if k not in ("model_quant_type", "version")})
        stores.append(SafetensorsStore(part, STEM))
    types = descriptions[0]
    for part, described, store in zip(expected, descriptions, stores):
        if described.keys() != types.keys() or set(store.specs) != set(types):
            raise GraphqError(f"{part.name} does not hold the same tensors as {expected[0].name}: the folder is incomplete")
    merged = DecompressedStore(metadata={**stores[0].metadata, "scheme": "w8a8s"},
                               part_files=[f for s in stores for f in s.files])
    out_types: dict[str, str] = {}
    layer_names = list(dict.fromkeys(name.rsplit(".", 1)[0] for name, kind in types.items() if kind == TYPE))
    for name, kind in types.items():
        if kind != TYPE:  # float tensors and the layers copied unsplit (compressed_layers)
            out_types[name] = kind
            merged.specs[name] = stores[0].specs[name]
            merged.getters[name] = (lambda n=name: stores[0].get(n))
    for layer in layer_names:
        row = is_row_parallel(layer)
        infos = [s.get(f"{layer}.info") for s in stores]
        n = sum(int(i[0]) for i in infos) if not row else int(infos[0][0])
        k = sum(int(i[1]) for i in infos) if row else int(infos[0][1])

        def load(layer=layer, row=row):
            ranks = []
            for store in stores:
                tensors = {s: store.get(f"{layer}.{s}") for s in COMPRESSED_SUFFIXES}
                tensors["weight"] = decompress_weight(tensors.pop("weight"), tensors.pop("index"), tensors.pop("info"),
                                                      f"{layer}.weight")
                ranks.append(tensors)
            return merge_layer(ranks, row)

        cache: dict[str, dict] = {}

        def getter(suffix, load=load, cache=cache):
            if "tensors" not in cache:
                cache["tensors"] = load()
            value = cache["tensors"][suffix]
            if suffix == "quant_bias":  # the last tensor a reader takes: drop the layer's merged tensors
                cache.clear()
            return value

        act = stores[0].specs[f"{layer}.input_scale"]
        deq_dtype = stores[0].specs[f"{layer}.deq_scale"][0]
        for suffix, spec in (("weight", ("I8", (n, k))), ("input_scale", act), ("input_offset", act),
                             ("deq_scale", (deq_dtype, (n,))), ("quant_bias", ("I32", (n,)))):
            merged.specs[f"{layer}.{suffix}"] = spec
            merged.getters[f"{layer}.{suffix}"] = (lambda s=suffix, g=getter: g(s))
            out_types[f"{layer}.{suffix}"] = "W8A8S"
    artifacts = Artifacts(directory, expected[0] / DESCRIPTION, "w8a8s", out_types, None, merged)
    from graphq.artifacts.layout import SCHEME_OF_TYPE, check_layer

    for name, kind in out_types.items():
        if kind == FLOAT:
            artifacts.float_names.append(name)
    for layer in layer_names:
        artifacts.layer_schemes[layer] = "w8a8s"
        artifacts.layers[layer] = check_layer(layer, "w8a8s", merged.specs, False)
    for name, kind in out_types.items():
        layer = name.rpartition(".")[0]
        if kind not in (FLOAT, "W8A8S") and layer not in artifacts.layer_schemes:
            if kind not in SCHEME_OF_TYPE:
                raise GraphqError(f"{expected[0] / DESCRIPTION}: {name} has type {kind!r}, which W8A8SC does not hold")
            artifacts.layer_schemes[layer] = SCHEME_OF_TYPE[kind]
            artifacts.layers[layer] = check_layer(layer, SCHEME_OF_TYPE[kind], merged.specs, False)
    return artifacts


def inspect_compressed(directory: Path, inspection_class):
    """graphq inspect on a W8A8SC folder: per layer the measured zeros (from ``info``) and the compressed bytes."""
    artifacts_dirs = sorted(directory.glob("part*-of-*"))
    stores = [SafetensorsStore(part, STEM) for part in artifacts_dirs]
    result = inspection_class(path=directory, kind="artifacts", files=[
        f"{part.name}/{f.name}" for part, store in zip(artifacts_dirs, stores) for f in store.files])
    types = {k: v for k, v in json.loads((artifacts_dirs[0] / DESCRIPTION).read_text()).items()
             if k not in ("model_quant_type", "version")}
    layers = list(dict.fromkeys(name.rsplit(".", 1)[0] for name, kind in types.items() if kind == TYPE))
    for layer in layers:
        infos = [store.get(f"{layer}.info") for store in stores]
        weights = sum(int(i[0]) * int(i[1]) for i in infos)
        stored = sum(store.nbytes(f"{layer}.{s}") for store in stores for s in ("weight", "index", "info", "deq_scale",
                                                                              "input_scale", "input_offset"))
        result.add(layer, "w8a8sc", weights, stored * 8)
        result.sparsity[layer] = 1.0 - sum(int(i[6]) for i in infos) / weights
    from graphq.artifacts.layout import SCHEME_OF_TYPE

    copied: dict[str, list[str]] = {}  # quantized layers every rank holds whole (compressed_layers)
    for name, kind in types.items():
        if kind not in (FLOAT, TYPE) and kind in SCHEME_OF_TYPE:
            copied.setdefault(name.rsplit(".", 1)[0], []).append(name)
    for layer, names in copied.items():
        weights = int(np.prod(stores[0].specs[f"{layer}.weight"][1]))
        result.add(layer, SCHEME_OF_TYPE[types[names[0]]], weights, sum(stores[0].nbytes(n) for n in names) * 8)
    result.float_tensors = sum(1 for kind in types.values() if kind == FLOAT)
    result.float_bytes = sum(store.nbytes(n) for store in stores for n, kind in types.items() if kind == FLOAT)
    result.total_bytes = sum(f.stat().st_size for part in artifacts_dirs for f in part.iterdir() if f.is_file())
    report = directory / "compression.json"
    if report.is_file():
        data = json.loads(report.read_text())
        result.notes.append(f"W8A8SC over {data['tp_size']} rank(s): quantized weights compressed to "
                            f"{data['compression_ratio']:.3f} of int8")
    return result
