"""One NNCF weight compression of an ONNX decoder, inside bench/.nncf-venv (never imported by graphq or its venv).

    bench/.nncf-venv/bin/python bench/nncf_awq.py MODEL CALIB.npy OUT_DIR [--awq|--no-awq] [--scale-estimation]
        [--data-free] [--mode int4_asym|int4_sym] [--group-size 128] [--ratio 1.0] [--all-layers|--no-all-layers]

MODEL: an export folder or its model.onnx (weights in external data is fine: they are read from the folder, not
parsed into the protobuf). CALIB.npy: int64 token ids [S, L] (bench/awq_speed.py writes graphq's calibration
sequences there, so both tools see identical tokens). Every sample becomes one full-model feed: input_ids,
attention_mask (ones), position_ids (0..L-1) and an empty past_key_values.* of the shape and dtype the graph
declares (batch 1, past length 0). ``nncf.compress_weights`` runs on the ONNX backend with ``subset_size=S``
(all samples). Unless --quantize-embeddings / --quantize-lm-head, the embedding Gather and the lm_head MatMul are
put in ``ignored_scope`` and ``backup_mode=NONE``, so they stay float (as in graphq's rows) and no other layer
falls back to int8; ``all_layers=True`` by default so that NNCF's "last MatMul stays in backup precision" rule
cannot land on another layer (the tied lm_head reads Transpose(embedding), and NNCF skips a shared last weight).
NNCF refuses a group size that does not divide K (SmolLM2's hidden size 576 = 4.5 x 128; graphq cuts a partial last
group instead): --group-size-fallback adjust (default) lets it pick the largest power of two below the group size that
divides K (64 for K=576; down_proj's K=1536 keeps 128).

NNCF 3.4.0 writes MatMulNBits uint8 zero points unpacked ([N, n_blocks]), which onnxruntime refuses; they are
repacked two per byte as the operator's spec says (pack_zero_points; the values are NNCF's, the time is counted).

OUT_DIR gets model.onnx + model.onnx.data (external data: no 2 GB protobuf limit) and the tokenizer / config
files of the source folder. Prints one JSON line: compress_seconds (the compress_weights call alone),
seconds (load + compress + save), process_seconds (since this interpreter started, imports included),
peak_rss_mib (VmHWM from /proc/self/status), the nodes left float and the options used.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

# Run as a script, this file's folder (bench/) is sys.path[0], where bench/compressed_tensors.py would shadow the
# compressed_tensors package (llm-compressor imports it) and any other bench module a same-named one: drop it.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

import numpy as np


def process_seconds() -> float:
    """Seconds since this process started (/proc/self/stat start time against the system uptime)."""
    start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def model_file(path: Path) -> Path:
    return path / "model.onnx" if path.is_dir() else path


def graph_feeds(model, ids: np.ndarray) -> list[dict[str, np.ndarray]]:
    """One full-model feed per calibration row, every input built from the graph's declared names and types."""
    from onnx.helper import tensor_dtype_to_np_dtype

    feeds = []
    for row in ids:
        length = row.shape[0]
        feed = {}
        for value in model.graph.input:
            name = value.name
            tensor = value.type.tensor_type
            dtype = tensor_dtype_to_np_dtype(tensor.elem_type)
            if name == "input_ids":
                feed[name] = row.reshape(1, -1).astype(dtype)
            elif name == "attention_mask":
                feed[name] = np.ones((1, length), dtype=dtype)
            elif name == "position_ids":
                feed[name] = np.arange(length, dtype=dtype).reshape(1, -1)
            elif name.startswith(("past_key_values.", "past_key.", "past_value.")):
                shape = []
                for dim in tensor.shape.dim:
                    if dim.HasField("dim_value"):
                        shape.append(dim.dim_value)
                    elif "batch" in dim.dim_param:
                        shape.append(1)
                    elif "past" in dim.dim_param:
                        shape.append(0)
                    else:
                        raise SystemExit(f"nncf_awq: cannot size input {name}: dimension '{dim.dim_param}'")
                feed[name] = np.zeros(shape, dtype=dtype)
            else:
                raise SystemExit(f"nncf_awq: the model has an input this script does not know how to feed: {name}")
        feeds.append(feed)
    return feeds


