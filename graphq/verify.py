"""graphq verify: a quantized model against its float model, end to end and layer by layer, in onnxruntime.

Both models run on the same token windows. End to end: perplexity of each, mean KL(float || quant) of the
next-token distributions and top-1 agreement (the same formulas as graphq.evaluate). Per layer: every quantized
linear's output is added as a graph output of both models, and its SQNR = 10 log10(sum f^2 / sum (q - f)^2) and the
mean per-token cosine of q against f are accumulated over all windows. Each model runs on its own hidden states, so a
layer's error includes what the quantized layers before it passed on: the error a deployment would see.
Only running sums are kept (one window's outputs at a time).

AWQ and SmoothQuant/OS+ fold scales into the output channels of up_proj (and v_proj): such a layer's output is meant
to differ from the float one by a per-channel factor, and quantize marks it ``output_rescaled`` in report.json. Those
layers are compared up to the best per-channel factor: noise = sum_c (ff_c - fq_c^2 / qq_c), cosine =
sqrt(sum_c fq_c^2 / qq_c / sum_c ff_c), and flagged ``rescaled``; every other layer is compared as is.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from tqdm import tqdm

from graphq.errors import GraphqError
from graphq.evaluate import LogitMetrics, window_terms
from graphq.linear_layers import LinearLayer, find_linear_layers
from graphq.model_io import load_model, model_size_bytes, read_report, resolve_model_file
from graphq.model_match import check_quantized_from
from graphq.runtimes.ort import OrtCausalLM, session_options


@dataclass
class LayerError:
    name: str
    role: str
    layer_index: int | None
    sqnr_db: float
    cosine: float
    rescaled: bool = False  # compared up to a per-output-channel factor (AWQ / smoothing fold)
    sparsity: float | None = None  # measured fraction of zero weights (report.json of a pruned model)


class _ChannelSums:
    """Running per-output-channel sums of f^2, q^2 and f*q, and the per-token cosine sum, for one layer."""

    def __init__(self) -> None:
        self.ff = self.qq = self.fq = None
        self.cosine = 0.0

    def add(self, f: np.ndarray, q: np.ndarray) -> None:
        self.add_sums(self.window_sums(f, q))

    @staticmethod
    def window_sums(f: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """One window's per-channel f^2, q^2, f*q and its per-token cosine sum (computed here or by a worker)."""
        f = f.astype(np.float64).reshape(-1, f.shape[-1])
        q = q.astype(np.float64).reshape(-1, q.shape[-1])
        norms = np.linalg.norm(f, axis=-1) * np.linalg.norm(q, axis=-1)
        return (f * f).sum(0), (q * q).sum(0), (f * q).sum(0), float(((f * q).sum(-1) / np.maximum(norms, 1e-30)).sum())

    def add_sums(self, sums: tuple[np.ndarray, np.ndarray, np.ndarray, float]) -> None:
        """Add one window's sums, in window order."""
        if self.ff is None:
            self.ff, self.qq, self.fq = sums[:3]
        else:
            self.ff, self.qq, self.fq = self.ff + sums[0], self.qq + sums[1], self.fq + sums[2]
        self.cosine += sums[3]

    def error(self, layer: LinearLayer, rows: int, rescaled: bool = False) -> LayerError:
        live = self.qq > 0
        signal = float(self.ff.sum())
        if rescaled:
            explained = float(np.where(live, self.fq**2 / np.where(live, self.qq, 1.0), 0.0).sum())
            noise = max(signal - explained, 0.0)
            cosine = float(np.sqrt(explained / signal)) if signal > 0 else 0.0
        else:
            noise = float((self.ff - 2 * self.fq + self.qq).sum())
            cosine = self.cosine / max(rows, 1)
        return LayerError(
            name=layer.name,
            role=layer.role,
            layer_index=layer.layer_index,
            sqnr_db=float(10 * np.log10(signal / noise)) if noise > 0 else float("inf"),
            cosine=cosine,
            rescaled=rescaled,
        )


@dataclass
class VerifyResult:
    float_ppl: float
    quant_ppl: float
    mean_kl: float
    top1_agreement: float
    tokens: int
    windows: int
    layers: list[LayerError]
    unmatched: list[str] = field(default_factory=list)
    float_model: str = ""
    quant_model: str = ""
    float_bytes: int = 0
    quant_bytes: int = 0
    config: dict | None = None
    artifacts: dict | None = None
    serving_dtype: str = "fp32"  # the quantized model's (report.json), fp16/bf16: weights rounded, float32 compute
    workers: dict | None = None  # the Ray workers that computed the windows (WorkerPool.summary), None in one process

    def worst(self, count: int) -> list[LayerError]:
        return sorted(self.layers, key=lambda e: e.sqnr_db)[:count]

    def to_dict(self) -> dict:
        return asdict(self)


