"""--workers / --ray-address (graphq.runtimes.workers): 2 local Ray workers give exactly what one process gives.

One local Ray cluster of 2 CPUs serves the whole file: started by the ``pool`` fixture, shut down after the last
test. The killed-worker test arms GRAPHQ_WORKER_CRASH_ONCE's marker file, so one worker call kills its process.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import numpy as np
import pytest

from graphq import QuantConfig, quantize
from graphq.cli import main
from graphq.evaluate import logit_agreement, perplexity, read_text, token_windows
from graphq.runtimes.ort import OrtCausalLM
from graphq.runtimes.workers import CRASH_ONCE_ENV, RAY_MISSING, WorkerPool
from graphq.sensitivity import analyze
from graphq.tokenizer import load_tokenizer
from graphq.verify import verify

from test_layerwise import CALIB_TEXTS



@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    pytest.importorskip("ray")
    marker = tmp_path_factory.mktemp("crash") / "crash-once"
    previous = os.environ.get(CRASH_ONCE_ENV)
    os.environ[CRASH_ONCE_ENV] = str(marker)  # the workers read it: set before the cluster starts
    workers = WorkerPool(workers=2)
    try:
        yield workers, marker
    finally:
        workers.close()
        if previous is None:
            os.environ.pop(CRASH_ONCE_ENV, None)
        else:
            os.environ[CRASH_ONCE_ENV] = previous


def _windows(model_dir, text_path, ctx=32):
    return token_windows(load_tokenizer(model_dir), read_text(text_path), ctx)


def _config(method: str) -> QuantConfig:
    return QuantConfig(scheme="w4a16", group_size=32, method=method, calib_texts=CALIB_TEXTS, num_samples=6, seq_len=24)


def _digest(folder) -> dict[str, str]:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in ("model.onnx", "model.onnx.data")}


@pytest.fixture(scope="module")
def quantized(tiny_models, tmp_path_factory):
    """The tiny llama quantized with awq+gptq in this process (Hessians, channel magnitudes, token samples)."""
    out = tmp_path_factory.mktemp("local") / "awq-gptq"
    quantize(tiny_models["llama"]["onnx"], _config("awq+gptq"), out, progress=False)
    return out


def test_two_workers_give_the_same_perplexity_agreement_and_verify(tiny_models, tiny_text, quantized, pool):
    workers, _ = pool
    onnx_dir = tiny_models["llama"]["onnx"]
    windows = _windows(onnx_dir, tiny_text)
    assert len(windows) > 4  # more windows than workers: both get several, out of order
    model, candidate = OrtCausalLM(onnx_dir, threads=1), OrtCausalLM(quantized, threads=1)
    one = perplexity(model, windows)
    two = perplexity(model, windows, pool=workers)
    assert (two.ppl, two.tokens, two.windows) == (one.ppl, one.tokens, one.windows)
    assert logit_agreement(model, candidate, windows, pool=workers) == logit_agreement(model, candidate, windows)
    local = verify(onnx_dir, quantized, windows, threads=1).to_dict()
    distributed = verify(onnx_dir, quantized, windows, threads=1, pool=workers).to_dict()
    assert distributed.pop("workers") == {"workers": 2, "ray_address": None, "retried": 0}
    assert local.pop("workers") is None
    assert json.dumps(distributed, sort_keys=True) == json.dumps(local, sort_keys=True)


def test_two_workers_give_the_same_sensitivity(tiny_models, pool):
    workers, _ = pool
    config = QuantConfig(scheme="w4a16", group_size=32, calib_texts=CALIB_TEXTS, seq_len=24)
    one = analyze(tiny_models["qwen2"]["onnx"], config, num_windows=2, progress=False)
    two = analyze(tiny_models["qwen2"]["onnx"], config, num_windows=2, progress=False, pool=workers)
    assert two.ranking == one.ranking
    assert [vars(e) for e in two.layers] == [vars(e) for e in one.layers]
    assert two.workers["workers"] == 2 and one.workers is None


def test_two_workers_quantize_bit_identically(tiny_models, quantized, pool, tmp_path):
    workers, _ = pool
    out = tmp_path / "awq-gptq"
    report = quantize(tiny_models["llama"]["onnx"], _config("awq+gptq"), out, progress=False, pool=workers).report
    assert _digest(out) == _digest(quantized)
    assert report["workers"]["retried"] == 0
    local = json.loads((quantized / "report.json").read_text())
    assert [e.get("output_error") for e in report["layers"]] == [e.get("output_error") for e in local["layers"]]


def test_a_killed_worker_is_retried_and_the_model_is_the_same(tiny_models, pool, tmp_path, capfd):
    workers, marker = pool
    onnx_dir = tiny_models["qwen2"]["onnx"]
    local = tmp_path / "local"
    quantize(onnx_dir, _config("awq"), local, progress=False)
    before = workers.retried
    marker.write_text("armed")  # the next worker call renames it to .crashed and kills its own process
    report = quantize(onnx_dir, _config("awq"), tmp_path / "ray", progress=False, pool=workers).report
    assert not marker.exists() and marker.with_name(marker.name + ".crashed").exists()
    assert workers.retried == before + 1
    assert report["workers"]["retried"] == before + 1
    assert "a worker process died and Ray restarted it" in capfd.readouterr().err
    assert _digest(tmp_path / "ray") == _digest(local)


def test_cli_joins_a_running_cluster(tiny_models, tiny_text, pool, capsys):
    """--ray-address joins the test's cluster (this process is connected to it) and leaves it running."""
    pool[0].release()  # its actors hold both of the cluster's CPUs
    onnx_dir = str(tiny_models["llama"]["onnx"])
    args = ["eval", onnx_dir, "--text", str(tiny_text), "--ctx", "32", "--threads", "1", "--json"]
    assert main(args) == 0
    local = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(args + ["--ray-address", "auto", "--workers", "2"]) == 0
    joined = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert joined.pop("workers")["workers"] == 2
    assert joined == local
    import ray

    assert ray.is_initialized()  # the pool that joined did not shut the cluster down


