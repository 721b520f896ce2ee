"""graphq inspect: what an ONNX model or an artifact folder holds, without running or loading tensor data.

Bits per weight count everything stored for a quantized layer's weight: the integers (as stored: padding and
unpacked int4 count), scales and zero points / offsets; biases are left out (a float model has them too).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from graphq.artifacts.description import find_descriptions
from graphq.artifacts.reader import open_artifacts
from graphq.errors import GraphqError
from graphq.linear_layers import find_linear_layers, module_path_from_node_name
from graphq.model_io import load_model, model_size_bytes, resolve_model_file

# Per-layer sparsity is listed once some layer has at least this fraction of zeros (RTN alone rounds a few to 0).
SPARSE_NOTE = 0.05
_INT_BITS = {ir.DataType.INT4: 4, ir.DataType.UINT4: 4, ir.DataType.INT8: 8, ir.DataType.UINT8: 8}


@dataclass
class SchemeSummary:
    layers: int = 0
    weights: int = 0  # k * n summed
    stored_bits: int = 0

    @property
    def bits_per_weight(self) -> float:
        return self.stored_bits / self.weights if self.weights else 0.0


@dataclass
class Inspection:
    path: Path
    kind: str  # "onnx" or "artifacts"
    schemes: dict[str, SchemeSummary] = field(default_factory=dict)
    float_linear_layers: int = 0
    float_tensors: int = 0
    float_bytes: int = 0
    total_bytes: int = 0
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    layers: dict[str, str] = field(default_factory=dict)  # layer name -> scheme
    sparsity: dict[str, float] = field(default_factory=dict)  # layer name -> measured fraction of zero weights

    def add(self, name: str, scheme: str, weights: int, stored_bits: int) -> None:
        summary = self.schemes.setdefault(scheme, SchemeSummary())
        summary.layers += 1
        summary.weights += weights
        summary.stored_bits += stored_bits
        self.layers[name] = scheme

    def render(self) -> str:
        lines = [f"{self.path} ({'ONNX model' if self.kind == 'onnx' else 'artifact folder'})"]
        for scheme, s in sorted(self.schemes.items()):
            lines.append(
                f"  {scheme.upper():12s} {s.layers:4d} layers  {s.weights / 1e6:10.3f} M weights  "
                f"{s.bits_per_weight:6.3f} bits/weight  {s.stored_bits / 8 / 2**20:9.2f} MiB"
            )
        if self.kind == "onnx":
            lines.append(f"  {'float':12s} {self.float_linear_layers:4d} linear layers left float")
        else:
            lines.append(f"  {'FLOAT':12s} {self.float_tensors:4d} tensors  {self.float_bytes / 2**20:9.2f} MiB")
        lines.extend(f"  {note}" for note in self.notes)
        if any(fraction >= SPARSE_NOTE for fraction in self.sparsity.values()):
            fractions = list(self.sparsity.values())
            lines.append(f"  sparsity (measured zeros): mean {np.mean(fractions):.2%}, min {min(fractions):.2%}, "
                         f"max {max(fractions):.2%} over {len(fractions)} layers")
            lines.extend(f"    {name:48s} {fraction:7.2%}" for name, fraction in self.sparsity.items())
        lines.append(f"  total {self.total_bytes / 2**20:.2f} MiB in {', '.join(self.files)}")
        return "\n".join(lines)


def _zero_fraction(values: np.ndarray, zero: np.ndarray | int = 0) -> float:
    return float(np.mean(np.asarray(values) == zero)) if np.size(values) else 0.0


def _matmulnbits_zero_fraction(node: ir.Node) -> float:
    """Codes equal to their block's zero point (the default 2^(bits-1) when there is none), over the first K."""
    k, bits, block = (node.attributes[a].as_int() for a in ("K", "bits", "block_size"))
    packed = node.inputs[1].const_value.numpy()
    n, n_blocks = packed.shape[0], packed.shape[1]
    if bits == 4:
        codes = np.empty((n, n_blocks, block), dtype=np.uint8)
        codes[..., 0::2] = packed & 0x0F
        codes[..., 1::2] = packed >> 4
    else:
        codes = packed.reshape(n, n_blocks, block)
    zero = np.full((n, n_blocks), 1 << (bits - 1), dtype=np.uint8)
    if len(node.inputs) > 3 and node.inputs[3] is not None and node.inputs[3].const_value is not None:
        zp = node.inputs[3].const_value.numpy().reshape(n, -1)
        if bits == 4:
            unpacked = np.empty((n, zp.shape[1] * 2), dtype=np.uint8)
            unpacked[:, 0::2] = zp & 0x0F
            unpacked[:, 1::2] = zp >> 4
            zp = unpacked
        zero = zp[:, :n_blocks]
    return _zero_fraction(codes.reshape(n, -1)[:, :k], np.repeat(zero, block, axis=1)[:, :k])


