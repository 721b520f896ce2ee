"""graphq verify: its numbers against a direct computation in torch (the tiny Llama with forward hooks on every
nn.Linear, quantized weights put in by hand), its HTML page in a real headless browser, and SmolLM2 end to end.

Tolerances: torch and onnxruntime compute the same float32 network with different accumulation orders; measured
differences are ~1e-6 relative on layer outputs, far below what SQNR (to 0.01 dB), cosine (1e-5), perplexity
(1e-4 relative) and KL (1e-6 absolute) are checked to, while quantization moves each of them much more.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from graphq.algorithms.rtn import quantize_rtn
from graphq.config import QuantConfig
from graphq.evaluate import log_softmax, logit_agreement, perplexity, read_text, token_windows
from graphq.quantize import quantize
from graphq.report_html import write_html
from graphq.runtimes.ort import OrtCausalLM
from graphq.tokenizer import load_tokenizer
from graphq.verify import verify
from tests.test_cli import run_cli

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def tiny_w4(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("verify") / "w4"
    config = QuantConfig(scheme="w4a16", group_size=32, symmetric=False)
    result = quantize(tiny_models["llama"]["onnx"], config, out, progress=False)
    return result


@pytest.fixture(scope="module")
def tiny_windows(tiny_models, tiny_text):
    return token_windows(load_tokenizer(tiny_models["llama"]["onnx"]), read_text(tiny_text), 64, 256)


@pytest.fixture(scope="module")
def tiny_verify(tiny_models, tiny_w4, tiny_windows):
    return verify(tiny_models["llama"]["onnx"], tiny_w4.output_dir, tiny_windows)


def torch_reference(hf_dir: Path, report: dict, windows: list[np.ndarray]) -> dict:
    """Per-layer SQNR / cosine, perplexities, KL and top-1 computed directly in torch + numpy."""
    import torch
    from transformers import AutoModelForCausalLM

    float_model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    quant_model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    quantized = [e for e in report["layers"] if "skipped" not in e]
    modules = dict(quant_model.named_modules())
    with torch.no_grad():
        for entry in quantized:
            linear = modules[entry["name"]]
            qw = quantize_rtn(linear.weight.numpy().T, entry["bits"], entry["group_size"], entry["symmetric"])
            linear.weight.copy_(torch.from_numpy(qw.dequantize().T.copy()))
    captured: dict[str, dict[str, np.ndarray]] = {"float": {}, "quant": {}}
    for tag, model in (("float", float_model), ("quant", quant_model)):
        named = dict(model.named_modules())
        for entry in quantized:
            def hook(module, args, output, name=entry["name"], tag=tag):
                captured[tag][name] = output[0].double().numpy()
            named[entry["name"]].register_forward_hook(hook)
    sums = {e["name"]: [0.0, 0.0, 0.0] for e in quantized}
    rows = nll_f = nll_q = kl = agree = 0.0
    count = positions = 0
    for window in windows:
        ids = torch.from_numpy(window).reshape(1, -1)
        with torch.no_grad():
            f_logits = float_model(ids).logits[0].double().numpy()
            q_logits = quant_model(ids).logits[0].double().numpy()
        for name, s in sums.items():
            f, q = captured["float"][name], captured["quant"][name]
            s[0] += (f**2).sum()
            s[1] += ((q - f) ** 2).sum()
            s[2] += ((f * q).sum(-1) / (np.linalg.norm(f, axis=-1) * np.linalg.norm(q, axis=-1))).sum()
        rows += len(window)
        f_lp, q_lp = log_softmax(f_logits), log_softmax(q_logits)
        t = window[1:]
        nll_f -= f_lp[:-1][np.arange(len(t)), t].sum()
        nll_q -= q_lp[:-1][np.arange(len(t)), t].sum()
        count += len(t)
        kl += (np.exp(f_lp) * (f_lp - q_lp)).sum()
        agree += (f_logits.argmax(-1) == q_logits.argmax(-1)).sum()
        positions += len(window)
    return {
        "sqnr": {n: 10 * np.log10(s[0] / s[1]) for n, s in sums.items()},
        "cosine": {n: s[2] / rows for n, s in sums.items()},
        "float_ppl": np.exp(nll_f / count), "quant_ppl": np.exp(nll_q / count),
        "kl": kl / positions, "top1": agree / positions,
    }


def test_verify_numbers_against_a_direct_computation(tiny_models, tiny_w4, tiny_windows, tiny_verify):
    result = tiny_verify
    ref = torch_reference(tiny_models["llama"]["hf"], tiny_w4.report, tiny_windows)
    assert len(result.layers) == 14 and not result.unmatched
    for e in result.layers:
        assert e.sqnr_db == pytest.approx(ref["sqnr"][e.name], abs=0.01), e.name
        assert e.cosine == pytest.approx(ref["cosine"][e.name], abs=1e-5), e.name
    assert 5 < min(e.sqnr_db for e in result.layers) < max(e.sqnr_db for e in result.layers) < 60
    assert result.float_ppl == pytest.approx(ref["float_ppl"], rel=1e-4)
    assert result.quant_ppl == pytest.approx(ref["quant_ppl"], rel=1e-4)
    assert abs(result.quant_ppl - result.float_ppl) > 1e-3 * result.float_ppl
    assert result.mean_kl == pytest.approx(ref["kl"], abs=1e-6) and result.mean_kl > 1e-5
    assert abs(result.top1_agreement - ref["top1"]) <= 1 / (len(tiny_windows) * 65)
    # The same numbers as graphq eval / compare on the same windows.
    float_lm, quant_lm = OrtCausalLM(tiny_models["llama"]["onnx"]), OrtCausalLM(tiny_w4.output_dir)
    assert result.float_ppl == pytest.approx(perplexity(float_lm, tiny_windows).ppl, rel=1e-9)
    assert result.quant_ppl == pytest.approx(perplexity(quant_lm, tiny_windows).ppl, rel=1e-9)
    agreement = logit_agreement(float_lm, quant_lm, tiny_windows)
    assert result.mean_kl == pytest.approx(agreement.mean_kl, rel=1e-9)
    assert result.top1_agreement == agreement.top1_agreement


def test_verify_cli_prints_the_worst_layers(capsys, tiny_models, tiny_w4, tiny_text, tiny_verify, tmp_path):
    code, out, _ = run_cli(capsys, "verify", tiny_models["llama"]["onnx"], tiny_w4.output_dir, "--text", tiny_text,
                           "--ctx", 64, "--max-tokens", 256, "--worst", 3, "--html", tmp_path / "r.html")
    assert code == 0
    worst = tiny_verify.worst(3)
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if "SQNR dB" in line)
    assert [line.split()[0] for line in lines[start + 1 : start + 4]] == [e.name for e in worst]
    assert f"perplexity float {tiny_verify.float_ppl:.4f}" in out and f"mean KL {tiny_verify.mean_kl:.5f}" in out
    assert (tmp_path / "r.html").is_file()


def chromium(url: str, *args: str) -> subprocess.CompletedProcess:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/setup.sh (it installs Debian's chromium)")
    profile = tempfile.mkdtemp(prefix="graphq-chromium-")
    try:
        return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, url],
                              capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def colored_pixels(png: Path) -> int:
    """Pixels with a clear hue (chart lines and markers); the page's text and tables are black, grey and white."""
    import matplotlib.image

    rgb = matplotlib.image.imread(str(png))[..., :3]
    return int(((rgb.max(-1) - rgb.min(-1)) > 0.3).sum())


