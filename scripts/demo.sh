#!/usr/bin/env bash
# The main job on the default model: export SmolLM2-135M to ONNX, quantize it to W4A16 (group 128, MatMulNBits,
# lm_head float) with RTN and with AWQ calibrated on Sense and Sensibility, and measure in onnxruntime how much
# accuracy moved on Pride and Prejudice.
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
for variant in fp32 w4a16-g128-rtn w4a16-g128-awq; do
  echo "== $variant"
  $G eval "$OUT/$variant" --text "$TEXT" --max-tokens 4096
done
echo "== agreement of w4a16-g128-awq with float32"
$G compare "$OUT/fp32" "$OUT/w4a16-g128-awq" --text "$TEXT" --max-tokens 2048
echo "reports: $OUT/w4a16-g128-rtn/report.json $OUT/w4a16-g128-awq/report.json"
