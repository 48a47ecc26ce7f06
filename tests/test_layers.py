"""The layers stay apart: the server (routes, service, runner, store) and the backend interface
import no model code, so the server never learns where or how an engine computes."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "eztinker"
MAX_MODULE_LINES = 520
# The packages whose modules are held to MAX_MODULE_LINES (each, one job); more join as they are split.
SIZE_CHECKED = ["engine"]

SERVER_SIDE = [
    "eztinker.atomic_writes",
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


@pytest.mark.parametrize("package", SIZE_CHECKED)
def test_modules_stay_small(package):
    """A module over ~500 lines holds more than one job (engine.py was a 1,276-line god class)."""
    sizes = {
        path.relative_to(PACKAGE).as_posix(): len(path.read_text().splitlines())
        for path in PACKAGE.glob(f"{package}/**/*.py")
    }
    assert sizes, f"no modules under {PACKAGE / package}"
    assert {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES} == {}


# Routers: they parse their protocol and call the service, which alone reaches the store, the
# runner and the backend behind it.
SERVER = Path(__file__).resolve().parents[1] / "src" / "eztinker" / "server"
ROUTERS = sorted(
    [
        *(SERVER / "tinker").glob("*.py"),
        *(SERVER / "openai").glob("*.py"),
        *(SERVER / "ui").glob("*.py"),
        SERVER / "rest.py",
        SERVER / "evaluations.py",
        SERVER / "downloads.py",
    ]
)
BEHIND_THE_SERVICE = ("eztinker.server.store", "eztinker.backend", "eztinker.engine")
# The typed command results are data every layer reads (as eztinker.types is), not the backend.
SHARED_DATA = ("eztinker.backend.results",)
SERVICE_INTERNALS = {"store", "backend", "runner"}


def _package_of(path: Path) -> str:
    """The package a module's relative imports start from."""
    parts = path.relative_to(SERVER.parents[1]).with_suffix("").parts
    return ".".join(parts[:-1])


def _imported(source: str, package: str) -> set[str]:
    """Every module `source` imports (relative imports resolved; `from a import b` counts a and a.b)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = parts[: len(parts) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _behind_the_service(modules: set[str]) -> set[str]:
    return {m for m in modules if _within(m, BEHIND_THE_SERVICE) and not _within(m, SHARED_DATA)}


def _service_internals_read(source: str) -> list[str]:
    """`service.store`, `self.service.backend`, ...: an internal of the service reached through it."""
    reads = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in SERVICE_INTERNALS:
            owner = node.value
            name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
            if name == "service":
                reads.append(f"{node.lineno}: {ast.unparse(node)}")
    return reads


def test_the_layer_checks_catch_a_router_reaching_past_the_service():
    leaky = (
        "from ..store import Store\n"
        "from ...backend import commands\n"
        "from .. import records\n"
        "from ...backend.results import Samples\n"
        "import eztinker.engine\n"
        "def f(self, service):\n"
        "    return self.service.store.run('r'), service.backend, self.service.models\n"
    )
    imported = _imported(leaky, "eztinker.server.tinker")
    assert _behind_the_service(imported) == {
        "eztinker.server.store",
        "eztinker.server.store.Store",
        "eztinker.backend",
        "eztinker.backend.commands",
        "eztinker.engine",
    }
    assert sorted(_service_internals_read(leaky)) == ["7: self.service.store", "7: service.backend"]


def test_routers_import_neither_the_store_nor_the_backend():
    assert len(ROUTERS) > 10
    offending = sorted(
        f"{path.relative_to(SERVER)}: {module}"
        for path in ROUTERS
        for module in _behind_the_service(_imported(path.read_text(), _package_of(path)))
    )
    assert not offending, offending


def test_routers_reach_nothing_behind_the_service():
    # app.py too: it builds the service and maps the database's "busy" to a 503, but asks the
    # service for what it serves (the metrics page).
    reads = [
        f"{path.relative_to(SERVER)}:{read}"
        for path in [*ROUTERS, SERVER / "app.py"]
        for read in _service_internals_read(path.read_text())
    ]
    assert not reads, reads