def test_html_report_in_a_headless_browser(tiny_verify, tmp_path):
    page = write_html(tiny_verify, tmp_path / "report.html")
    dom = chromium(page.as_uri(), "--dump-dom").stdout
    assert re.search(r'<body[^>]* data-plot-loaded="1000"', dom)  # the 10 x 4.5 in chart at 100 dpi decoded
    assert f"{tiny_verify.float_ppl:.4f}" in dom and f"{tiny_verify.quant_ppl:.4f}" in dom
    assert f"{tiny_verify.mean_kl:.5f}" in dom and f"{tiny_verify.top1_agreement:.4f}" in dom
    worst = tiny_verify.worst(1)[0]
    assert f"<td>{worst.name}</td>" in dom and f"{worst.sqnr_db:.2f}" in dom
    assert "http://" not in page.read_text() and "https://" not in page.read_text()  # self-contained
    chromium(page.as_uri(), f"--screenshot={tmp_path / 'shot.png'}", "--window-size=1200,1000")
    assert colored_pixels(tmp_path / "shot.png") > 2000
    # Control: the same page with a broken image shows no chart and is not marked loaded.
    broken = tmp_path / "broken.html"
    text = page.read_text()
    start = text.index("data:image/png;base64,") + len("data:image/png;base64,")
    broken.write_text(text[:start] + "AAAA" + text[text.index('"', start):])
    broken_dom = chromium(broken.as_uri(), "--dump-dom").stdout
    assert "<body" in broken_dom and not re.search(r"<body[^>]* data-plot-loaded=", broken_dom)
    chromium(broken.as_uri(), f"--screenshot={tmp_path / 'broken.png'}", "--window-size=1200,1000")
    assert colored_pixels(tmp_path / "broken.png") < 200


@pytest.mark.real_model
def test_smollm2_w4a16_artifacts_round_trip_and_verify(smollm2, austen, tmp_path):
    """SmolLM2: the artifacts rebuild to the quantized model's exact logits, and verify sees every layer."""
    config = QuantConfig(scheme="w4a16", group_size=128)
    result = quantize(smollm2["onnx"], config, tmp_path / "w4", progress=False)
    from graphq.artifacts.rebuild import load_artifacts

    load_artifacts(result.output_dir, tmp_path / "rebuilt")
    ids = np.random.default_rng(0).integers(0, 49152, size=64)
    quant_logits = OrtCausalLM(result.output_dir).logits(ids)
    assert np.array_equal(quant_logits, OrtCausalLM(tmp_path / "rebuilt").logits(ids))
    windows = token_windows(load_tokenizer(smollm2["onnx"]), read_text(austen["eval"]), 256, 512)
    checked = verify(smollm2["onnx"], result.output_dir, windows)
    assert len(checked.layers) == result.report["layers_quantized"] == 210 and not checked.unmatched
    # Measured with 8 windows of 512: ppl 24.28 -> 31.13 (+28%, as bench/results/weight_only.md), KL 0.34,
    # top-1 0.66, layer SQNR 1.3 dB (late o_proj) to ~30 dB.
    assert checked.float_ppl < checked.quant_ppl < 1.5 * checked.float_ppl
    assert checked.top1_agreement > 0.55 and 0.05 < checked.mean_kl < 1
    assert all(0 < e.sqnr_db < 60 and 0.5 < e.cosine <= 1 for e in checked.layers)