def _quantized_output_name(layer: LinearLayer, quant: ir.Model, values: dict[str, ir.Value]) -> str | None:
    """The value in the quantized graph that corresponds to the float layer's output (after its bias)."""
    if layer.output.name in values:  # QDQ keeps the MatMul; MatMulNBits keeps a separate bias Add
        return layer.output.name
    value = values.get(f"{layer.name}.quantized_output")  # graphq's MatMulNBits output
    if value is not None:
        if layer.bias is not None and layer.bias_node is None:  # a Gemm's bias became an Add after it
            uses = [u.node for u in value.uses() if u.node.op_type == "Add"]
            if len(uses) == 1:
                return uses[0].outputs[0].name
        return value.name
    # Other emitters name their nodes "<layer>.*" (graphq's W8A8 dynamic) or keep the exporter's node-name prefix
    # ("/model/layers.0/self_attn/q_proj/..."): the last such node in graph order computes the layer's output.
    prefixes = tuple(p for p in (f"{layer.name}.", (layer.node.name or "").rsplit("/", 1)[0] + "/") if p != "/")
    last = None
    for node in quant.graph:
        if (node.name or "").startswith(prefixes) and node.op_type not in ("QuantizeLinear", "DynamicQuantizeLinear"):
            last = node
    return last.outputs[0].name if last is not None else None


