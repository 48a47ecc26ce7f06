"""The layers stay apart: the server (routes, service, runner, store) and the backend interface
import no model code, so the server never learns where or how an engine computes."""

from __future__ import annotations

import subprocess
import sys

SERVER_SIDE = [
    "eztinker.server.app",
    "eztinker.server.service",
    "eztinker.server.rest",
    "eztinker.server.runner",
    "eztinker.server.store",
    "eztinker.server.auth",
    "eztinker.server.archive",
    "eztinker.server.metrics",
    "eztinker.server.openai.router",
    "eztinker.server.openai.protocol",
    "eztinker.server.openai.serving",
    "eztinker.server.openai.answers",
    "eztinker.backend",
    "eztinker.backend.commands",
    "eztinker.backend.results",
    "eztinker.backend.ray",
]


def test_server_modules_import_no_torch_safetensors_or_transformers():
    code = (
        "import sys, importlib\n"
        + "".join(f"importlib.import_module({m!r})\n" for m in SERVER_SIDE)
        + ("print(sorted(m for m in ('torch', 'safetensors', 'transformers', 'peft') if m in sys.modules))")
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
