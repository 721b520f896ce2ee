"""The verify report as one self-contained HTML page: the per-layer SQNR chart as an embedded PNG, the numbers.

The page needs nothing from outside (no scripts, fonts or images fetched). Its one inline script marks the body
with ``data-plot-loaded="<width>"`` once the chart image has decoded, which a headless browser test reads back.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from graphq.verify import VerifyResult

ROLE_ORDER = ["q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down", "lm_head", "other"]


def sqnr_chart_png(result: VerifyResult) -> bytes:
    """SQNR (dB) by decoder layer index, one series per role (lm_head and unindexed layers after the last index)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    last = max((e.layer_index for e in result.layers if e.layer_index is not None), default=-1)
    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=100)
    roles = sorted({e.role for e in result.layers}, key=lambda r: ROLE_ORDER.index(r) if r in ROLE_ORDER else 99)
    for role in roles:
        points = sorted(
            ((e.layer_index if e.layer_index is not None else last + 1), e.sqnr_db)
            for e in result.layers
            if e.role == role and e.sqnr_db != float("inf")
        )
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", markersize=4, linewidth=1, label=role)
    ax.set_xlabel("decoder layer (lm_head and other layers after the last)")
    ax.set_ylabel("output SQNR (dB), higher is better")
    ax.set_title("Per-layer output SQNR of the quantized model against the float model")
    ax.grid(True, alpha=0.3)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(title="role", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _rows(cells: list[list[str]]) -> str:
    return "\n".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in cells)


def _mib(n: int | None) -> str:
    return "-" if not n else f"{n / 2**20:.2f} MiB"


def render_html(result: VerifyResult) -> str:
    png = base64.b64encode(sqnr_chart_png(result)).decode("ascii")
    delta = 100 * (result.quant_ppl / result.float_ppl - 1)
    summary = [
        ["perplexity (float)", f"{result.float_ppl:.4f}"],
        ["perplexity (quantized)", f"{result.quant_ppl:.4f} ({delta:+.2f}%)"],
        ["mean KL(float || quantized)", f"{result.mean_kl:.5f}"],
        ["top-1 agreement", f"{result.top1_agreement:.4f}"],
        ["tokens / windows", f"{result.tokens} / {result.windows}"],
        ["quantized layers", str(len(result.layers))],
    ]
    sizes = [
        ["float model", result.float_model, _mib(result.float_bytes)],
        ["quantized model", result.quant_model, _mib(result.quant_bytes)],
    ]
    sizes += [["artifact", name, _mib(size)] for name, size in sorted((result.artifacts or {}).items())]
    layers = [[e.name, e.role, "" if e.layer_index is None else e.layer_index, f"{e.sqnr_db:.2f}", f"{e.cosine:.5f}",
               "" if e.sparsity is None else f"{e.sparsity:.2%}", "up to a per-channel factor (fold)" if e.rescaled else "as is"]
              for e in sorted(result.layers, key=lambda e: e.sqnr_db)]
    config = html.escape(json.dumps(result.config, indent=2)) if result.config else "(no report.json beside the quantized model)"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>graphq verify report</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
td, th {{ border: 1px solid #ccc; padding: 3px 8px; text-align: left; font-size: 14px; }}
th {{ background: #f0f0f0; }}
pre {{ background: #f7f7f7; padding: 1em; }}
</style></head>
<body>
<h1>graphq verify report</h1>
<h2>Summary</h2>
<table id="summary"><tr><th>measure</th><th>value</th></tr>
{_rows(summary)}
</table>
<h2>Per-layer SQNR</h2>
<img id="sqnr-plot" alt="per-layer SQNR chart" src="data:image/png;base64,{png}">
<h2>Layers, worst first</h2>
<table id="layers"><tr><th>layer</th><th>role</th><th>index</th><th>SQNR dB</th><th>cosine</th><th>sparsity</th><th>compared</th></tr>
{_rows(layers)}
</table>
<h2>Sizes</h2>
<table id="sizes"><tr><th>what</th><th>file</th><th>size</th></tr>
{_rows(sizes)}
</table>
<h2>Config</h2>
<pre id="config">{config}</pre>
<script>
(function () {{
  var img = document.getElementById("sqnr-plot");
  function mark() {{ if (img.complete && img.naturalWidth > 0) document.body.setAttribute("data-plot-loaded", String(img.naturalWidth)); }}
  img.addEventListener("load", mark);
  mark();
}})();
</script>
</body></html>
"""


def write_html(result: VerifyResult, path: str | Path) -> Path:
    from graphq.output_files import write_text_atomically

    return write_text_atomically(path, render_html(result))
