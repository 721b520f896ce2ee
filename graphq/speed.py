"""How fast a model runs in onnxruntime CPU: prefill and greedy decode with the KV cache (present -> past).

Batch-1 decode reads every weight once per token, so it is memory-bound and shows what smaller weights buy;
prefill of a long prompt is compute-bound. Each measurement is the best of ``repeats`` timed runs after a warm-up
(the first runs allocate), the usual way to time a noisy shared CPU; each step is timed around the session run
alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from graphq.errors import GraphqError
from graphq.runtimes.ort import OrtCausalLM


@dataclass
class Speed:
    prompt_tokens: int
    new_tokens: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def _warm_up(model: OrtCausalLM, prompt: np.ndarray) -> None:
    model.greedy_decode(prompt, 4)


def _timed_run(model: OrtCausalLM, prompt: np.ndarray, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, seconds of the ``new_tokens`` decode steps after it), from one cached greedy decode."""
    steps: list[float] = []
    model.greedy_decode(prompt, new_tokens + 1, step_seconds=steps)
    return steps[0], sum(steps[1:])


def compare_speed(models: dict[str, str | Path], prompt: np.ndarray, new_tokens: int = 64,
                  threads: int | None = None, repeats: int = 3) -> dict[str, Speed]:
    """{name: Speed} of each model, the runs alternating between them so all see the same machine load."""
    prompt = np.asarray(prompt, dtype=np.int64).reshape(-1)
    if len(prompt) < 1 or new_tokens < 1 or repeats < 1:
        raise GraphqError("speed: the prompt, the decode tokens and the repeats must each be at least 1")
    sessions = {name: OrtCausalLM(path, threads=threads) for name, path in models.items()}
    for session in sessions.values():
        _warm_up(session, prompt)
    best = {name: (float("inf"), float("inf")) for name in sessions}
    for _ in range(repeats):
        for name, session in sessions.items():
            prefill, decode = _timed_run(session, prompt, new_tokens)
            best[name] = (min(best[name][0], prefill), min(best[name][1], decode))
    return {name: Speed(len(prompt), new_tokens, len(prompt) / prefill, new_tokens / decode)
            for name, (prefill, decode) in best.items()}


def format_speed(speeds: dict[str, Speed]) -> str:
    base = next(iter(speeds.values()))
    lines = [f"speed (onnxruntime CPU, batch 1, prompt {base.prompt_tokens} tokens, decode {base.new_tokens} tokens, "
             "best of the runs):",
             f"  {'model':<10} {'prefill tok/s':>14} {'decode tok/s':>13} {'decode vs float':>16}"]
    for name, speed in speeds.items():
        lines.append(f"  {name:<10} {speed.prefill_tokens_per_s:>14.1f} {speed.decode_tokens_per_s:>13.1f} "
                     f"{speed.decode_tokens_per_s / base.decode_tokens_per_s:>15.2f}x")
    return "\n".join(lines)
