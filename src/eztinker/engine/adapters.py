"""The adapter registry: LoRA adapters (runs' and snapshots') on the one shared base model.

peft's surgery lives here and nowhere else: wrapping the model on the first adapter, adding
adapters (on layers already wrapped without peft's whole-model walk), removing them, checking
target modules before peft sees them, and the LoRA on the output head (`train_unembed`).
"""

from __future__ import annotations

import inspect
import warnings
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import cast

import peft
import torch
from transformers import PreTrainedModel

from ..types import LoraConfig
from . import checkpoints, lora_adapters
from .errors import EngineError, InvalidTarget
from .head_lora import HeadLora
from .lora_forward import base_only
from .models import BaseModel

# peft 0.21's LoraLayer.update_layer(adapter_name, r, lora_alpha, config, **kwargs); older
# versions take the config's fields one by one, and the registry then uses peft's add_adapter.
_UPDATE_LAYER_TAKES_CONFIG = "config" in inspect.signature(peft.tuners.lora.LoraLayer.update_layer).parameters


class Adapters:
    """The base model's LoRA adapters, by name. `version` changes whenever adapters are added or
    removed, so that what is built from the model's modules (the forward path) is rebuilt."""

    def __init__(self, base: BaseModel):
        self.base = base
        self.peft: peft.PeftModel | None = None  # the wrapped model, while any adapter exists
        self.version = 0
        self._lora_targets: tuple[list[str], list[str]] | None = None
        self._lora_layer_list: list[peft.tuners.lora.LoraLayer] | None = None
        self._head_layer: peft.tuners.lora.LoraLayer | None = None  # the output head's, once wrapped
        self._head_name: str | None = None
        self._layers_plain: bool | None = None
        self._plain: dict[str, bool] = {}  # adapter -> whether it is plain LoRA (`plain_lora`)

    def _modules_changed(self, layers: bool = True) -> None:
        """Adapters were added or removed (on the same `layers`, or not): the module walks below
        are redone when next needed."""
        if layers:
            self._lora_layer_list = None
            self._head_layer = None
        self._layers_plain = None
        self._plain.clear()
        self.version += 1

    def lora_layers(self) -> list[peft.tuners.lora.LoraLayer]:
        """The model's LoRA layers, walked for once per change of adapters (every sampling call
        needs the list, and a walk of all a model's modules is not free)."""
        if self._lora_layer_list is None:
            assert self.peft is not None  # asked for only once an adapter exists
            self._lora_layer_list = [m for m in self.peft.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
        return self._lora_layer_list

    def parameters(self, name: str) -> list[torch.nn.Parameter]:
        return lora_adapters.parameters(self.lora_layers(), name)

    def add(self, name: str, lora: LoraConfig, seed: int) -> None:
        config = peft.LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft annotates int; a float works (alpha / r)
            lora_dropout=lora.dropout,
            target_modules=self._peft_targets(lora),
            base_model_name_or_path=self.base.name,
        )
        # Seeded adapter init (lora_A is random, lora_B zero) without touching the global RNG.
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # A LoRA on a head tied to the embeddings: peft warns of merging, which export.py unties first.
            warnings.filterwarnings("ignore", message="Model has `tie_word_embeddings=True`")
            torch.manual_seed(seed)
            try:
                if self.peft is None:
                    self._modules_changed()
                    self.peft = peft.get_peft_model(self.base.model, config, adapter_name=name)
                    self.peft.eval()  # a new PeftModel is in train mode; the engine's model is not
                elif self._add_to_wrapped_layers(name, config, lora):
                    self._modules_changed(layers=False)
                else:
                    self._modules_changed()
                    self.peft.add_adapter(name, config)
            except ValueError as exc:  # e.g. target modules that do not exist in this model
                raise EngineError(f"lora.target_modules: {exc}") from exc
        # New modules start in train mode; the engine's model is in eval mode but within a
        # training call, so a new run's dropout must not act when it samples or scores first.
        for layer in self.lora_layers():
            if name in layer.lora_dropout:
                layer.lora_dropout[name].eval()

    def _peft_targets(self, lora: LoraConfig) -> str | list[str]:
        """peft's target_modules for `lora`. With train_unembed, the output head's module name after the
        others' ('all-linear' spelt out by name: peft's 'all-linear' leaves the head out)."""
        if not lora.train_unembed:
            return lora.target_modules
        if self._lora_targets is None:
            self._lora_targets = _lora_targets(self.base.model)
        names = lora.target_modules
        if names == "all-linear":
            names = sorted({name.rsplit(".", 1)[-1] for name in self._lora_targets[0]})
        return [*names, self._output_head_name()]

    def _output_head_name(self) -> str:
        if self._head_name is None:
            head = self.base.model.get_output_embeddings()
            self._head_name = next(name for name, module in self.base.model.named_modules() if module is head)
        return self._head_name

    def head_lora_layer(self) -> peft.tuners.lora.LoraLayer | None:
        """The peft LoRA layer wrapping the output head, if an adapter has put one there."""
        if self._head_layer is None and self.peft is not None:
            head = self.base.model.get_output_embeddings()
            self._head_layer = head if isinstance(head, peft.tuners.lora.LoraLayer) else None
        return self._head_layer

    def head_lora(self, adapter: str | None) -> HeadLora | None:
        """`adapter`'s LoRA on the output head (train_unembed), or None."""
        return HeadLora.of(self.head_lora_layer(), adapter)

    def head_linear(self) -> torch.nn.Module:
        """The output head's own layer, without any LoRA."""
        head = self.base.model.get_output_embeddings()
        return head.get_base_layer() if isinstance(head, peft.tuners.lora.LoraLayer) else head

    def _add_to_wrapped_layers(self, name: str, config: peft.LoraConfig, lora: LoraConfig) -> bool:
        """peft's add_adapter walks every module of the model, earlier adapters' LoRA modules
        included, so creating a run grew with the runs loaded (docs/performance.md). When every
        layer the targets name is already a LoRA layer, this adds the adapter to those layers as
        peft's add_adapter does for them (in module order, so the seeded init is the same):
        `lora_adapters.add` where it can, else `update_layer`. False (peft's own path) otherwise,
        or on a peft whose `update_layer` takes other arguments."""
        if not _UPDATE_LAYER_TAKES_CONFIG:
            return False
        if self._lora_targets is None:
            self._lora_targets = _lora_targets(self.base.model)
        targets = lora.target_modules
        names = [n for n in self._lora_targets[0] if _targets(n, targets)]
        if lora.train_unembed:
            names.append(self._output_head_name())  # the last module of a causal LM, as in peft's walk
        modules = [self.base.model.get_submodule(n) for n in names]
        if not modules or not all(isinstance(module, peft.tuners.lora.Linear) for module in modules):
            return False
        layers = cast("list[peft.tuners.lora.Linear]", modules)  # each one's type checked above
        assert self.peft is not None  # only called to add to an existing PeftModel
        self.peft.peft_config[name] = config
        try:
            if lora_adapters.can_add(layers, config):
                for layer in layers:
                    lora_adapters.add(layer, name, config)
            else:
                for key, layer in zip(names, layers):
                    layer.update_layer(name, config.r, lora_alpha=config.lora_alpha, target_name=key, config=config)
        except BaseException:
            for layer in layers:
                if name in layer.lora_A:
                    layer.delete_adapter(name)
            del self.peft.peft_config[name]
            raise
        return True

    def remove(self, name: str) -> None:
        assert self.peft is not None  # the adapter is on the model
        self._modules_changed()
        if len(self.peft.peft_config) > 1:
            self.peft.delete_adapter(name)
        else:
            # peft cannot add an adapter after its last one is deleted: strip the LoRA layers
            # (the base weights are untouched and never copied) and wrap afresh next time.
            self.close()

    def close(self) -> None:
        """Remove every adapter: the base model is as it was loaded."""
        self._modules_changed()
        if self.peft is not None:
            self.peft.unload()
            self.peft = None

    def check_target_modules(self, target_modules: str | list[str]) -> None:
        """Refuse LoRA targets that would break the shared model, before peft sees them: peft
        accepts some that break it for everyone. ['embed_tokens'] fails half-way and leaves every
        run on the model (existing and new) unable to train or sample; 'lm_head' makes a run that
        can never train (`train_unembed` adapts the head); ['q_proj', 'mlp'] leaves stray layers
        behind; a string other than 'all-linear' is taken as a regular expression. Raises
        InvalidTarget naming the entry."""
        if self._lora_targets is None:
            self._lora_targets = _lora_targets(self.base.model)
        linear, other = self._lora_targets
        choices = ", ".join(sorted({name.rsplit(".", 1)[-1] for name in linear}))
        if isinstance(target_modules, str):
            if target_modules != "all-linear":
                raise InvalidTarget(None, f"target_modules must be 'all-linear' or a list of module names ({choices})")
            return
        for i, key in enumerate(target_modules):
            bad = next((name for name in other if _targets(name, [key])), None)
            if bad is not None:
                head = " (set train_unembed for a LoRA on the output head)" if bad == self._output_head_name() else ""
                raise InvalidTarget(
                    i,
                    f"target module {key!r} matches {bad!r}, which is not a LoRA-trainable "
                    f"linear layer{head}; choose from {choices}",
                )
            if not any(_targets(name, [key]) for name in linear):
                raise InvalidTarget(i, f"target module {key!r} is not in the model; choose from {choices}")

    def activate(self, name: str) -> None:
        assert self.peft is not None  # the adapter is on the model
        if self.peft.active_adapters != [name]:  # set_adapter walks every module: skip if a no-op
            self.peft.set_adapter(name)

    def through(self, adapter: str | None) -> AbstractContextManager:
        """A context in which the model's forward goes through `adapter` (None: the bare model)."""
        if adapter is None:
            return self.bare()
        if self.peft is not None:
            self.activate(adapter)
        return nullcontext()

    def bare(self) -> AbstractContextManager:
        """A context in which the model's forward is the bare base model's."""
        return nullcontext() if self.peft is None else base_only(self.lora_layers())

    def plain_lora(self, adapters: set[str]) -> bool:
        """Whether these adapters are plain LoRA on linear layers (no DoRA-like variants, no LoRA
        bias, not merged), which is what the engine's own LoRA updates compute. Found once per
        adapter and change of adapters: the walk of every LoRA layer is not repeated per call."""
        if self._layers_plain is None:
            self._layers_plain = all(
                isinstance(module, peft.tuners.lora.Linear) and not module.merged for module in self.lora_layers()
            )
        if not self._layers_plain:
            return False
        for name in adapters - self._plain.keys():
            self._plain[name] = not any(
                name in module.lora_A and (name in module.lora_variant or module.lora_B[name].bias is not None)
                for module in self.lora_layers()
            )
        return all(self._plain[name] for name in adapters)

    def load_weights(self, name: str, directory: Path) -> None:
        """Adapter `name`'s weights from checkpoint `directory` (checkpoints.load_adapter_weights)."""
        assert self.peft is not None  # the adapter is on the model
        checkpoints.load_adapter_weights(self.peft, directory, name, self.base.device)

    def state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter `name`'s weights as PEFT saves them."""
        assert self.peft is not None  # the adapter is on the model
        # save_embedding_layers: peft would otherwise add the whole (base) output head and embeddings
        # to the adapter of a run with a LoRA on the head, since "lm_head" is among its targets.
        return peft.get_peft_model_state_dict(self.peft, adapter_name=name, save_embedding_layers=False)


def _targets(name: str, target_modules: str | list[str]) -> bool:
    """peft's rule for a list of target module names: the module's name or its last parts
    ('all-linear': every one of the linear layers `_lora_targets` lists)."""
    if target_modules == "all-linear":
        return True
    return any(name == key or name.endswith("." + key) for key in target_modules)


def _lora_targets(model: PreTrainedModel) -> tuple[list[str], list[str]]:
    """Module names of the bare base model: (linear layers LoRA may adapt, every other module).
    The output head is "other": the engine computes logits from its weight directly, and it may
    share that weight with the input embeddings."""
    head = model.get_output_embeddings()
    linear, other = [], []
    for name, module in model.named_modules():
        if not name or ".lora_" in name or ".base_layer" in name or ".lora_dropout" in name:
            continue  # the root, and peft's own submodules once the model is wrapped
        layer = getattr(module, "base_layer", module)
        if isinstance(layer, torch.nn.Linear) and layer is not head and module is not head:
            linear.append(name)
        else:
            other.append(name)
    return linear, other
