#!/usr/bin/env bash
# The main job on the default model: export SmolLM2-135M to ONNX, quantize it to W4A16 (group 128, MatMulNBits,
# lm_head float) with RTN and with AWQ, and to W8A8 static with SmoothQuant, calibrated on Sense and Sensibility, and
# measure in onnxruntime how much accuracy moved on Pride and Prejudice (graphq verify, with an HTML report).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
GGUF=$(.venv/bin/python -m graphq.default_model)
TEXT=${GRAPHQ_EVAL_TEXT:-../shared/data/austen/prideprejudice.txt}
OUT=${GRAPHQ_DEMO_OUT:-out/demo}
G=.venv/bin/graphq
[ -f "$OUT/fp32/model.onnx" ] || $G export "$GGUF" -o "$OUT/fp32" --overwrite
CALIB=${GRAPHQ_CALIB_TEXT:-../shared/data/austen/sensesensibility.txt}
[ -f "$CALIB" ] || CALIB=samples/calibration_sense_and_sensibility.txt
$G quantize "$OUT/fp32" -o "$OUT/w4a16-g128-rtn" --scheme w4a16 --group-size 128 --asym --overwrite
$G quantize "$OUT/fp32" -o "$OUT/w4a16-g128-awq" --scheme w4a16 --group-size 128 --asym --method awq \
  --calib "$CALIB" --num-samples 16 --overwrite
$G quantize "$OUT/fp32" -o "$OUT/w8a8-smoothquant" --scheme w8a8 --smooth smoothquant --smooth-alpha auto \
  --calib "$CALIB" --num-samples 8 --overwrite
for variant in w4a16-g128-rtn w4a16-g128-awq w8a8-smoothquant; do
  echo "== $variant against float32"
  $G verify "$OUT/fp32" "$OUT/$variant" --text "$TEXT" --max-tokens 4096 --worst 5 --html "$OUT/$variant/verify.html"
done
$G inspect "$OUT/w4a16-g128-awq"
echo "reports: $OUT/*/report.json, $OUT/*/verify.html; deployment artifacts: $OUT/*/quant_model_*"
