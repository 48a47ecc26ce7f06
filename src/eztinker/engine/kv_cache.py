"""The sampler's KV caches: transformers' cache interface, with every layer's keys and values in a
buffer sized for the whole generation."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """A DynamicLayer that writes new keys/values into a buffer sized for the whole generation
    instead of concatenating (which copies the entire cache at every decode step)."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self._keys = key_states.new_empty(*key_states.shape[:-2], self.capacity, key_states.shape[-1])
        self._values = value_states.new_empty(*value_states.shape[:-2], self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self._keys.shape[-2]:  # beyond the planned length: grow (never expected)
            self._keys, self._values = (self._regrow(t, max(end, 2 * t.shape[-2])) for t in (self._keys, self._values))
        self._keys[..., self.length : end, :] = key_states
        self._values[..., self.length : end, :] = value_states
        self.length = end
        self.keys, self.values = self._keys[..., :end, :], self._values[..., :end, :]
        return self.keys, self.values

    def _regrow(self, buffer: torch.Tensor, capacity: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        batch = buffer.shape[0] if rows is None else rows.numel()
        grown = buffer.new_empty(batch, *buffer.shape[1:-2], capacity, buffer.shape[-1])
        valid = buffer[..., : self.length, :]
        grown[..., : self.length, :] = valid if rows is None else valid[rows]
        return grown

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._keys = self._regrow(self._keys, self._keys.shape[-2], indices)
            self._values = self._regrow(self._values, self._values.shape[-2], indices)
            self.keys, self.values = self._keys[..., : self.length, :], self._values[..., : self.length, :]

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.batch_select_indices(torch.arange(self._keys.shape[0], device=self.device).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("the sampler's cache is never cropped")

    def reset(self) -> None:
        self.length = 0
        super().reset()


class PreallocatedCache(DynamicCache):
    """A DynamicCache whose layers preallocate `capacity` positions (prompt width + max new tokens)."""

    def __init__(self, capacity: int):
        # transformers only calls it with no arguments, so a factory serves as the "class" (stub too narrow).
        Cache.__init__(self, layer_class_to_replicate=lambda: PreallocatedLayer(capacity))  # type: ignore[arg-type]
