"""The per-layer plan file (issue 12): graphq plan -> edit -> quantize --plan; the report and the plan it writes
agree with the plan, edits take effect, and bad plans get one line naming the entry."""

from __future__ import annotations

import json

import numpy as np
import pytest

from graphq.cli import main
from graphq.config import QuantConfig
from graphq.errors import GraphqError
from graphq.layer_plan import PLAN_FILE, default_plan
from graphq.quantize import quantize
from graphq.runtimes.ort import OrtCausalLM


def settings_of(entry: dict) -> tuple:
    weight = entry["weight"]
    if weight["bit"] == 16:
        return (16,)
    return weight["bit"], entry["input"]["bit"], weight["group_size"], weight["symmetric"], weight["method"]


def report_settings(entry: dict) -> tuple:
    if "skipped" in entry:
        return (16,)
    input_bits = 8 if entry["scheme"].startswith("w8a8") else 16
    return entry["bits"], input_bits, entry["group_size"], entry["symmetric"], entry["method"]


def edited_plan(source, path, **options) -> dict:
    plan = default_plan(source, QuantConfig(group_size=32, **options).validate())
    strategy = plan["layer_strategy"]
    strategy["model.layers.0.mlp.down_proj"]["weight"]["bit"] = 8  # w8a16
    strategy["model.layers.1.self_attn.k_proj"]["weight"] = {"bit": 16}  # float
    strategy["model.layers.0.self_attn.q_proj"]["weight"]["group_size"] = 16
    strategy["model.layers.1.mlp.up_proj"]["weight"]["symmetric"] = True
    strategy["lm_head"]["weight"] = {"bit": 4, "group_size": 32, "symmetric": False, "method": "rtn"}
    path.write_text(json.dumps(plan))
    return strategy


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_plan_round_trips_and_edits_take_effect(kind, tiny_models, tmp_path):
    source = tiny_models[kind]["onnx"]
    assert main(["plan", str(source), "-o", str(tmp_path / "default.json"), "--group-size", "32"]) == 0
    default = json.loads((tmp_path / "default.json").read_text())["layer_strategy"]
    assert default["model.embed_tokens"]["quant_strategy"] == "Quant_Embed_MinMax"
    assert default["lm_head"]["weight"] == {"bit": 16} or kind == "qwen2"
    assert default["model.layers.0.self_attn.q_proj"]["quant_strategy"] == "Quant_act_weight_eco"
    assert default["model.layers.0.self_attn.q_proj"]["weight"] == {"bit": 4, "group_size": 32, "symmetric": False,
                                                                     "method": "rtn"}
    if kind == "qwen2":  # tied: lm_head has no linear of its own
        return
    strategy = edited_plan(source, tmp_path / "plan.json")
    result = quantize(source, QuantConfig(group_size=32, plan=str(tmp_path / "plan.json")), tmp_path / "out",
                      progress=False)
    by_name = {entry["name"]: entry for entry in result.report["layers"]}
    for name, entry in strategy.items():
        if name in by_name:
            assert report_settings(by_name[name]) == settings_of(entry), name
    assert by_name["model.layers.0.mlp.down_proj"]["scheme"] == "w8a16"
    assert by_name["model.layers.1.self_attn.k_proj"]["skipped"] == "float in the plan"
    assert by_name["lm_head"]["bits"] == 4  # the plan quantizes lm_head without --quantize-lm-head
    # The output carries the plan it used; rerunning with it gives the same model.
    used = json.loads((tmp_path / "out" / PLAN_FILE).read_text())["layer_strategy"]
    assert {n: settings_of(e) for n, e in used.items()} == {n: settings_of(e) for n, e in strategy.items()}
    again = quantize(source, QuantConfig(plan=str(tmp_path / "out" / PLAN_FILE)), tmp_path / "again", progress=False)
    ids = np.arange(3, 40)
    np.testing.assert_array_equal(OrtCausalLM(result.output_dir).logits(ids), OrtCausalLM(again.output_dir).logits(ids))


