"""onnxruntime sessions for exported causal LMs: full-window logits and incremental decoding."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from graphq.errors import GraphqError
from graphq.model_io import resolve_model_file
from graphq.threads import configured_threads

_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)")
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def session_options(threads: int | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is None:
        threads = configured_threads() or 0
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # onnxruntime fuses DequantizeLinear + MatMul into MatMulNBits and by default computes it with int8
    # activations (accuracy level 4); measure what the QDQ graph says, in float.
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return options


def create_session(model_path: str | Path, threads: int | None = None) -> ort.InferenceSession:
    model_file = resolve_model_file(model_path)
    try:
        return ort.InferenceSession(str(model_file), session_options(threads), providers=["CPUExecutionProvider"])
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GraphqError(f"onnxruntime cannot load {model_file}: {first_line}") from exc


class OrtCausalLM:
    """A decoder exported with past key/values (optimum's text-generation-with-past), driven window by window."""

    def __init__(self, model_path: str | Path, threads: int | None = None, session: ort.InferenceSession | None = None):
        self.session = session if session is not None else create_session(model_path, threads)
        self._reopen = (type(self), (model_path, threads)) if session is None else None
        self.input_names = [i.name for i in self.session.get_inputs()]
        if "input_ids" not in self.input_names:
            raise GraphqError(f"{model_path} has no input_ids input: it is not a causal language model export")
        self._past_specs = {}
        for spec in self.session.get_inputs():
            if _PAST.fullmatch(spec.name):
                dims = list(spec.shape)
                if not isinstance(dims[1], int) or not isinstance(dims[3], int):
                    raise GraphqError(f"cannot infer the KV-cache shape of {spec.name} ({dims})")
                self._past_specs[spec.name] = (dims[1], dims[3], _ORT_TYPES.get(spec.type, np.float32))
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._present_for = {name: name.replace("past_key_values", "present") for name in self._past_specs}

    def __reduce__(self):
        """Pickled as the path it was opened from: a worker process opens its own session (graphq.runtimes.workers)."""
        if self._reopen is None:
            raise TypeError(f"{type(self).__name__} built from a session cannot be sent to another process")
        return self._reopen

    def _feeds(self, ids: np.ndarray, past: dict[str, np.ndarray] | None, past_length: int) -> dict[str, np.ndarray]:
        batch, length = ids.shape
        feeds: dict[str, np.ndarray] = {"input_ids": ids.astype(np.int64)}
        if "attention_mask" in self.input_names:
            feeds["attention_mask"] = np.ones((batch, past_length + length), dtype=np.int64)
        if "position_ids" in self.input_names:
            feeds["position_ids"] = np.broadcast_to(
                np.arange(past_length, past_length + length, dtype=np.int64), (batch, length)
            ).copy()
        for name, (heads, head_dim, dtype) in self._past_specs.items():
            feeds[name] = past[name] if past is not None else np.zeros((batch, heads, 0, head_dim), dtype=dtype)
        return feeds

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Logits [T, vocab] (float32) for one sequence of token ids, from an empty cache."""
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        (logits,) = self.session.run(["logits"], self._feeds(ids, None, 0))
        return logits[0].astype(np.float32)

    def greedy_decode(self, prompt: np.ndarray, new_tokens: int, step_seconds: list[float] | None = None) -> list[int]:
        """Greedy generation with the KV cache; returns the generated token ids. ``step_seconds`` receives each
        step's time: the prompt's prefill first, then one entry per decoded token."""
        ids = np.asarray(prompt, dtype=np.int64).reshape(1, -1)
        past = None
        past_length = 0
        generated: list[int] = []
        present_names = list(self._present_for.values())
        for _ in range(new_tokens):
            started = time.perf_counter()
            outputs = self.session.run(["logits", *present_names], self._feeds(ids, past, past_length))
            if step_seconds is not None:
                step_seconds.append(time.perf_counter() - started)
            past_length += ids.shape[1]
            next_id = int(np.argmax(outputs[0][0, -1]))
            generated.append(next_id)
            past = {name: value for name, value in zip(self._past_specs, outputs[1:])}
            ids = np.array([[next_id]], dtype=np.int64)
        return generated
