"""GRAPHQ_THREADS caps numpy's BLAS inside quantize/analyze and onnxruntime's pools; bad values are one line."""

from __future__ import annotations

import numpy as np
import pytest
from threadpoolctl import threadpool_info

from graphq.errors import GraphqError
from graphq.runtimes.ort import session_options
from graphq.threads import blas_threads, busy_machine_hint, configured_threads, with_configured_threads


def blas_thread_counts() -> list[int]:
    return [entry["num_threads"] for entry in threadpool_info() if entry["user_api"] == "blas"]


def test_graphq_threads_caps_blas_and_onnxruntime(monkeypatch):
    np.ones(2) @ np.ones(2)  # numpy's BLAS is loaded
    monkeypatch.setenv("GRAPHQ_THREADS", "1")
    assert configured_threads() == 1 and session_options().intra_op_num_threads == 1

    @with_configured_threads
    def inside() -> list[int]:
        return blas_thread_counts()

    before = blas_thread_counts()
    assert before and inside() == [1] * len(before)
    assert blas_thread_counts() == before  # restored on the way out
    assert busy_machine_hint() is None  # a count was set: nothing to suggest
    monkeypatch.setenv("GRAPHQ_THREADS", "0")
    assert configured_threads() is None and session_options().intra_op_num_threads == 0
    with blas_threads():
        assert blas_thread_counts() == before


@pytest.mark.parametrize("value, problem", [("two", "not a whole number"), ("-1", "negative")])
def test_bad_thread_counts_are_one_line(monkeypatch, value, problem):
    monkeypatch.setenv("GRAPHQ_THREADS", value)
    with pytest.raises(GraphqError, match=problem) as error:
        configured_threads()
    assert "\n" not in str(error.value) and "GRAPHQ_THREADS" in str(error.value)


def test_busy_machine_hint_follows_the_load(monkeypatch):
    monkeypatch.delenv("GRAPHQ_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr("os.getloadavg", lambda: (3.5, 3.0, 2.0))
    assert "GRAPHQ_THREADS=1" in busy_machine_hint() and "load 3.5 on 2 cores" in busy_machine_hint()
    monkeypatch.setattr("os.getloadavg", lambda: (0.4, 0.3, 0.2))
    assert busy_machine_hint() is None


def test_busy_hint_comes_after_a_finished_run_and_never_with_an_error(monkeypatch, tiny_models, tmp_path, capsys):
    """On a loaded machine a refused input is still one error line; a finished quantize ends with the hint."""
    from graphq.cli import main
    from tests.test_cli import assert_one_error

    monkeypatch.delenv("GRAPHQ_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr("os.getloadavg", lambda: (6.0, 6.0, 6.0))
    model = str(tiny_models["llama"]["onnx"])
    code = main(["quantize", model, "-o", str(tmp_path / "bad"), "--scheme", "w4a16", "--group-size", "12"])
    captured = capsys.readouterr()
    assert_one_error(code, captured.out, captured.err, "group size 12")
    assert main(["quantize", model, "-o", str(tmp_path / "ok"), "--scheme", "w4a16"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("graphq:")]
    assert lines[-1].startswith("graphq: note: the machine was busy") and "load 6.0 on 2 cores" in lines[-1]
