"""Runtime adapters: onnxruntime sessions (and, for reference and KD, torch)."""
