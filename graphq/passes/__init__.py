"""Graph passes: each takes an ONNX IR model (and statistics) and rewrites it in place."""
