"""The float torch model as a reference: same windowed-logits interface as OrtCausalLM."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class TorchCausalLM:
    def __init__(self, model_dir: str | Path, gguf_file: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM

        self._torch = torch
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, **kwargs).eval()

    def logits(self, ids: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.no_grad():
            tensor = torch.as_tensor(np.asarray(ids, dtype=np.int64)).reshape(1, -1)
            return self.model(input_ids=tensor, use_cache=False).logits[0].float().numpy()