def test_plan_entry_methods_and_embedding(tiny_models, tiny_text, tmp_path):
    source = tiny_models["llama"]["onnx"]
    plan = default_plan(source, QuantConfig(group_size=32).validate())
    strategy = plan["layer_strategy"]
    strategy["model.layers.1.mlp.up_proj"]["weight"]["method"] = "awq"
    strategy["model.embed_tokens"]["weight"] = {"bit": 8, "group_size": 32}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    result = quantize(source, QuantConfig(plan=str(tmp_path / "plan.json"), calib=str(tiny_text), num_samples=4,
                                          seq_len=32), tmp_path / "out", progress=False)
    by_name = {entry["name"]: entry for entry in result.report["layers"]}
    assert by_name["model.layers.1.mlp.up_proj"]["method"] == "awq" and "awq_ratio" in by_name["model.layers.1.mlp.up_proj"]
    assert by_name["model.layers.0.mlp.up_proj"]["method"] == "rtn"
    assert result.report["embedding"]["bits"] == 8


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.__setitem__("model.layers.9.mlp.up_proj", {"weight": {"bit": 4}}), "plan entry 'model.layers.9.mlp.up_proj' names no tensor"),
    (lambda s: s["model.layers.0.mlp.up_proj"]["weight"].__setitem__("bit", 5), "plan entry 'model.layers.0.mlp.up_proj': weight bit 5"),
    (lambda s: s["model.layers.0.mlp.up_proj"]["weight"].__setitem__("group_size", 24), "group_size 24"),
    (lambda s: s["model.layers.0.mlp.up_proj"].update(weight={"bit": 8, "group_size": 32}, input={"bit": 8}),
     "symmetric int8 per channel"),
    (lambda s: s["model.layers.0.mlp.up_proj"].pop("weight"), "plan entry 'model.layers.0.mlp.up_proj' needs"),
    (lambda s: s["model.layers.0.mlp.up_proj"]["weight"].__setitem__("method", "best"), "unknown method 'best'"),
    (lambda s: s["model.embed_tokens"]["weight"].__setitem__("bit", 3), "an embedding takes weight bit 4, 8 or 16"),
])
def test_bad_plans_get_one_line_naming_the_entry(edit, message, tiny_models, tmp_path):
    source = tiny_models["llama"]["onnx"]
    plan = default_plan(source, QuantConfig(group_size=32).validate())
    edit(plan["layer_strategy"])
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(GraphqError) as info:
        quantize(source, QuantConfig(plan=str(tmp_path / "plan.json")), tmp_path / "out", progress=False)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, message", [("{", "is not valid JSON"), ('{"layers": {}}', "no 'layer_strategy'")])
def test_unreadable_plan_files(text, message, tiny_models, tmp_path):
    (tmp_path / "plan.json").write_text(text)
    with pytest.raises(GraphqError, match=message):
        quantize(tiny_models["llama"]["onnx"], QuantConfig(plan=str(tmp_path / "plan.json")), tmp_path / "out",
                 progress=False)


def test_a_sparse_w8a8s_run_writes_a_plan_that_repeats_it(tiny_models, tiny_text, tmp_path):
    """w8a8s is not named by its bits (8/8 is w8a8): its entries carry graphq's extra "scheme" key."""
    source = tiny_models["llama"]["onnx"]
    config = QuantConfig(scheme="w8a8s", method="magnitude", sparsity=0.5, calib=str(tiny_text), num_samples=4,
                         seq_len=32)
    first = quantize(source, config, tmp_path / "s", progress=False)
    used = json.loads((tmp_path / "s" / PLAN_FILE).read_text())["layer_strategy"]
    assert used["model.layers.0.mlp.up_proj"]["scheme"] == "w8a8s"
    again = quantize(source, QuantConfig(plan=str(tmp_path / "s" / PLAN_FILE), method="magnitude", sparsity=0.5,
                                         calib=str(tiny_text), num_samples=4, seq_len=32), tmp_path / "again",
                     progress=False)
    assert [e["scheme"] for e in again.report["layers"]] == [e["scheme"] for e in first.report["layers"]]
    used["model.layers.0.mlp.up_proj"]["input"]["bit"] = 16
    (tmp_path / "bad.json").write_text(json.dumps({"layer_strategy": used}))
    with pytest.raises(GraphqError, match="scheme 'w8a8s' does not match weight bit 8 / input bit 16"):
        quantize(source, QuantConfig(plan=str(tmp_path / "bad.json")), tmp_path / "bad", progress=False)