@pytest.mark.parametrize("flags", [["--workers", "2"], ["--ray-address", "auto"]])
def test_workers_without_ray_is_one_line(tiny_models, tiny_text, flags, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError, as without the extra
    status = main(["eval", str(tiny_models["llama"]["onnx"]), "--text", str(tiny_text), "--ctx", "32", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert err == [f"graphq: error: {RAY_MISSING}"]
    assert RAY_MISSING == "--workers needs ray: pip install 'graphq[ray]'"


def test_one_worker_needs_no_ray(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with WorkerPool(workers=1) as local:
        assert list(local.map(lambda: 10, lambda state, item: state + item, range(3))) == [10, 11, 12]
        assert local.summary() is None


def test_an_error_on_a_worker_is_raised_as_itself(pool):
    from graphq.errors import GraphqError

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    workers, _ = pool
    with pytest.raises(GraphqError, match="^bad item 3$"):
        list(workers.map(_setup, _fail_on_three, range(5)))
    assert list(workers.map(_setup, _fail_on_three, range(3))) == [0, 1, 2]  # the actors are still usable


def _setup():
    return np.int64(0)


def _fail_on_three(state, item):
    from graphq.errors import GraphqError

    if item == 3:
        raise GraphqError(f"bad item {item}")
    return int(state + item)


def test_partial_terms_merged_in_order_equal_add():
    """What the workers return (partial) merged in sample order is what add computes, bit for bit."""
    from graphq.algorithms.awq import ChannelMagnitude
    from graphq.algorithms.gptq import HessianAccumulator
    from graphq.algorithms.sparsity import InputSquareNorm

    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((n, 48)).astype(np.float32) for n in (7, 13, 1, 20)]
    for factory, read in ((HessianAccumulator, lambda a: a.hessian()), (ChannelMagnitude, lambda a: a.mean()),
                          (InputSquareNorm, lambda a: a.value())):
        added, merged, worker = factory(), factory(), factory()
        before = 0
        for rows in batches:
            added.add(rows)
            merged.merge(worker.partial(rows, before), len(rows))
            before += len(rows)
        assert read(merged).tobytes() == read(added).tobytes() and merged.tokens == added.tokens
