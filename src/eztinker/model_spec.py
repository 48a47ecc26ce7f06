"""Model specs as --model takes them: 'NAME=SOURCE' serves SOURCE under another name. No torch
here: the settings check specs before any model loads."""

from __future__ import annotations

from pathlib import Path


def split_model_spec(spec: str) -> tuple[str | None, str]:
    """'NAME=SOURCE' -> (NAME, SOURCE): SOURCE (a local folder, a Hub id, 'smollm2-135m' or 'auto')
    served under NAME, e.g. 'Qwen/Qwen3-4B-Instruct-2507=/models/qwen3-4b' for recipes that look a
    model up by its Hub name. A spec without '=' (or an existing path holding one) -> (None, spec)."""
    name, sep, source = spec.partition("=")
    if not sep or Path(spec).exists():
        return None, spec
    if not name.strip() or not source.strip():
        raise ValueError(f"model {spec!r}: give NAME=SOURCE with both parts, e.g. Qwen/Qwen3-4B-Instruct-2507=/path")
    return name.strip(), source.strip()


def served_name(spec: str) -> str:
    """The name a model spec is served under (its NAME, else the spec itself; 'auto' resolves later)."""
    name, source = split_model_spec(spec)
    return name or source
