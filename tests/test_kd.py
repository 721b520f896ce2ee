"""The KD weight stage (issue 12): the fake-quant module's grid and gradients, training on one linear, and the
written-back ONNX against the torch fake-quant model (tiny random models: no accuracy claims)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import graphq.kd.fake_quant as fake_quant
from graphq.algorithms.awq import quantize_with_clip, search_awq_clip
from graphq.algorithms.rtn import quantize_rtn
from graphq.artifacts.params import FAKE_QUANT_FILE, PARAMS_FILE, PARAMS_JSON
from graphq.config import QuantConfig
from graphq.errors import GraphqError
from graphq.kd.engine import KD_STATE_FILE
from graphq.kd.fake_quant import FakeQuantLinear, alpha_from_clip
from graphq.kd.settings import KDSettings
from graphq.kd.train import train_layer
from graphq.quantize import quantize
from graphq.runtimes.ort import OrtCausalLM

IDS = np.arange(3, 40)


def random_linear(k: int = 96, n: int = 40, seed: int = 0, bias: bool = False) -> torch.nn.Linear:
    torch.manual_seed(seed)
    linear = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k) * 0.05)
        linear.weight[3, 7] = 0.6  # an outlier, so clipping the group has something to gain
    return linear


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [32, -1])
def test_fake_quant_weight_is_what_the_numpy_grid_emits(symmetric, group_size):
    linear = random_linear(k=80)  # 80 = two full groups of 32 and a partial one
    module = FakeQuantLinear(linear, 4, group_size, symmetric)
    with torch.no_grad():
        module.quant_alpha.uniform_(0.6, 1.0, generator=torch.Generator().manual_seed(1))
    clip = module.clip_ranges()
    weight_kn = linear.weight.detach().numpy().T.copy()
    emitted = quantize_with_clip(weight_kn, clip, 4, group_size, symmetric).dequantize()
    np.testing.assert_allclose(module.dequantized_weight().detach().numpy(), emitted, rtol=0, atol=1e-7)
    # alpha 1 is RTN itself
    plain = FakeQuantLinear(linear, 4, group_size, symmetric).dequantized_weight().detach().numpy()
    np.testing.assert_array_equal(plain, quantize_rtn(weight_kn, 4, group_size, symmetric).dequantize())


def test_alpha_from_an_awq_clip_reproduces_the_awq_weight():
    linear = random_linear()
    weight_kn = linear.weight.detach().numpy().T.copy()
    x = np.random.default_rng(0).standard_normal((256, 96)).astype(np.float32)
    clip, _ = search_awq_clip(x, weight_kn, 4, 32, False)
    assert (clip.shrink < 1).any()
    module = FakeQuantLinear(linear, 4, 32, False, alpha_from_clip(clip, weight_kn, False))
    np.testing.assert_allclose(module.dequantized_weight().detach().numpy(),
                               quantize_with_clip(weight_kn, clip, 4, 32, False).dequantize(), atol=1e-6)


def test_quant_alpha_gradient_matches_finite_differences(monkeypatch):
    """With the rounding residuals frozen (what straight-through rounding differentiates), autograd's gradient of
    the output loss with respect to quant_alpha equals central differences. The clip puts each group's extreme
    weights exactly on the top (bottom) level, where saturation has a kink that autograd passes and central
    differences halve; the check takes the saturation away (the clip already keeps every code in range)."""
    monkeypatch.setattr(fake_quant, "clamp_to_levels", lambda q, qmin, qmax: q)
    linear = random_linear(k=64, n=8)
    module = FakeQuantLinear(linear, 4, 32, False).double()
    with torch.no_grad():
        module.quant_alpha.fill_(0.9)  # inside (min_alpha, 1): the clamp on alpha passes gradients
    x = torch.randn(16, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    target = x @ linear.weight.detach().double().T

    residuals: list[torch.Tensor] = []
    calls = iter(())

    def frozen_round(value: torch.Tensor) -> torch.Tensor:
        return value + next(calls)

    def recording_round(value: torch.Tensor) -> torch.Tensor:
        residuals.append((torch.round(value) - value).detach())
        return value + residuals[-1]

    def loss() -> torch.Tensor:
        return torch.mean(torch.square(module(x) - target))

    monkeypatch.setattr(fake_quant, "round_ste", recording_round)
    base = loss()
    base.backward()
    grad = module.quant_alpha.grad.clone()
    monkeypatch.setattr(fake_quant, "round_ste", frozen_round)
    eps = 1e-6
    numeric = torch.zeros_like(grad)
    flat = module.quant_alpha.data.view(-1)
    for index in range(flat.numel()):
        values = []
        for sign in (1, -1):
            flat[index] += sign * eps
            calls = iter(residuals)
            with torch.no_grad():
                values.append(float(loss()))
            flat[index] -= sign * eps
        numeric.view(-1)[index] = (values[0] - values[1]) / (2 * eps)
    assert grad.abs().max() > 0
    np.testing.assert_allclose(grad.numpy(), numeric.numpy(), rtol=1e-4, atol=1e-9)


def test_training_one_linear_lowers_its_output_error_below_rtn():
    linear = random_linear(k=128, n=32, bias=True)
    module = FakeQuantLinear(linear, 3, 32, False)
    x = torch.randn(64, 8, 128, generator=torch.Generator().manual_seed(0))
    x[..., 5] *= 8.0
    with torch.no_grad():
        target = linear(x)
    settings = KDSettings.from_dict({"num_epochs": 20, "micro_batch_size": 8, "learning_rate": 1e-2, "loss_skip_tokens": 0})

    class Block(torch.nn.Module):  # the layer protocol train_layer drives: block(hidden, **kwargs)
        def __init__(self):
            super().__init__()
            self.linear = module

        def forward(self, hidden):
            return self.linear(hidden)

    training = train_layer(Block(), [module.quant_alpha], [], x, target, {}, settings, seed=0)
    assert training.steps == 20 * 8
    assert training.loss_end < 0.9 * training.loss_start
    with torch.no_grad():
        rtn = torch.mean(torch.square(FakeQuantLinear(linear, 3, 32, False)(x) - target))
    assert training.loss_end < float(rtn)
    assert np.isclose(training.loss_start, float(rtn), rtol=1e-4)


def test_a_diverging_run_keeps_the_starting_clip():
    linear = random_linear(k=64, n=16)
    module = FakeQuantLinear(linear, 4, 32, False)
    x = torch.randn(16, 4, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        target = linear(x)
    settings = KDSettings.from_dict({"num_epochs": 3, "micro_batch_size": 4, "learning_rate": 50.0,
                                     "loss_skip_tokens": 0, "min_alpha": 0.05})

    class Block(torch.nn.Module):
        def forward(self, hidden):
            return module(hidden)

    training = train_layer(Block(), [module.quant_alpha], [], x, target, {}, settings, seed=0)
    assert training.loss_end <= training.loss_start
    if training.loss_end == training.loss_start:  # nothing better was seen: alpha is back at its start
        assert torch.all(module.quant_alpha == 1.0)


KD_FLAGS = {"train_samples": 8, "cutoff_len": 32, "num_epochs": 2, "micro_batch_size": 4}


def kd_config(tiny_text, method: str = "kd", **kd) -> QuantConfig:
    return QuantConfig(method=method, group_size=32, calib=str(tiny_text), num_samples=8, seq_len=32,
                       kd={**KD_FLAGS, **kd})


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_written_back_onnx_computes_what_the_torch_fake_quant_model_does(kind, tiny_models, tiny_text, tmp_path):
    from graphq.linear_layers import find_linear_layers
    from graphq.model_io import load_model
    from graphq.runtimes.torch_model import build_torch_model

    source = tiny_models[kind]["onnx"]
    config = kd_config(tiny_text)
    config.save_format = ["onnx", "safetensors", "params"]
    result = quantize(source, config, tmp_path / "kd", progress=False)
    state = load_file(str(tmp_path / "kd" / KD_STATE_FILE))
    fake_weights = load_file(str(tmp_path / "kd" / FAKE_QUANT_FILE))
    params = json.loads((tmp_path / "kd" / PARAMS_JSON).read_text())["layers"]
    entries = [e for e in result.report["layers"] if "skipped" not in e]
    assert entries and all(e["kd_loss_end"] <= e["kd_loss_start"] for e in entries)
    assert any(k.endswith("layernorm.weight") for k in state)  # norms were trained and written back

    model = load_model(source)
    layers = find_linear_layers(model)
    student = build_torch_model(source, model, layers)
    with torch.no_grad():
        for name, value in state.items():
            if name.endswith(".weight"):
                student.get_submodule(name.rpartition(".")[0]).weight.copy_(torch.from_numpy(value))
        for entry in entries:
            parent, _, attribute = entry["name"].rpartition(".")
            fq = FakeQuantLinear(student.get_submodule(entry["name"]), 4, 32, False,
                                 state[f"{entry['name']}.quant_alpha"])
            setattr(student.get_submodule(parent), attribute, fq)
            # The extracted fake-quant weight is the module's; the extracted grid range is the learned clip's.
            np.testing.assert_allclose(fake_weights[f"{entry['name']}.weight"],
                                       fq.dequantized_weight().numpy().T, atol=1e-7)
            assert params[entry["name"]]["method"] == "kd" and params[entry["name"]]["group_size"] == 32
        torch_logits = student(input_ids=torch.from_numpy(IDS[None])).logits[0].numpy()
    onnx_logits = OrtCausalLM(tmp_path / "kd").logits(IDS)
    np.testing.assert_allclose(onnx_logits, torch_logits, atol=2e-4 * np.abs(torch_logits).max())
    float_logits = OrtCausalLM(source).logits(IDS)
    assert np.abs(onnx_logits - float_logits).max() > 10 * np.abs(onnx_logits - torch_logits).max()


def test_kd_is_deterministic_and_disabled_kd_from_awq_is_awq(tiny_models, tiny_text, tmp_path):
    source = tiny_models["llama"]["onnx"]
    first = quantize(source, kd_config(tiny_text), tmp_path / "a", progress=False)
    second = quantize(source, kd_config(tiny_text), tmp_path / "b", progress=False)
    assert (tmp_path / "a" / KD_STATE_FILE).read_bytes() == (tmp_path / "b" / KD_STATE_FILE).read_bytes()
    np.testing.assert_array_equal(OrtCausalLM(first.output_dir).logits(IDS), OrtCausalLM(second.output_dir).logits(IDS))

    # Disabled, kd keeps its start: AWQ's scales and clips as searched on the float model's inputs. Decoder layer 0
    # reads the same (float) inputs either way, so its AWQ search is the plain AWQ run's.
    awq = quantize(source, QuantConfig(method="awq", group_size=32, calib=str(tiny_text), num_samples=8, seq_len=32),
                   tmp_path / "awq", progress=False)
    off = quantize(source, kd_config(tiny_text, "awq+kd", enable=False), tmp_path / "off", progress=False)
    plain = {e["name"]: e for e in awq.report["layers"] if e.get("layer_index") == 0}
    for entry in off.report["layers"]:
        if entry.get("layer_index") == 0:
            assert entry["kd_steps"] == 0 and entry["kd_loss_end"] == entry["kd_loss_start"]
            assert entry["awq_ratio"] == plain[entry["name"]]["awq_ratio"]
            assert entry["weight_bytes_after"] == plain[entry["name"]]["weight_bytes_after"]
    trained = quantize(source, kd_config(tiny_text, "awq+kd"), tmp_path / "on", progress=False)
    entries = [e for e in trained.report["layers"] if "skipped" not in e]
    assert all("awq_ratio" in e and e["kd_loss_end"] <= e["kd_loss_start"] for e in entries)
    assert any(e["kd_loss_end"] < e["kd_loss_start"] for e in entries)


@pytest.mark.parametrize("bad, message", [
    ({"method": "gptq+kd"}, "kd comes last"),
    ({"method": "kd", "kd": {"epochs": 2}}, "unknown kd key(s) epochs"),
    ({"method": "kd", "kd": {"lr_scheduler_type": "step"}}, "unknown kd.lr_scheduler_type 'step'"),
    ({"method": "kd", "kd": {"trainable_keys": ["bias"]}}, "kd.trainable_keys"),
    ({"method": "kd", "kd": {"num_epochs": "two"}}, "kd.num_epochs' must be an integer"),
    ({"method": "kd", "scheme": "w8a8"}, "weight-only"),
    ({"method": "kd", "device": "tpu"}, "unknown --device 'tpu'"),
])
def test_bad_kd_settings_get_one_line(bad, message):
    with pytest.raises(GraphqError, match=None) as info:
        QuantConfig(**bad).validate()
    assert message in str(info.value) and "\n" not in str(info.value)


def test_report_names_the_kd_training(tiny_models, tiny_text, tmp_path):
    result = quantize(tiny_models["qwen2"]["onnx"], kd_config(tiny_text, eval_step=1), tmp_path / "kd",
                      progress=False)
    report = json.loads((tmp_path / "kd" / "report.json").read_text())
    assert report["config"]["kd"]["eval_step"] == 1
    entry = next(e for e in result.report["layers"] if "skipped" not in e)
    assert entry["method"] == "kd" and entry["kd_steps"] == 4 and len(entry["kd_eval_losses"]) == 4
    assert 0.3 <= entry["quant_alpha_mean"] <= 1.0


def test_extracted_params_of_w8a8_hold_the_input_ranges(tiny_models, tiny_text, tmp_path):
    config = QuantConfig(scheme="w8a8", calib=str(tiny_text), num_samples=4, seq_len=32,
                         save_format=["onnx", "params"])
    quantize(tiny_models["llama"]["onnx"], config, tmp_path / "w8", progress=False)
    params = json.loads((tmp_path / "w8" / PARAMS_JSON).read_text())["layers"]
    tensors = load_file(str(tmp_path / "w8" / PARAMS_FILE))
    entry = params["model.layers.0.self_attn.q_proj"]
    assert entry["scheme"] == "w8a8" and entry["bits"] == 8 and entry["symmetric"] and entry["group_size"] == -1
    assert entry["input_scale"] > 0 and -128 <= entry["input_offset"] <= 127
    scale = tensors["model.layers.0.self_attn.q_proj.weight_scale"]
    # the grid of a signed scale s covers [-128 s, 127 s] (or its mirror when s < 0: the extreme maps to -128)
    np.testing.assert_allclose(tensors["model.layers.0.self_attn.q_proj.weight_clip_max"],
                               np.maximum(-128 * scale, 127 * scale), rtol=1e-6)
    assert sorted(p.name for p in (tmp_path / "w8").iterdir() if p.is_dir()) == ["stages"]  # spills: checkpoints


def test_the_torch_model_draws_no_random_weights_and_loads_the_graphs(tiny_models):
    from graphq.linear_layers import find_linear_layers
    from graphq.model_io import load_model
    from graphq.runtimes.torch_model import build_torch_model, hf_tensors, load_graph_weights

    source = tiny_models["qwen2"]["onnx"]
    model = load_model(source)
    layers = find_linear_layers(model)
    rng = torch.get_rng_state()
    empty = build_torch_model(source, model, layers, decoder_weights=False)
    # from_config's random initialisation would have drawn from the global generator (and allocated the weights)
    assert torch.equal(torch.get_rng_state(), rng)
    decoder = {n: p for n, p in empty.named_parameters() if ".layers." in n}
    assert decoder and all(p.is_meta for p in decoder.values())
    assert not empty.get_input_embeddings().weight.is_meta
    graph = {name: load() for name, load in hf_tensors(model, layers)}
    loaded = load_graph_weights(empty, model, layers, lambda name: name.startswith("model.layers.1."))
    assert loaded and all(name.startswith("model.layers.1.") for name in loaded)
    for name, parameter in empty.named_parameters():
        if name in loaded:
            np.testing.assert_array_equal(parameter.detach().numpy(), graph[name])
        elif name.startswith("model.layers."):
            assert parameter.is_meta
    full = build_torch_model(source, model, layers)
    assert not any(p.is_meta for p in full.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_kd_holds_one_decoder_layers_weights_at_a_time(tiny_models, tiny_text, tmp_path, monkeypatch):
    """The float model is in the graph already: torch materialises only the decoder layer being trained (and the
    embedding only until the first layer's inputs are computed)."""
    import graphq.kd.train as train
    import graphq.runtimes.torch_model as torch_model

    models, held = [], []
    original_load, original_train = torch_model.load_graph_weights, train.train_layer

    def load(model, *args, **kwargs):
        models.append(model)
        return original_load(model, *args, **kwargs)

    def train_layer(block, *args, **kwargs):
        model = models[-1]
        loaded = [index for index, b in enumerate(torch_model.decoder_layers(model))
                  if any(not p.is_meta for p in b.parameters())]
        held.append((loaded, model.get_input_embeddings().weight.is_meta))
        return original_train(block, *args, **kwargs)

    monkeypatch.setattr(torch_model, "load_graph_weights", load)
    monkeypatch.setattr(train, "train_layer", train_layer)
    quantize(tiny_models["llama"]["onnx"], kd_config(tiny_text, "awq+kd"), tmp_path / "kd", progress=False)
    assert held == [([0], True), ([1], True)]


def test_awq_weights_wait_on_disk_until_their_layer_is_trained(tiny_models, tiny_text, tmp_path, monkeypatch):
    """awq+kd spills each linear's transformed float weight as AWQ finishes it: while layer i trains, the later
    layers' weights are memory-mapped from the spill file, not held; the file is gone at the end, and the outputs
    are those of a run that keeps everything in memory."""
    import onnx_ir as ir

    import graphq.kd.engine as engine
    import graphq.kd.train as train
    import graphq.model_io as model_io
    from graphq.kd.engine import KD_SPILL_FILE

    source = tiny_models["llama"]["onnx"]
    monkeypatch.setattr(model_io, "SPILL_MIN_BYTES", 1 << 40)  # nothing this small is spilled by default
    held = quantize(source, kd_config(tiny_text, "awq+kd"), tmp_path / "held", progress=False)
    monkeypatch.setattr(model_io, "SPILL_MIN_BYTES", 0)
    seen, jobs = [], []
    original_train, original_distill = train.train_layer, engine.distill

    def distill(job, before):
        jobs.append(job)
        return original_distill(job, before)

    def train_layer(block, *args, **kwargs):
        linears = [l for l in jobs[-1].known_layers if l.layer_index is not None]
        seen.append(sorted({l.layer_index for l in linears if isinstance(l.weight.const_value, ir.ExternalTensor)
                            and l.weight.const_value.path.endswith(KD_SPILL_FILE)}))
        return original_train(block, *args, **kwargs)

    monkeypatch.setattr(engine, "distill", distill)
    monkeypatch.setattr(train, "train_layer", train_layer)
    spilled = quantize(source, kd_config(tiny_text, "awq+kd"), tmp_path / "spilled", progress=False)
    assert seen == [[0, 1], [1]]  # layer 0's linears are quantized (emitted) once trained
    assert not list((tmp_path / "spilled").rglob(KD_SPILL_FILE))
    assert (tmp_path / "held" / "model.onnx.data").read_bytes() == (tmp_path / "spilled" / "model.onnx.data").read_bytes()
    timeless = lambda report: [{k: v for k, v in e.items() if "seconds" not in k} for e in report["layers"]]  # noqa: E731
    assert timeless(held.report) == timeless(spilled.report)
