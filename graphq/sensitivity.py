"""Sensitivity analysis: what quantizing each linear alone does to the model's output, measured in onnxruntime.

For every linear the scheme would quantize: the mean KL divergence of the next-token distributions (float model ||
model with only that linear quantized) over a few calibration windows, the top-1 agreement, and the cheap
layer-wise proxy (relative output error of the linear itself on captured inputs). One onnxruntime session serves
every measurement: each linear gets a switch (``graphq.passes.quant_switches``) fed as a boolean input.

Quantization here is RTN on the scheme's grid (weights as the scheme stores them; W8A8 static inputs per tensor
with the min/max range of the analysis windows, W8A8 dynamic per token), the same grids the emitters use. The
ranking (most sensitive first) drives ``--disable-level`` and ``--target-bits`` in ``quantize``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from graphq.algorithms.grid import fake_quantize, fake_quantize_per_token, fake_quantize_weight, range_to_qparams
from graphq.algorithms.rtn import quantize_rtn
from graphq.config import (
    ACTIVATION_SCHEMES,
    DYNAMIC_ACTIVATION_SCHEMES,
    STATIC_ACTIVATION_SCHEMES,
    W4A8_SCHEMES,
    QuantConfig,
)
from graphq.decoder_layers import decoder_regions
from graphq.errors import GraphqError
from graphq.evaluate import log_softmax
from graphq.linear_layers import LinearLayer, find_linear_layers
from graphq.model_io import load_model, resolve_model_file
from graphq.passes.quant_switches import Switch, add_quant_switches
from graphq.runtimes.activation_capture import ActivationCapture
from graphq.runtimes.layerwise import graph_input_feeds
from graphq.runtimes.submodel import SubmodelSession, share_buffers, slice_spec
from graphq.selection import skip_reason
from graphq.threads import with_configured_threads

SENSITIVITY_VERSION = 1
ANALYSIS_SEQ_LEN = 128  # tokens per analysis window at most: the ranking needs few, short windows (each linear costs a forward of them)
PROXY_ROWS = 256


@dataclass
class LinearSensitivity:
    name: str
    role: str
    layer_index: int | None
    scheme: str
    kl: float  # mean KL(float || only this linear quantized) per position
    top1_agreement: float
    proxy: float  # relative output error of the linear alone on captured inputs


@dataclass
class SensitivityReport:
    model: str
    scheme: str
    config: dict
    windows: int
    tokens: int
    seconds: float
    layers: list[LinearSensitivity] = field(default_factory=list)  # most sensitive first
    version: int = SENSITIVITY_VERSION
    workers: dict | None = None  # the Ray workers that measured (WorkerPool.summary); None in one process

    @property
    def ranking(self) -> list[str]:
        return [entry.name for entry in self.layers]

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        """Write the JSON under a temporary name, then rename: a crash leaves no half-written file."""
        from graphq.output_files import write_text_atomically

        return write_text_atomically(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "SensitivityReport":
        path = Path(path)
        if not path.is_file():
            raise GraphqError(f"sensitivity file {path} does not exist: write one with 'graphq analyze'")
        try:
            data = json.loads(path.read_text())
            layers = [LinearSensitivity(**entry) for entry in data.pop("layers")]
            if data.get("version") != SENSITIVITY_VERSION:
                raise ValueError(f"version {data.get('version')}")
            return cls(**data, layers=layers)
        except (ValueError, TypeError, KeyError) as exc:
            raise GraphqError(f"{path} is not a graphq sensitivity file ({exc}): rerun 'graphq analyze'") from exc


def _relative_error(reference: np.ndarray, approximation: np.ndarray) -> float:
    return float(np.sum(np.square(reference - approximation, dtype=np.float64))
                 / max(np.sum(np.square(reference, dtype=np.float64)), 1e-30))


def _switch_for(layer: LinearLayer, scheme: str, config: QuantConfig, stats) -> tuple[Switch, float]:
    """The fake-quantized form of one linear under ``scheme`` and its proxy error on the captured rows."""
    weight = layer.weight_kn()
    sub = config.for_scheme(scheme)
    if scheme in ACTIVATION_SCHEMES and scheme not in W4A8_SCHEMES:  # int8 per channel (W4A8: the 4-bit grid)
        weight_q = fake_quantize_weight(weight)
    else:
        weight_q = quantize_rtn(weight, sub.bits, sub.group_size_for(layer.in_features), sub.is_symmetric).dequantize()
    x = stats.tokens[:PROXY_ROWS]
    activation = None
    x_q = x
    if scheme in STATIC_ACTIVATION_SCHEMES:
        activation = range_to_qparams(stats.min, stats.max)
        x_q = fake_quantize(x, activation.scale, activation.offset)
    elif scheme in DYNAMIC_ACTIVATION_SCHEMES:
        activation = "per_token"
        x_q = fake_quantize_per_token(x)
    proxy = _relative_error(x @ weight, x_q @ weight_q) if len(x) else float("nan")
    return Switch(weight_q, activation), proxy


class _Measurements:
    """A worker's state: the float values where each decoder layer begins, the reference log-probabilities, and
    one onnxruntime session from the decoder layer being measured to the logits (the latest region's)."""

    def __init__(self, slices: dict, feeds: list[dict], boundaries: list[dict], references: list[np.ndarray]):
        self.slices, self.feeds, self.boundaries, self.references = slices, feeds, boundaries, references
        self.region = self.session = None

    def session_for(self, region: int | None) -> SubmodelSession:
        if self.session is None or self.region != region:
            self.session = None
            self.session = SubmodelSession.open(self.slices[region])
            self.region = region
        return self.session


def _measure(state: _Measurements, item: tuple[int | None, str]) -> tuple[float, float, int]:
    """One linear quantized alone (its gate open): KL and top-1 agreement sums over the windows, positions."""
    region, gate = item
    session = state.session_for(region)
    kl = agree = 0.0
    positions = 0
    for feed, values, reference in zip(state.feeds, state.boundaries, state.references):
        run_feeds = {**feed, **values, gate: np.array(True)}
        logprobs = log_softmax(session.run(run_feeds)["logits"][0])
        kl += float((np.exp(reference, dtype=np.float64) * (reference - logprobs)).sum())
        agree += float((reference.argmax(-1) == logprobs.argmax(-1)).sum())
        positions += len(reference)
    return kl, agree, positions


@with_configured_threads
def analyze(
    model_path: str | Path,
    config: QuantConfig,
    num_windows: int = 2,
    progress: bool = True,
    pool=None,
) -> SensitivityReport:
    """Rank every linear ``config`` would quantize by the end-to-end cost of quantizing it alone.

    ``pool`` (graphq.runtimes.workers.WorkerPool): the per-linear measurements run on its workers (each gets the
    slices and the float boundary values once) and are combined in order: the same ranking and numbers."""
    from graphq.quantize import load_calibration_samples
    from graphq.runtimes.workers import local_pool

    config.validate()
    if config.method != "rtn":
        raise GraphqError(
            f"analyze measures each linear under RTN on the scheme's grid; --method {config.method} is not analysed "
            "(the ranking still serves quantize --method awq/gptq with --disable-level or --target-bits)"
        )
    if num_windows < 1:
        raise GraphqError(f"analysis needs at least one window, got {num_windows}")
    started = time.perf_counter()
    model_file = resolve_model_file(model_path)
    model = load_model(model_file)
    layers = find_linear_layers(model)
    planned = [(layer, config.scheme_for(layer.name)) for layer in layers
               if skip_reason(layer, config.exclude, config.quantize_lm_head) is None]
    if not planned:
        raise GraphqError("every linear layer is excluded: nothing to analyse")
    window_config = dataclasses.replace(config, num_samples=num_windows, seq_len=min(config.seq_len, ANALYSIS_SEQ_LEN))
    samples = load_calibration_samples(model_file, window_config)
    capture = ActivationCapture(model, [layer for layer, _ in planned])
    stats = capture.calibrate(samples, histograms=False, reservoir_rows=PROXY_ROWS, seed=config.seed).stats
    del capture
    switches, proxies = {}, {}
    for layer, scheme in planned:
        switches[layer.name], proxies[layer.name] = _switch_for(layer, scheme, config, stats[layer.input.name])
    feeds = [graph_input_feeds(model.graph, ids) for ids in samples]  # before the gates become graph inputs
    regions = decoder_regions(model, [layer for layer, _ in planned])
    cuts = {region.index: region.stream_inputs + region.static_inputs for region in regions}
    gates = add_quant_switches(model, switches, layers)
    feeds = [feed | {gate: np.array(False) for gate in gates} for feed in feeds]
    # The float model's values where each decoder layer begins: a linear quantized alone changes nothing before
    # its own layer, so each measurement runs only from there to the logits.
    cut_names = list(dict.fromkeys(name for names in cuts.values() for name in names))
    full = SubmodelSession(model, {}, cut_names + ["logits"])
    boundaries, references = [], []
    for feed in feeds:
        values = full.run(feed)
        references.append(log_softmax(values.pop("logits")[0]).astype(np.float32))
        boundaries.append(values)
    del full
    gate_of = dict(zip((layer.name for layer, _ in planned), gates))
    measured = [(layer, scheme) for region in regions for layer, scheme in planned if layer.layer_index == region.index]
    slices = {}  # region index -> the slice from the region's first value to the logits
    for region in regions:
        if any(layer.layer_index == region.index for layer, _ in measured):
            specs = {name: (boundaries[0][name].dtype, boundaries[0][name].ndim) for name in cuts[region.index]}
            slices[region.index] = slice_spec(model, specs, ["logits"])
    share_buffers(list(slices.values()))
    setup = partial(_Measurements, slices, feeds, boundaries, references)
    pool = pool or local_pool()
    items = [(layer.layer_index, gate_of[layer.name]) for layer, _ in measured]
    results = []
    bar = tqdm(total=len(planned), desc=f"sensitivity {config.scheme}", unit="linear", disable=not progress,
               file=sys.stderr)
    for (layer, scheme), (kl, agree, positions) in zip(measured, pool.map(setup, _measure, items)):
        results.append(LinearSensitivity(layer.name, layer.role, layer.layer_index, scheme, kl / positions,
                                         agree / positions, proxies[layer.name]))
        bar.update()
        bar.set_postfix(kl=f"{kl / positions:.2e}")
    bar.close()
    results.sort(key=lambda entry: -entry.kl)
    report = SensitivityReport(
        model=str(model_file.resolve()), scheme=config.scheme, config=config.to_dict(), windows=len(samples),
        tokens=int(sum(len(ids) for ids in samples)), seconds=round(time.perf_counter() - started, 3), layers=results,
        workers=pool.summary(),
    )
    top = ", ".join(f"{e.name} ({e.kl:.2e})" for e in results[:3])
    print(f"graphq: analysed {len(results)} linears ({config.scheme}) on {len(samples)} windows in {report.seconds:.1f}s; "
          f"most sensitive: {top}", file=sys.stderr)
    return report


def sensitivity_chart_png(report: SensitivityReport) -> bytes:
    """KL and proxy by decoder layer, one series per role, on log scales."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from graphq.report_html import ROLE_ORDER

    last = max((e.layer_index for e in report.layers if e.layer_index is not None), default=-1)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), dpi=100)
    roles = sorted({e.role for e in report.layers}, key=lambda r: ROLE_ORDER.index(r) if r in ROLE_ORDER else 99)
    for ax, metric, title in ((axes[0], "kl", "end-to-end: mean KL of the logits"),
                              (axes[1], "proxy", "layer-wise proxy: relative output error")):
        for role in roles:
            points = sorted(((e.layer_index if e.layer_index is not None else last + 1), max(getattr(e, metric), 1e-12))
                            for e in report.layers if e.role == role)
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", markersize=4, linewidth=1, label=role)
        ax.set_yscale("log")
        ax.set_xlabel("decoder layer")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes[1].legend(title="role", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.suptitle(f"Sensitivity of each linear quantized alone ({report.scheme})")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def render_sensitivity_html(report: SensitivityReport) -> str:
    import base64
    import html

    png = base64.b64encode(sensitivity_chart_png(report)).decode("ascii")
    rows = "\n".join(
        f"<tr><td>{rank}</td><td>{html.escape(e.name)}</td><td>{e.role}</td><td>{e.scheme}</td>"
        f"<td>{e.kl:.3e}</td><td>{e.top1_agreement:.4f}</td><td>{e.proxy:.3e}</td></tr>"
        for rank, e in enumerate(report.layers, 1)
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>graphq sensitivity: {html.escape(report.scheme)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:2px 8px}}</style>
</head><body>
<h1>Sensitivity of each linear, quantized alone ({html.escape(report.scheme)})</h1>
<p>{html.escape(report.model)}: {report.windows} windows, {report.tokens} tokens, {report.seconds:.1f} s.</p>
<img alt="KL and proxy by layer and role" src="data:image/png;base64,{png}">
<table><tr><th>rank</th><th>linear</th><th>role</th><th>scheme</th><th>mean KL</th><th>top-1 agreement</th>
<th>proxy error</th></tr>
{rows}
</table></body></html>
"""