def _dequantize_zero_fraction(node: ir.Node) -> float:
    weight = node.inputs[0].const_value.numpy()
    zp_value = node.inputs[2] if len(node.inputs) > 2 else None
    if zp_value is None or zp_value.const_value is None:
        return _zero_fraction(weight)
    zp = zp_value.const_value.numpy()
    if zp.ndim == 1 and zp.size == weight.shape[1]:
        return _zero_fraction(weight, zp[None, :])
    if zp.ndim == 2 and zp.shape[1] == weight.shape[1]:  # blocked along K
        return _zero_fraction(weight, np.repeat(zp, -(-weight.shape[0] // zp.shape[0]), axis=0)[: weight.shape[0]])
    return _zero_fraction(weight, zp)


def inspect_path(path: str | Path) -> list[Inspection]:
    """The ONNX model and/or the artifacts found at ``path`` (an output folder holds both)."""
    path = Path(path)
    if not path.exists():
        raise GraphqError(f"{path} does not exist: pass a model.onnx, an export folder or an artifact folder")
    results = []
    if path.is_file() or any(path.glob("*.onnx")):
        results.append(inspect_onnx(path))
        results[-1].notes.extend(_other_target_notes(path if path.is_dir() else path.parent))
    if path.is_dir() and find_descriptions(path):
        results.append(inspect_artifacts(path))
    from graphq.artifacts.w8a8sc import inspect_compressed, is_compressed

    for folder in [path, path / "w8a8sc"] if path.is_dir() else []:
        if is_compressed(folder):
            results.append(inspect_compressed(folder, Inspection))
    if not results:
        raise GraphqError(f"{path} holds neither an ONNX model nor quant_model_description_*.json")
    return results


def _other_target_notes(directory: Path) -> list[str]:
    """compressed-tensors / gguf artifacts are not read back here (their consumers are transformers, vLLM,
    llama.cpp): name the files and sizes report.json records."""
    import json

    report_file = directory / "report.json"
    try:
        report = json.loads(report_file.read_text()) if report_file.is_file() else {}
    except (OSError, ValueError):
        return []
    target = report.get("target")
    if target in (None, "mindie", "vllm-ascend") or not report.get("artifacts"):
        return []
    files = ", ".join(f"{name} {size / 2**20:.2f} MiB" for name, size in report["artifacts"].items())
    return [f"--target {target} artifacts ({report.get('serving_dtype', 'fp32')}): {files}"]


def inspect_artifacts(directory: Path) -> Inspection:
    artifacts = open_artifacts(directory)
    store = artifacts.store
    result = Inspection(path=directory, kind="artifacts", files=[artifacts.description.name] + [f.name for f in store.files])
    for name, (n, k) in artifacts.layers.items():
        if name in artifacts.codebook:  # packed codes + tables (+ their scales): the tables count
            names = [f"{name}.{s}" for s in ("weight", "weight_lut", "weight_lut_scale")]
            stored = sum(store.nbytes(t) for t in names if t in store.specs) * 8
            result.add(name, artifacts.codebook[name]["type"].lower().replace("_", "-"), n * k, stored)
            continue
        names = [f"{name}.{s}" for s in ("weight", "weight_scale", "weight_offset", "deq_scale", "input_scale", "input_offset",
                                         "weight_scale_second", "weight_offset_second", "scale_bias")]
        stored = sum(store.nbytes(t) for t in names if t in store.specs) * 8
        result.add(name, artifacts.layer_schemes[name], n * k, stored)
        result.sparsity[name] = _artifact_zero_fraction(artifacts, name, k)
    result.float_tensors = len(artifacts.float_names)
    result.float_bytes = sum(store.nbytes(t) for t in artifacts.float_names)
    result.total_bytes = sum(f.stat().st_size for f in store.files) + artifacts.description.stat().st_size
    result.notes.append(f"written by {artifacts.producer}"
                        + (f", serving dtype {store.metadata['serving_dtype']}" if "serving_dtype" in store.metadata else ""))
    if any(s in ("w4a16", "w4a8", "w4a8-dynamic") and n not in artifacts.codebook
           for n, s in artifacts.layer_schemes.items()):
        packings = set(artifacts.packing.values())
        result.notes.append("int4 weights " + ("packed two per byte" + (" along n (msModelSlim)" if "n" in packings else " along k")
                                               if artifacts.packed else "unpacked, one per int8"))
    if artifacts.codebook:
        result.notes.append(f"lut_mode: {len(artifacts.codebook)} codebook layers, their sizes include the tables")
    result.notes.extend(artifacts.notes)
    if artifacts.kv_cache_type:
        result.notes.append(f"KV cache {artifacts.kv_cache_type}: {len(artifacts.kv_names)} scale/offset tensors")
    return result


def _artifact_zero_fraction(artifacts, name: str, k: int) -> float:
    """Measured zeros of one stored layer (reads its weight tensors only)."""
    from graphq.artifacts.layout import W4A8_LAYOUT_SCHEMES, W8A8_LAYOUT_SCHEMES, decode_w4a8, decode_weight_only
    from graphq.algorithms.sparsity import zero_fraction

    scheme = artifacts.layer_schemes[name]
    tensors = artifacts.layer_tensors(name)
    if scheme in W4A8_LAYOUT_SCHEMES:
        return zero_fraction(decode_w4a8(tensors, k, artifacts.group_size_of(name),
                                         artifacts.packing.get(name, "none") != "none"))
    if scheme in W8A8_LAYOUT_SCHEMES or scheme == "w8a8-dynamic" and not tensors["weight_offset"].any():
        return _zero_fraction(tensors["weight"])
    packing = artifacts.packing.get(name, "none")
    return zero_fraction(decode_weight_only(tensors, artifacts.bits(name), k, artifacts.group_size_of(name),
                                            packing != "none", pack_along=packing if packing != "none" else "k"))


def _nbytes(value: ir.Value | None) -> int:
    if value is None or value.const_value is None:
        return 0
    tensor = value.const_value
    count = 1
    for dim in tensor.shape:
        count *= int(dim)
    return (count * tensor.dtype.bitwidth + 7) // 8


def inspect_onnx(path: Path) -> Inspection:
    model_file = resolve_model_file(path)
    model = load_model(model_file)
    result = Inspection(path=model_file, kind="onnx")
    for node in model.graph:
        if node.op_type == "MatMulNBits":
            k, n = node.attributes["K"].as_int(), node.attributes["N"].as_int()
            bits = node.attributes["bits"].as_int()
            stored = sum(_nbytes(v) for v in node.inputs[1:4]) * 8
            name = (node.outputs[0].name or "").removesuffix(".quantized_output") or module_path_from_node_name(node.name) or node.name
            result.add(name, f"w{bits}a16", k * n, stored)
            result.sparsity[name] = _matmulnbits_zero_fraction(node)
        elif node.op_type == "Gather" and (node.name or "").endswith(".lut_weight"):
            # graphq.passes.lut: codes + tables (+ scales) count; the int64 index offsets (K + N) do not
            name = node.name.removesuffix(".lut_weight")
            inits = model.graph.initializers
            shape, table = inits.get(f"{name}.weight_shape"), inits.get(f"{name}.weight_lut")
            if shape is None or table is None or shape.const_value is None:
                continue
            k, n = (int(d) for d in shape.const_value.numpy())
            bits = int(table.const_value.shape[-1]).bit_length() - 1
            stored = sum(_nbytes(inits.get(f"{name}.{s}")) for s in ("weight_codes", "weight_lut", "weight_lut_scale")) * 8
            result.add(name, f"w{bits}a16-lut", k * n, stored)
        elif node.op_type == "DequantizeLinear":
            weight = node.inputs[0]
            if weight is None or weight.const_value is None or weight.dtype not in _INT_BITS:
                continue
            consumers = [use for use in node.outputs[0].uses() if use.node.op_type in ("MatMul", "Gemm") and use.idx == 1]
            if not consumers or len(weight.const_value.shape) != 2:
                continue
            matmul = consumers[0].node
            activation = matmul.inputs[0].producer() if matmul.inputs[0] is not None else None
            a8 = activation is not None and activation.op_type == "DequantizeLinear"
            # W4A8 dynamic: the per-token grid's Mul (graphq names it "<layer>.dynamic_input_dequantized").
            per_token = activation is not None and (activation.name or "").endswith(".dynamic_input_dequantized")
            bits = _INT_BITS[weight.dtype]
            scheme = f"w{bits}a8" if a8 else f"w{bits}a8-dynamic" if per_token else f"w{bits}a16"
            k, n = (int(d) for d in weight.const_value.shape)
            stored = sum(_nbytes(v) for v in node.inputs[:3]) * 8
            name = (node.name or "").removesuffix(".weight_dequantize") or module_path_from_node_name(matmul.name) or matmul.name
            result.add(name, scheme, k * n, stored)
            result.sparsity[name] = _dequantize_zero_fraction(node)
        elif node.op_type == "MatMulInteger":
            weight = node.inputs[1]
            if weight is None or weight.const_value is None or len(weight.const_value.shape) != 2:
                continue
            k, n = (int(d) for d in weight.const_value.shape)
            name = (node.name or "").removesuffix(".dynamic_matmul_integer") or module_path_from_node_name(node.name) or ""
            # The weight's scale is a separate Mul constant: graphq names it "<layer>.weight_scale".
            scale = model.graph.initializers.get(f"{name}.weight_scale")
            stored = (_nbytes(weight) + _nbytes(node.inputs[3] if len(node.inputs) > 3 else None) + _nbytes(scale)) * 8
            result.add(name or node.name, "w8a8-dynamic", k * n, stored)
            zp = node.inputs[3] if len(node.inputs) > 3 else None
            result.sparsity[name or node.name] = _zero_fraction(
                weight.const_value.numpy(), 0 if zp is None or zp.const_value is None else zp.const_value.numpy())
    result.float_linear_layers = len(find_linear_layers(model))
    result.total_bytes = model_size_bytes(model_file)
    result.files = sorted(p.name for p in model_file.parent.iterdir() if p.name.startswith(model_file.name))
    return result