def float_nodes(model) -> tuple[list[str], list[str]]:
    """(embedding Gathers reading an initializer, the MatMul/Gemm that produces the logits output)."""
    initializers = {init.name for init in model.graph.initializer}
    embeddings = [n.name for n in model.graph.node if n.op_type == "Gather" and n.input and n.input[0] in initializers]
    producer = {out: node for node in model.graph.node for out in node.output}
    lm_head = []
    outputs = [o.name for o in model.graph.output if o.name == "logits"] or [model.graph.output[0].name]
    frontier = list(outputs)
    seen = set()
    while frontier:  # walk back from logits through reshapes/casts to the first MatMul/Gemm
        name = frontier.pop()
        node = producer.get(name)
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in ("MatMul", "Gemm"):
            lm_head.append(node.name)
            continue
        frontier.extend(node.input)
    return embeddings, lm_head


def pack_zero_points(model) -> int:
    """Repack NNCF's MatMulNBits zero points into onnxruntime's layout; returns how many were repacked.

    NNCF 3.4.0's ONNX backend stores uint8 zero points unpacked, one 4-bit value per byte, shape [N, n_blocks]. The
    MatMulNBits spec (and onnxruntime since its input checks, e.g. 1.32) wants uint8 zero points packed like B, two
    per byte (low nibble first), shape [N, ceil(n_blocks * bits / 8)]; unpacked zero points are only allowed in the
    scales' float type. onnxruntime refuses the model as written ("zero_points initializer shape {576,9} does not
    match attribute-derived shape [2880] or [576,5]"). The values are NNCF's own: only their packing changes.
    """
    from onnx import numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    repacked = 0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits" or len(node.input) < 4 or not node.input[3]:
            continue
        attrs = {a.name: a.i for a in node.attribute}
        bits, block, k, n = attrs.get("bits", 4), attrs["block_size"], attrs["K"], attrs["N"]
        blocks = -(-k // block)
        init = initializers[node.input[3]]
        zp = numpy_helper.to_array(init)
        if init.data_type != 2 or bits != 4 or zp.shape != (n, blocks):  # 2: UINT8; already packed or float: keep
            continue
        if blocks % 2:
            zp = np.concatenate([zp, np.zeros((n, 1), dtype=zp.dtype)], axis=1)
        packed = ((zp[:, 0::2] & 0x0F) | ((zp[:, 1::2] & 0x0F) << 4)).astype(np.uint8)
        init.CopyFrom(numpy_helper.from_array(packed, name=init.name))
        repacked += 1
    return repacked


def copy_side_files(source_dir: Path, target_dir: Path) -> None:
    """Tokenizer and config files (everything but ONNX models, their data and reports), as graphq copies them."""
    for item in source_dir.iterdir():
        if not item.is_file() or ".onnx" in item.name or item.suffix == ".data" or item.name.startswith("."):
            continue
        if item.name == "report.json":
            continue
        shutil.copy2(item, target_dir / item.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("calib", type=Path, help="int64 token ids [samples, seq_len] (.npy)")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--mode", choices=("int4_asym", "int4_sym"), default="int4_asym")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--ratio", type=float, default=1.0)
    parser.add_argument("--awq", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--scale-estimation", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--data-free", action="store_true", help="no dataset: plain RTN (implies --no-awq)")
    parser.add_argument("--subset-size", type=int, default=None, help="statistics samples (default: all of CALIB)")
    parser.add_argument("--group-size-fallback", choices=("adjust", "ignore", "error"), default="adjust",
                        help="NNCF needs K divisible by the group size: 'adjust' (default) uses the largest power of "
                             "two below it that divides K (576 -> 64), 'ignore' leaves such layers float")
    parser.add_argument("--all-layers", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--quantize-embeddings", action="store_true")
    parser.add_argument("--quantize-lm-head", action="store_true")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()

    import nncf
    import onnx
    from nncf.onnx.quantization.backend_parameters import BackendParameters
    from nncf.quantization.advanced_parameters import AdvancedCompressionParameters, GroupSizeFallbackMode

    source = model_file(args.model).resolve()
    if args.out_dir.exists():
        if not args.overwrite:
            raise SystemExit(f"nncf_awq: {args.out_dir} exists (pass --overwrite)")
        shutil.rmtree(args.out_dir)
    ids = np.load(args.calib).astype(np.int64)
    if ids.ndim != 2:
        raise SystemExit(f"nncf_awq: {args.calib} holds shape {ids.shape}, not [samples, seq_len]")
    data_free = args.data_free
    awq = args.awq and not data_free
    scale_estimation = args.scale_estimation and not data_free
    subset = args.subset_size or ids.shape[0]

    started = time.perf_counter()
    # Weights stay in the external data file: NNCF reads them from EXTERNAL_DATA_DIR (and onnxruntime, for the
    # statistics, through session.model_external_initializers_file_folder_path), so no 2 GB protobuf is built.
    model = onnx.load(str(source), load_external_data=False)
    embeddings, lm_head = float_nodes(model)
    ignored = (embeddings if not args.quantize_embeddings else []) + (lm_head if not args.quantize_lm_head else [])
    dataset = None if data_free else nncf.Dataset(graph_feeds(model, ids))
    options = dict(
        mode={"int4_asym": nncf.CompressWeightsMode.INT4_ASYM, "int4_sym": nncf.CompressWeightsMode.INT4_SYM}[args.mode],
        ratio=args.ratio,
        group_size=args.group_size,
        all_layers=args.all_layers,
        ignored_scope=nncf.IgnoredScope(names=ignored) if ignored else None,
        backup_mode=nncf.BackupMode.NONE,
        advanced_parameters=AdvancedCompressionParameters(
            backend_params={BackendParameters.EXTERNAL_DATA_DIR: str(source.parent)},
            group_size_fallback_mode=GroupSizeFallbackMode(args.group_size_fallback),
        ),
    )
    if not data_free:
        options.update(dataset=dataset, subset_size=subset, awq=awq, scale_estimation=scale_estimation)
    loaded = time.perf_counter()
    compressed = nncf.compress_weights(model, **options)
    compress_seconds = time.perf_counter() - loaded

    repacked = pack_zero_points(compressed)
    args.out_dir.mkdir(parents=True)
    onnx.save_model(compressed, str(args.out_dir / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=1024)
    copy_side_files(source.parent, args.out_dir)
    seconds = time.perf_counter() - started

    ops: dict[str, int] = {}
    for node in compressed.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    print(json.dumps({
        "compress_seconds": compress_seconds,
        "seconds": seconds,
        "process_seconds": process_seconds(),
        "peak_rss_mib": peak_rss_mib(),
        "samples": int(ids.shape[0]),
        "seq_len": int(ids.shape[1]),
        "subset_size": None if data_free else subset,
        "mode": args.mode,
        "group_size": args.group_size,
        "ratio": args.ratio,
        "group_size_fallback": args.group_size_fallback,
        "block_sizes": sorted({a.i for n in compressed.graph.node if n.op_type == "MatMulNBits"
                               for a in n.attribute if a.name == "block_size"}),
        "awq": awq,
        "scale_estimation": scale_estimation,
        "all_layers": args.all_layers,
        "ignored_scope": ignored,
        "backup_mode": "none",
        "matmulnbits": ops.get("MatMulNBits", 0),
        "zero_points_repacked": repacked,
        "dequantize_linear": ops.get("DequantizeLinear", 0),
        "float_matmuls_with_weights": [
            n.name for n in compressed.graph.node
            if n.op_type == "MatMul" and any(i in {t.name for t in compressed.graph.initializer} for i in n.input)
        ],
        "nncf": nncf.__version__,
        "onnx": onnx.__version__,
    }))


if __name__ == "__main__":
    main()
