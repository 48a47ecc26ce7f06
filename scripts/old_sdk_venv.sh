#!/usr/bin/env bash
# A venv holding an older `tinker` SDK (default 0.24.1, the oldest the server supports) for
# tests/test_tinker_old_sdk.py, which runs it against a real server in a subprocess.
# Minimal: the SDK --no-deps plus the packages it imports to train, sample and checkpoint
# (transformers, which it imports only for get_tokenizer(), and torch are left out: pip then warns
# that tinker requires transformers, which is expected).
#   scripts/old_sdk_venv.sh            -> .venv-tinker-0.24.1
#   scripts/old_sdk_venv.sh 0.30.4     -> .venv-tinker-0.30.4 (then TINKER_OLD_SDK=0.30.4 pytest ...)
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:-0.24.1}
PYTHON=${PYTHON:-python3}
VENV=".venv-tinker-$VERSION"
if "$VENV/bin/python" -c "import tinker, sys; sys.exit(tinker.__version__ != '$VERSION')" 2>/dev/null; then
    echo "tinker $VERSION in $VENV (already there)"
    exit 0
fi
"$PYTHON" -m venv --clear "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps "tinker==$VERSION"
"$VENV/bin/pip" install --quiet --disable-pip-version-check "anyio>=3.5,<5" "click>=8" "distro>=1.7,<2" \
    "httpx[http2]>=0.23,<1" numpy "orjson>=3.10" "protobuf>=4.21" "pydantic>=1.9,<3" "pyqwest>=0.4.1" \
    "rich>=13" sniffio "typing-extensions>=4.10,<5" "zstandard>=0.24"
"$VENV/bin/python" -c "import tinker; print('tinker', tinker.__version__, 'in $VENV')"
