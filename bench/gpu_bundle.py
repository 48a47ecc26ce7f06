"""What bench/gpu_check.py needs on a GPU machine without network, in bench/.bundle/ (git-ignored):

    python bench/gpu_bundle.py [--python 3.10 3.11 3.12 3.13]

  * pydantic (the engine's wire types) and pytest (the engine tests), with their dependencies, as
    wheels for Linux x86_64 and each Python version in bench/.bundle/wheels/ (gpu_check unpacks those
    of its Python into a temporary folder on its path, only where pydantic is not installed);
  * the Qwen2-0.5B-Instruct config and tokenizer from ../shared (the random-weight models' shape).
About 15 MB; carry the folder along with the working tree (the device tool's `carry`).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bench" / ".bundle"
WHEELS = BUNDLE / "wheels"
PACKAGES = ["pydantic>=2.7", "pytest>=8"]


def bundle(python: str) -> None:
    """The wheels for `python` into bench/.bundle/wheels/ (the pure-Python ones are shared)."""
    WHEELS.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--only-binary=:all:",
            "--dest",
            str(WHEELS),
            "--python-version",
            python,
            "--platform",
            "manylinux2014_x86_64",
            "--platform",
            "manylinux_2_17_x86_64",
            "--implementation",
            "cp",
            *PACKAGES,
        ],
        check=True,
    )


def compatible(wheel: Path) -> bool:
    """Whether this Python can import `wheel` (its tag is py3, or cpXY of this interpreter)."""
    python_tag = wheel.name.split("-")[-3]
    return any(tag in ("py3", f"cp{sys.version_info.major}{sys.version_info.minor}") for tag in python_tag.split("."))


def unpack(target: Path) -> list[str]:
    """The wheels this Python can import, unpacked into `target` (a site folder); their names."""
    names = []
    for wheel in sorted(WHEELS.glob("*.whl")):
        if compatible(wheel):
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(target)
            names.append(wheel.name)
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", nargs="+", default=["3.10", "3.11", "3.12", "3.13"])
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from eztinker.tiny import qwen2_config_dir

    config = BUNDLE / "qwen2-0.5b-instruct-config"
    if config.exists():
        shutil.rmtree(config)
    shutil.copytree(qwen2_config_dir(), config)
    for path in config.rglob("*"):
        path.chmod(0o644)
    for python in args.python:
        bundle(python)
    print(f"{WHEELS}: {len(list(WHEELS.glob('*.whl')))} wheels")


if __name__ == "__main__":
    main()