def test_verify_finds_qdq_layers_too(tiny_models, tiny_windows, tiny_verify, tmp_path):
    """The same weights emitted as DequantizeLinear + MatMul (layer outputs keep their names) give the same errors."""
    config = QuantConfig(scheme="w4a16", group_size=32, symmetric=False, format="qdq")
    qdq = quantize(tiny_models["llama"]["onnx"], config, tmp_path / "qdq", progress=False).output_dir
    result = verify(tiny_models["llama"]["onnx"], qdq, tiny_windows)
    assert not result.unmatched
    expected = {e.name: e.sqnr_db for e in tiny_verify.layers}
    assert {e.name: pytest.approx(expected[e.name], abs=1e-3) for e in result.layers} == expected


def test_layers_rescaled_by_a_fold_are_compared_up_to_the_channel_factor():
    # AWQ / smoothing fold 1/s into up_proj's output columns on purpose (quantize marks it output_rescaled).
    from graphq.verify import _ChannelSums

    rng = np.random.default_rng(0)
    layer = type("Layer", (), {"name": "model.layers.0.mlp.up_proj", "role": "up", "layer_index": 0})()
    f = rng.standard_normal((2, 64, 32))
    noise = 0.01 * rng.standard_normal(f.shape)
    expected_db = 10 * np.log10((f**2).sum() / (noise**2).sum())

    plain = _ChannelSums()
    plain.add(f[0], f[0] + noise[0])
    plain.add(f[1], f[1] + noise[1])
    as_is = plain.error(layer, rows=128)
    assert plain.error(layer, rows=128, rescaled=True).sqnr_db == pytest.approx(expected_db, abs=0.1)
    assert not as_is.rescaled and as_is.sqnr_db == pytest.approx(expected_db, abs=0.01)

    scales = rng.uniform(0.3, 3.0, size=32)  # the fold: q = (f + noise) / s, channel by channel
    folded = _ChannelSums()
    folded.add(f[0], (f[0] + noise[0]) / scales)
    folded.add(f[1], (f[1] + noise[1]) / scales)
    result = folded.error(layer, rows=128, rescaled=True)
    assert result.rescaled
    assert result.sqnr_db == pytest.approx(expected_db, abs=0.1)  # the factor is undone, the noise is not
    assert result.cosine == pytest.approx(as_is.cosine, abs=1e-3)
    raw_db = 10 * np.log10((f**2).sum() / ((f - (f + noise) / scales) ** 2).sum())
    assert folded.error(layer, rows=128).sqnr_db == pytest.approx(raw_db, abs=0.01)  # unmarked: compared as is
    assert raw_db < expected_db - 20


def test_greedy_decode_with_the_kv_cache_equals_decoding_from_full_windows(tiny_models, tiny_windows):
    """What verify --speed times is the cached decode: it must produce the tokens a full re-run would."""
    model = OrtCausalLM(tiny_models["llama"]["onnx"])
    prompt = tiny_windows[0][:12]
    cached = model.greedy_decode(prompt, 8)
    ids = list(prompt)
    for _ in range(8):
        ids.append(int(model.logits(np.array(ids))[-1].argmax()))
    assert cached == ids[len(prompt):]


def test_verify_speed_times_both_models(capsys, tiny_models, tiny_w4, tiny_text):
    import json

    code, out, _ = run_cli(capsys, "verify", tiny_models["llama"]["onnx"], tiny_w4.output_dir, "--text", tiny_text,
                           "--ctx", 64, "--max-tokens", 128, "--speed", "--speed-prompt", 16, "--speed-tokens", 8,
                           "--json")
    assert code == 0
    speed = json.loads(out.splitlines()[-1])["speed"]
    assert set(speed) == {"float", "quantized"}
    for entry in speed.values():
        assert entry["prompt_tokens"] == 16 and entry["new_tokens"] == 8
        assert 0 < entry["decode_tokens_per_s"] < 1e7 and 0 < entry["prefill_tokens_per_s"] < 1e8
    assert "decode vs float" in out
    with pytest.raises(SystemExit) as exc:
        run_cli(capsys, "verify", tiny_models["llama"]["onnx"], tiny_w4.output_dir, "--text", tiny_text, "--speed",
                "--speed-tokens", 0)
    assert exc.value.code == 2 and "must be a count >= 1" in capsys.readouterr().err
