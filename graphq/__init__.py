"""graphq: post-export quantizer and compressor for ONNX graphs of large language models."""

from graphq.config import QuantConfig
from graphq.errors import GraphqError
from graphq.version import __version__

# Imported eagerly, not through lazy wrappers: importing the submodules graphq.quantize / graphq.export (as the CLI
# and tests do) rebinds these package attributes to the modules, so a lazy wrapper would be replaced by a module.
from graphq.export import export  # noqa: E402  (export a Hugging Face folder or GGUF file to ONNX)
from graphq.quantize import quantize  # noqa: E402  (quantize an exported ONNX LLM)

__all__ = ["QuantConfig", "GraphqError", "quantize", "export", "__version__"]
