#!/usr/bin/env bash
# The main job on the default model: export SmolLM2-135M to ONNX, quantize it to W4A16 (group 128, RTN,
# MatMulNBits, lm_head float), and measure in onnxruntime how much accuracy moved on Pride and Prejudice.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
GGUF=$(.venv/bin/python -m graphq.default_model)
TEXT=${GRAPHQ_EVAL_TEXT:-../shared/data/austen/prideprejudice.txt}
OUT=${GRAPHQ_DEMO_OUT:-out/demo}
G=.venv/bin/graphq
[ -f "$OUT/fp32/model.onnx" ] || $G export "$GGUF" -o "$OUT/fp32" --overwrite
$G quantize "$OUT/fp32" -o "$OUT/w4a16-g128" --scheme w4a16 --group-size 128 --asym --overwrite
echo "== float32"
$G eval "$OUT/fp32" --text "$TEXT" --max-tokens 4096
echo "== w4a16 g128 asym"
$G eval "$OUT/w4a16-g128" --text "$TEXT" --max-tokens 4096
echo "== agreement with float32"
$G compare "$OUT/fp32" "$OUT/w4a16-g128" --text "$TEXT" --max-tokens 2048
echo "report: $OUT/w4a16-g128/report.json"
