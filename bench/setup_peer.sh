#!/usr/bin/env bash
# bench/setup_peer.sh NAME: build a peer tool's own virtualenv, bench/.NAME-venv, for the benches that compare graphq
# with it. Peers are never graphq dependencies and never share .venv: each runs in its own interpreter, called by the
# bench as a child process (bench/nncf_awq.py, bench/llmc_sparse.py), and exchanges only files (ONNX / .npy / JSON).
#
#   NAME=nncf  OpenVINO NNCF (PyPI nncf) with its ONNX backend; no torch (the ONNX backend collects statistics in
#              onnxruntime and compresses in numpy), onnx/onnxruntime at graphq's own pins.
#   NAME=llmc  llm-compressor (PyPI llmcompressor), for bench/sparse.py; needs torch, installed first as the CPU build.
#
# Versions are pinned here; everything else is constrained by bench/peers/NAME.txt (the venv's full working set,
# where recorded) and by graphq's requirements/constraints.txt, minus the lines the peer itself pins differently.
# Re-running reuses an existing venv and reinstalls only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=${1:?usage: bench/setup_peer.sh nncf|llmc}
PYTHON=${PYTHON:-python3}
TORCH=torch==2.13.0  # graphq's pin; on PyPI this is the CPU build here (an unpinned torch pulls CUDA wheels)

case "$NAME" in
  nncf)
    NEEDS_TORCH=0
    PACKAGES=(nncf==3.4.0 onnx==1.23.2 onnxruntime==1.32.0)
    DROP=()  # nncf 3.4.0 fits graphq's constraints as they are
    CHECK="import nncf, onnx, onnxruntime; print('nncf', nncf.__version__, 'onnx', onnx.__version__, 'onnxruntime', onnxruntime.__version__)"
    ;;
  llmc)
    NEEDS_TORCH=1
    # llmcompressor 0.14.0.1 is the release that accepts torch 2.13 (torch>=2.10,<=2.14); it requires transformers 5
    # (>=5.15) and compressed-tensors==0.19.0, so graphq's transformers / compressed-tensors / hub / tokenizers /
    # optimum pins (transformers 4.57) are dropped for this venv and those come from llmcompressor's own requirements.
    PACKAGES=(llmcompressor==0.14.0.1 compressed-tensors==0.19.0 transformers==5.17.0 datasets==5.2.0)
    DROP=(transformers compressed-tensors huggingface_hub tokenizers optimum optimum-onnx)
    CHECK="import llmcompressor, torch, transformers; print('llmcompressor', llmcompressor.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
    ;;
  *)
    echo "bench/setup_peer.sh: unknown peer '$NAME' (known: nncf, llmc)" >&2
    exit 2
    ;;
esac

VENV=bench/.$NAME-venv
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
CONSTRAINTS="$VENV/constraints.txt"
if [ ${#DROP[@]} -gt 0 ]; then
  pattern="^($(IFS='|'; echo "${DROP[*]}"))=="
  grep -viE "$pattern" requirements/constraints.txt > "$CONSTRAINTS"
else
  cp requirements/constraints.txt "$CONSTRAINTS"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
PINS=()
[ -f "bench/peers/$NAME.txt" ] && PINS=(-c "bench/peers/$NAME.txt")
if [ "$NEEDS_TORCH" = 1 ]; then
  # torch first, alone, so that nothing after it can pull another build.
  "${PIP[@]}" "$TORCH" 2> >(grep -v "^WARNING: Location" >&2)
fi
"${PIP[@]}" -c "$CONSTRAINTS" "${PINS[@]}" "${PACKAGES[@]}" 2> >(grep -v "^WARNING: Location" >&2)
if [ "$NEEDS_TORCH" = 0 ] && "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "bench/setup_peer.sh: warning: $VENV has torch although $NAME does not need it" >&2
fi
echo "bench/setup_peer.sh: $VENV ready: $("$VENV/bin/python" -c "$CHECK" 2>&1 | tail -1)"
