"""LoRA updates the engine computes itself, around peft's modules: every row of a sampling batch
through its own adapter (`StackedLora`), one adapter through `PlainDecoder` (`RunLora`), and the
bare model under the LoRA layers (`base_only`)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import cast

import peft
import torch


class StackedLora:
    """Every row of a sampling batch through its own adapter (or none), in two matmuls per layer.

    While active, peft's LoRA layers compute their base output only, and a forward hook on each
    adds the adapters' updates: the rank-r A matrices of all adapters in the batch are stacked
    once per `sample` call, so for x [N, in] the update is
        ((x @ A_all.T) * mask) @ B_all.T,   mask[i, c] = scaling of column c's adapter if it is row i's
    added in place with addmm_. With one adapter the mask is the scaling itself. peft's own
    `adapter_names=` path instead gathers and scatters the rows of each adapter in every layer.
    """

    def __init__(self, lora_layers: list[peft.tuners.lora.LoraLayer], adapters: set[str]):
        self.lora_layers, self.adapters = lora_layers, sorted(adapters)
        self._layers: dict[torch.nn.Module, tuple] = {}
        self._handles: list = []
        self._disabled = None
        self._rows: list[str | None] = []
        self._width = 1
        self._masks: dict[tuple, torch.Tensor | float | None] = {}

    def __enter__(self):
        if not self.lora_layers:
            return self
        self._disabled = base_only(self.lora_layers)  # every LoRA layer: its base output only
        self._disabled.__enter__()
        for module in self.lora_layers:
            present = [a for a in self.adapters if a in module.lora_A]
            if not present:
                continue
            # In the base weight's dtype, as training's RunLora computes them (bf16 on a GPU).
            dtype = module.get_base_layer().weight.dtype
            a_all = torch.cat([module.lora_A[a].weight for a in present]).to(dtype)  # [R, in]
            b_all = torch.cat([module.lora_B[a].weight for a in present], dim=1).to(dtype)  # [out, R]
            columns = tuple((a, module.scaling[a], module.lora_A[a].weight.shape[0]) for a in present)
            self._layers[module] = (a_all, b_all.t(), columns)
            self._handles.append(module.register_forward_hook(self._add_updates))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._layers.clear()
        if self._disabled is not None:
            return self._disabled.__exit__(*exc)
        return None

    def set_rows(self, adapters: list[str | None], width: int) -> None:
        """The adapter of each row of the next forward pass, whose inputs are `width` tokens long."""
        self._rows, self._width = list(adapters), width
        self._masks.clear()

    def _mask(self, columns: tuple, device, dtype):
        """Per (token) row and stacked column: the column's scaling where it is the row's adapter.
        A float when every row uses the one adapter there is; None when no row uses any."""
        if columns not in self._masks:
            used = {a for a, _, _ in columns} & set(self._rows)
            mask: torch.Tensor | float | None
            if not used:
                mask = None
            elif len(columns) == 1 and set(self._rows) == used:
                mask = float(columns[0][1])
            else:
                mask = torch.tensor(
                    [
                        [scale if row == a else 0.0 for a, scale, rank in columns for _ in range(rank)]
                        for row in self._rows
                    ],
                    dtype=dtype,
                    device=device,
                ).repeat_interleave(self._width, dim=0)
            self._masks[columns] = mask
        return self._masks[columns]

    def _add_updates(self, module, args, output):
        output = output if output.is_contiguous() else output.contiguous()
        self.add_update(module, args[0], output)
        return output

    def add_update(self, module: torch.nn.Module, x: torch.Tensor, out: torch.Tensor) -> None:
        """out (contiguous, the base output of `module` for its input x) += the rows' LoRA updates."""
        layer = self._layers.get(module)
        if layer is None:
            return
        a_all, b_all_t, columns = layer
        mask = self._mask(columns, out.device, a_all.dtype)
        if mask is None:
            return
        # Called for every projection of every decode step: no casts or reshapes that are no-ops.
        x = x if x.dim() == 2 else x.reshape(-1, a_all.shape[1])
        out = out if out.dim() == 2 else out.view(-1, out.shape[-1])
        down = torch.mm(x if x.dtype == a_all.dtype else x.to(a_all.dtype), a_all.t())
        if not isinstance(mask, float):
            down.mul_(mask)
        if down.dtype != out.dtype:
            down, b_all_t = down.to(out.dtype), b_all_t.to(out.dtype)
        out.addmm_(down, b_all_t, alpha=mask if isinstance(mask, float) else 1)


class RunLora:
    """One adapter's LoRA updates for `PlainDecoder`'s whole-sequence forward (training, scoring):
    differentiable, with the adapter's dropout when in train mode. peft computes
    `base(x) + lora_B(lora_A(dropout(x))) * scaling`; this adds the same product into the base
    output in place (one addmm), without the two passes over the [N, out] output that the
    separate scaling and sum take."""

    def __init__(self, lora_layers: list[peft.tuners.lora.LoraLayer], adapter: str):
        # Keyed by the module PlainDecoder passes: each LoraLayer is mixed into an nn.Module.
        self._layers: dict[torch.nn.Module, tuple[torch.Tensor, torch.Tensor, float, torch.nn.Module]] = {
            cast(torch.nn.Module, module): (
                cast(torch.Tensor, module.lora_A[adapter].weight),  # lora_A/B hold nn.Linears
                cast(torch.Tensor, module.lora_B[adapter].weight),
                module.scaling[adapter],
                module.lora_dropout[adapter],
            )
            for module in lora_layers
            if adapter in module.lora_A
        }

    def add_update(self, module: torch.nn.Module, x: torch.Tensor, out: torch.Tensor) -> None:
        """x [N, in], out [N, out]: PlainDecoder's flattened positions."""
        layer = self._layers.get(module)
        if layer is None:
            return
        a, b, scaling, dropout = layer
        # In the activations' dtype: the float32 adapter is cast (differentiably), not the input, so
        # a bf16 model keeps no float32 copy of each projection's input for the backward pass.
        down = dropout(x) @ (a.t() if a.dtype == x.dtype else a.t().to(x.dtype))
        out.addmm_(down, b.t() if b.dtype == out.dtype else b.t().to(out.dtype), alpha=scaling)


@contextmanager
def base_only(lora_layers: list[peft.tuners.lora.LoraLayer]):
    """Within: these LoRA layers compute their base output only. peft's `disable_adapter()` does the
    same after a model-status check that walks and prints every module (more than the rest of a
    small sampling call's overhead: docs/performance.md, "Engine figures"), and its per-layer
    `enable_adapters` re-sets every adapter parameter's requires_grad: this sets the layers' flag
    only, which is what their forward reads."""
    layers = [layer for layer in lora_layers if not layer.disable_adapters]
    direct = all(isinstance(getattr(layer, "_disable_adapters", None), bool) for layer in layers)
    for layer in layers:
        if direct:
            layer._disable_adapters = True
        else:  # a peft that keeps the flag elsewhere: its public toggle
            layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            if direct:
                layer._disable_adapters = False
            else:
                layer.enable_adapters(True)
