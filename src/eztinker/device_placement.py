"""Which device each base model goes on: a pure function of the requests and the GPUs visible.

`--device` is repeatable. Each entry is a device ('cpu', 'cuda', 'cuda:1') or 'MODEL=DEVICE' for
one model. Plain entries: one for every model not named, or one per `--model` in order. A model
with no device of its own, or 'cuda' without an index, goes on the visible GPU holding the fewest
models so far (the lowest index on a tie), so that several models spread over the GPUs instead of
all landing on cuda:0; without a GPU it stays on the CPU. No torch here: the settings check the
requests' shape before anything heavy is imported; the count of GPUs is checked at load time.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

_DEVICE = re.compile(r"^(cpu|cuda|mps)(:\d+)?$")


class PlacementError(ValueError):
    """A device request that cannot be honoured; the message names it."""


@dataclass(frozen=True)
class DeviceRequests:
    """Parsed `--device` entries: per model by name, and the plain ones in order."""

    named: dict[str, str]
    plain: tuple[str, ...]


def parse_device_requests(models: Sequence[str], entries: Sequence[str]) -> DeviceRequests:
    """Check the entries' form against the models (no GPU count needed). Raises PlacementError."""
    named: dict[str, str] = {}
    plain: list[str] = []
    for entry in entries:
        model, sep, device = entry.rpartition("=")
        device = device.strip()
        if not _DEVICE.match(device):
            raise PlacementError(f"{entry!r}: a device is 'cpu', 'cuda' or 'cuda:N' (or 'MODEL=DEVICE')")
        if not sep:
            plain.append(device)
        elif model not in models:
            raise PlacementError(f"{entry!r} names no --model (models: {', '.join(models)})")
        elif model in named:
            raise PlacementError(f"two devices for {model!r}")
        else:
            named[model] = device
    if len(plain) > 1 and (named or len(plain) != len(models)):
        raise PlacementError(
            f"give one device for every model, one per --model ({len(models)}), or MODEL=DEVICE "
            f"entries; got {len(plain)} plain device(s) for {len(models)} model(s)"
        )
    return DeviceRequests(named, tuple(plain))


def place_models(models: Sequence[str], entries: Sequence[str], visible_gpus: int) -> dict[str, str]:
    """Model -> device ('cpu', 'cuda:N', ...) for these `--device` entries and GPU count."""
    requests = parse_device_requests(models, entries)
    wanted: dict[str, str | None] = {}
    for i, model in enumerate(models):
        if model in requests.named:
            wanted[model] = requests.named[model]
        elif len(requests.plain) == 1:
            wanted[model] = requests.plain[0]
        elif requests.plain:
            wanted[model] = requests.plain[i]
        else:
            wanted[model] = None
    load = [0] * visible_gpus  # models per GPU, explicit ones first
    for model, device in wanted.items():
        if device is not None and device.startswith("cuda:"):
            index = int(device.split(":")[1])
            if index >= visible_gpus:
                raise PlacementError(
                    f"{model}: {device} is not visible ({visible_gpus} GPU(s): "
                    f"{', '.join(f'cuda:{i}' for i in range(visible_gpus)) or 'none'})"
                )
            load[index] += 1
    placed: dict[str, str] = {}
    for model, device in wanted.items():
        if device in (None, "cuda"):
            if not visible_gpus:
                if device == "cuda":
                    raise PlacementError(f"{model}: device 'cuda' asked for, but no GPU is visible")
                placed[model] = "cpu"
                continue
            index = min(range(visible_gpus), key=lambda i: (load[i], i))
            load[index] += 1
            device = f"cuda:{index}"
        placed[model] = device
    return placed
