"""A new run's LoRA adapter on layers peft has already wrapped, without peft's per-layer walks.

peft's `LoraLayer.update_layer` walks every adapter of the layer twice (to move the new one to
the base weight's device, then to set requires_grad on all of them), so adding a run cost time
that grew with the runs loaded (docs/performance.md, "Engine figures"). For the plain LoRA the
engine creates (default init, no DoRA, no LoRA bias, no variant), `add` does what peft's
`add_adapter` does for the new adapter alone: the same modules, in the same order, with the same
seeded init (the same random draws, in the same order) and dtype; anything else is left to peft.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import peft
import torch
from torch import nn


def can_add(layers: Sequence[nn.Module], config: peft.LoraConfig) -> bool:
    """Whether `add` builds what peft would on these layers: a plain LoRA on peft Linears over
    nn.Linears."""
    plain = (
        config.init_lora_weights is True
        and not config.use_dora
        and not config.lora_bias
        and bool(layers)
        and all(type(layer) is peft.tuners.lora.Linear for layer in layers)
    )
    if not plain:
        return False
    lora_layers = cast("Sequence[peft.tuners.lora.Linear]", layers)  # each one's type checked above
    return lora_layers[0].resolve_lora_variant(config=config) is None and all(  # the same for every layer
        isinstance(layer.get_base_layer(), nn.Linear)
        and not layer.lora_variant
        and not layer.fan_in_fan_out
        and not hasattr(layer, "lora_arrow")
        for layer in lora_layers
    )


def add(layer: peft.tuners.lora.Linear, name: str, config: peft.LoraConfig) -> None:
    """Adapter `name` on `layer`, as `update_layer` and `add_adapter`'s dtype cast make it."""
    layer.r[name] = config.r
    layer.lora_alpha[name] = config.lora_alpha
    layer.lora_dropout[name] = nn.Dropout(p=config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
    # peft leaves them None only for base layers it cannot size; `can_add` admits nn.Linears alone.
    assert layer.in_features is not None and layer.out_features is not None
    a = nn.Linear(layer.in_features, config.r, bias=False)  # each draws its default init, as in peft
    b = nn.Linear(config.r, layer.out_features, bias=False)
    layer.lora_bias[name] = False
    layer.scaling[name] = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
    layer.use_rslora[name] = config.use_rslora
    layer.use_dora[name] = False
    nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))  # peft's reset_lora_parameters
    nn.init.zeros_(b.weight)
    weight = cast(torch.Tensor, layer.get_base_layer().weight)  # an nn.Linear's (can_add)
    trainable = name in layer.active_adapters and not config.inference_mode
    for key, module in (("lora_A", a), ("lora_B", b)):
        # To the base weight's device and dtype, then (peft's autocast_adapter_dtype) up from a
        # 16-bit one to float32: the init is rounded as peft rounds it.
        module = module.to(weight.device, dtype=weight.dtype)
        if weight.dtype.itemsize < 4:
            module = module.to(torch.float32)
        getattr(layer, key)[name] = module.requires_grad_(trainable)


def parameters(layers: list[peft.tuners.lora.LoraLayer], name: str) -> list[nn.Parameter]:
    """Adapter `name`'s parameters in the order of the model's named_parameters (an optimizer's
    saved state is by position), without walking the whole model."""
    found: list[nn.Parameter] = []
    for layer in layers:
        for key in layer.adapter_layer_names:
            container = getattr(layer, key)
            if name in container:
                item = container[name]
                found.extend([item] if isinstance(item, nn.Parameter) else item.parameters())
    return found