class _CaptureLM(OrtCausalLM):
    """An OrtCausalLM whose session also returns some intermediate values.

    The graph is read without its weights, given the extra outputs and handed to onnxruntime as bytes, with the
    model's folder named as the place of its external data: nothing is copied and nothing is written."""

    def __init__(self, model_path: Path, extra_outputs: list[str], threads: int | None = None):
        model_file = resolve_model_file(model_path)
        proto = onnx.load(str(model_file), load_external_data=False)
        existing = {o.name for o in proto.graph.output}
        for name in extra_outputs:
            if name not in existing:
                proto.graph.output.append(onnx.ValueInfoProto(name=name))
        options = session_options(threads)
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(model_file.parent.resolve()))
        try:
            session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise GraphqError(f"onnxruntime cannot load {model_file}: {first_line}") from exc
        super().__init__(model_file, session=session)
        self.extra_outputs = list(extra_outputs)
        self._reopen = (type(self), (model_path, self.extra_outputs, threads))  # a worker reopens it (pickle)

    def run(self, ids: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        logits, *extras = self.session.run(["logits", *self.extra_outputs], self._feeds(ids, None, 0))
        return logits[0].astype(np.float32), extras


def _open_pair(float_file: Path, float_outputs: list[str], quant_file: Path, quant_outputs: list[str],
               threads: int | None) -> tuple[_CaptureLM, _CaptureLM]:
    return _CaptureLM(float_file, float_outputs, threads), _CaptureLM(quant_file, quant_outputs, threads)


def _window_sums(models: tuple[_CaptureLM, _CaptureLM], window: np.ndarray):
    """One window on both models: its logit terms, every layer's channel sums and its token rows."""
    reference, candidate = models
    f_logits, f_outs = reference.run(window)
    q_logits, q_outs = candidate.run(window)
    rows = f_outs[0].reshape(-1, f_outs[0].shape[-1]).shape[0] if f_outs else 0
    return (window_terms(window, q_logits, f_logits),
            [_ChannelSums.window_sums(f, q) for f, q in zip(f_outs, q_outs)], rows)


def verify(
    float_model: str | Path, quant_model: str | Path, windows: list[np.ndarray], threads: int | None = None,
    progress: bool = False, pool=None,
) -> VerifyResult:
    """``pool`` (graphq.runtimes.workers.WorkerPool): windows computed by its workers (each opens both models),
    combined in window order: the same numbers as in one process."""
    float_file, quant_file = resolve_model_file(float_model), resolve_model_file(quant_model)
    report = read_report(quant_file.parent)
    float_ir = load_model(float_file)
    float_layers = find_linear_layers(float_ir)
    quant_ir = load_model(quant_file)
    still_float = {layer.name for layer in find_linear_layers(quant_ir)}
    check_quantized_from(float_ir, quant_ir, float_file, quant_file, len(float_layers), len(still_float))
    del float_ir
    values = {out.name: out for node in quant_ir.graph for out in node.outputs}
    # The emitters record the value carrying each layer's output; older outputs without the record are matched by name.
    declared = {entry["name"]: entry["quantized_output"] for entry in report.get("layers", [])
                if isinstance(entry, dict) and entry.get("quantized_output")}
    pairs, unmatched = [], []
    for layer in float_layers:
        if layer.name in still_float:
            continue
        name = declared.get(layer.name)
        if name not in values:
            name = _quantized_output_name(layer, quant_ir, values)
        if name is None:
            unmatched.append(layer.name)
        else:
            pairs.append((layer, layer.output.name, name))
    if not pairs and len(still_float) == len(float_layers):
        raise GraphqError(f"{quant_file} has the same float linear layers as {float_file}: it is not quantized")
    del quant_ir
    from graphq.runtimes.workers import local_pool

    pool = pool or local_pool()
    setup = partial(_open_pair, float_file, [p[1] for p in pairs], quant_file, [p[2] for p in pairs], threads)
    sums = [_ChannelSums() for _ in pairs]
    rows = 0
    metrics = LogitMetrics()
    results = pool.map(setup, _window_sums, windows)
    for terms, window_sums, window_rows in tqdm(results, total=len(windows), desc="verify", unit="window",
                                                disable=not progress, file=sys.stderr):
        metrics.add_terms(terms)
        for entry, layer_sums in zip(sums, window_sums):
            entry.add_sums(layer_sums)
        rows += window_rows
    rescaled = {entry["name"] for entry in report.get("layers", []) if entry.get("output_rescaled")}
    layers = [entry.error(layer, rows, layer.name in rescaled) for entry, (layer, _, _) in zip(sums, pairs)]
    sparsity = {entry["name"]: entry["sparsity"] for entry in report.get("layers", []) if "sparsity" in entry}
    for error in layers:
        error.sparsity = sparsity.get(error.name)
    return VerifyResult(
        float_ppl=metrics.reference_ppl,
        quant_ppl=metrics.ppl,
        mean_kl=metrics.kl / metrics.positions,
        top1_agreement=metrics.agree / metrics.positions,
        tokens=metrics.targets,
        windows=len(windows),
        layers=layers,
        unmatched=unmatched,
        float_model=str(float_file),
        quant_model=str(quant_file),
        float_bytes=model_size_bytes(float_file),
        quant_bytes=model_size_bytes(quant_file),
        config=report.get("config"),
        artifacts=report.get("artifacts"),
        serving_dtype=report.get("serving_dtype", "fp32"),
        workers=pool.summary(),
    )


def format_table(result: VerifyResult, worst: int) -> str:
    sparse = any(e.sparsity is not None for e in result.layers)  # a pruned model: measured zeros next to SQNR
    lines = [
        f"perplexity float {result.float_ppl:.4f}  quantized {result.quant_ppl:.4f}  "
        f"({100 * (result.quant_ppl / result.float_ppl - 1):+.2f}%) over {result.tokens} tokens, {result.windows} windows",
        f"mean KL {result.mean_kl:.5f}  top-1 agreement {result.top1_agreement:.4f}",
        *([f"serving dtype {result.serving_dtype}: the quantized model's weights are {result.serving_dtype} values "
           "(computed in float32), so the perplexity delta includes the dtype's"] if result.serving_dtype != "fp32" else []),
        f"{len(result.layers)} quantized layers; the {min(worst, len(result.layers))} with the lowest SQNR:",
        f"  {'layer':45s} {'role':8s} {'SQNR dB':>8s} {'cosine':>8s}" + (f" {'sparsity':>8s}" if sparse else ""),
    ]
    for e in result.worst(worst):
        zeros = (f" {e.sparsity:8.2%}" if e.sparsity is not None else f" {'-':>8s}") if sparse else ""
        lines.append(f"  {e.name:45s} {e.role:8s} {e.sqnr_db:8.2f} {e.cosine:8.5f}{zeros}" + ("  *" if e.rescaled else ""))
    rescaled = sum(e.rescaled for e in result.layers)
    if rescaled:
        lines.append(
            f"  * and {rescaled} layer(s) in all: output channels rescaled by an AWQ/smoothing fold, "
            "compared up to that per-channel factor"
        )
    if result.unmatched:
        lines.append(f"  ({len(result.unmatched)} quantized layers not found in the quantized graph, e.g. {result.unmatched[0]})")
    return "\n".join(lines)
