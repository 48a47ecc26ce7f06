"""Snapshots: read-only sampler copies of checkpoints' adapter weights, kept loaded in an LRU.

A snapshot is no run: nothing trains or saves it. Its adapter is loaded once from a checkpoint
and again only when the checkpoint is saved over, so sampling from a saved checkpoint is fixed
whatever its run trains next.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Collection, Iterator
from pathlib import Path

from ..types import LoraConfig
from . import checkpoints
from .adapters import Adapters
from .errors import EngineError

_SNAPSHOT_PREFIX = "snapshot@"  # '@' is never in a run id, so a snapshot's adapter never names a run


class Snapshots:
    """The loaded snapshots' adapter names, least recently used first, at most `max_snapshots`."""

    def __init__(self, adapters: Adapters, max_snapshots: int):
        self.adapters = adapters
        self.max_snapshots = max_snapshots
        # Snapshot adapter name -> the stamp of the checkpoint files it was loaded from.
        self._loaded: OrderedDict[str, tuple] = OrderedDict()

    def __contains__(self, name: object) -> bool:
        return name in self._loaded

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaded)

    def __len__(self) -> int:
        return len(self._loaded)

    def clear(self) -> None:
        """Forget every snapshot (their adapters are removed with the registry's)."""
        self._loaded.clear()

    def of(self, directory: Path, pinned: Collection[str] = ()) -> str:
        """The adapter (for SampleSpec.adapter) of checkpoint `directory`'s weights, fixed whatever
        its run trains next: loaded once, and again only when the checkpoint was saved over. At
        most `max_snapshots` stay loaded, the least recently used go first, never one in `pinned`
        (those of the batch being prepared)."""
        directory = directory.resolve()
        name = _SNAPSHOT_PREFIX + hashlib.sha256(str(directory).encode()).hexdigest()[:16]
        try:
            stamp = checkpoints.stamp(directory)
        except OSError as exc:
            if name in self._loaded:  # its checkpoint is gone
                self._drop(name)
            raise EngineError(f"{directory} is not a readable EZTinker checkpoint: {exc}") from None
        if name in self._loaded:
            if self._loaded[name] == stamp:
                self._loaded.move_to_end(name)
                return name
            self._drop(name)  # saved over since: load the new weights
        self._load(name, directory)
        self._loaded[name] = stamp
        evictable = [n for n in self._loaded if n != name and n not in pinned]
        for old in evictable[: max(0, len(self._loaded) - self.max_snapshots)]:
            self._drop(old)
        return name

    def _load(self, name: str, directory: Path) -> None:
        state = checkpoints.read_training_state(directory)
        base = self.adapters.base.name
        if state.get("base_model") not in (None, base):
            raise EngineError(f"checkpoint {directory} is of base model {state['base_model']!r}, not {base!r}")
        try:
            lora = LoraConfig.model_validate(state["lora"])
        except (KeyError, ValueError) as exc:
            raise EngineError(f"checkpoint {directory} has no valid LoRA config: {exc}") from None
        self.adapters.add(name, lora, seed=0)
        try:
            self.adapters.load_weights(name, directory)
        except BaseException:
            self.adapters.remove(name)
            raise

    def _drop(self, name: str) -> None:
        del self._loaded[name]
        self.adapters.remove(name)
