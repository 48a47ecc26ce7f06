"""The training engine: one base model, one LoRA adapter + AdamW state per training run.

Pure torch + transformers + peft. It knows nothing of HTTP, databases or job ids, and it is not
thread-safe: one caller (the server's worker thread, or a test) drives it.

`Engine` is the façade over the parts, each with one job: the adapter registry (adapters.py) and
its snapshots (snapshots.py), the forward path (forward.py), training (training.py), scoring
(scoring.py) and the checkpoint format (checkpoints.py). It holds the runs and checks what
callers pass.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path

from ..types import (
    AdamParams,
    Datum,
    ForwardBackwardResult,
    LoraConfig,
    LossFnName,
    OptimStepResult,
    ResponseScore,
    SampledSequence,
)
from . import checkpoints, memory, scoring, training
from .adapters import Adapters
from .checkpoints import ADAPTER_WEIGHTS, OPTIMIZER_STATE, TRAINING_STATE, read_training_state, verify_checkpoint
from .errors import EngineError, InvalidTarget
from .forward import ForwardPath, head_matches
from .models import BaseModel
from .prompt_scoring import PromptExtras
from .sampler import SampleSpec
from .scoring import PromptLogprobs
from .snapshots import Snapshots

__all__ = [
    "ADAPTER_WEIGHTS",
    "OPTIMIZER_STATE",
    "TRAINING_STATE",
    "Engine",
    "EngineError",
    "InvalidTarget",
    "PromptLogprobs",
    "head_matches",
    "read_training_state",
    "verify_checkpoint",
]


class Engine:
    def __init__(
        self,
        base: BaseModel,
        *,
        microbatch_tokens: int | None = None,
        logits_chunk: int = 1024,
        max_snapshots: int = 16,
        pack_weights: bool = True,
        activation_checkpointing: bool | None = None,
    ):
        """microbatch_tokens: padded tokens per training forward (None: sized from the device's free
        memory, memory.py; on the CPU the host's, at most 8192). activation_checkpointing (None: on where it pays, on an
        accelerator, whose memory bounds the micro-batch; on the CPU it would only cost time).
        max_snapshots: checkpoint adapters kept loaded for sampling. `warm_up` packs and times the
        base weights; until it is called, the first call that needs them does so."""
        self.base = base
        self.adapters = Adapters(base)
        self.snapshots = Snapshots(self.adapters, max_snapshots)
        self.forward = ForwardPath(
            base,
            self.adapters,
            logits_chunk=logits_chunk,
            pack_weights=pack_weights,
            activation_checkpointing=activation_checkpointing,
        )
        if microbatch_tokens is None:
            microbatch_tokens = memory.default_microbatch_tokens(
                base.model.config, base.model.dtype, base.device, self.forward.activation_checkpointing
            )
        self.trainer = training.Trainer(self.adapters, self.forward, microbatch_tokens)
        self._runs: dict[str, training.Run] = {}

    def warm_up(self) -> None:
        """Pack the base weights for oneDNN, timing each packed copy against MKL (packed_linear.py),
        and check the output head, now rather than in the first request. The backend calls it once
        after building the engine."""
        self.forward.warm_up()

    # Tunables, kept by the part that uses them.
    @property
    def microbatch_tokens(self) -> int:
        """Padded tokens per forward pass in training and scoring."""
        return self.trainer.microbatch_tokens

    @microbatch_tokens.setter
    def microbatch_tokens(self, value: int) -> None:
        self.trainer.microbatch_tokens = value

    @property
    def logits_chunk(self) -> int:
        """Positions per output-projection chunk."""
        return self.forward.logits_chunk

    @logits_chunk.setter
    def logits_chunk(self, value: int) -> None:
        self.forward.logits_chunk = value

    @property
    def activation_checkpointing(self) -> bool:
        return self.forward.activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, value: bool) -> None:
        self.forward.activation_checkpointing = value

    @property
    def max_snapshots(self) -> int:
        return self.snapshots.max_snapshots

    @max_snapshots.setter
    def max_snapshots(self, value: int) -> None:
        self.snapshots.max_snapshots = value

    # ------------------------------------------------------------------------------- runs
    def create_run(self, run_id: str, lora: LoraConfig, seed: int = 0) -> None:
        if run_id in self._runs:
            raise EngineError(f"run {run_id} already exists")
        self.adapters.add(run_id, lora, seed)
        params = self.adapters.parameters(run_id)
        self._runs[run_id] = training.Run(lora=lora, params=params, optimizer=training.adamw(params))

    def delete_run(self, run_id: str) -> None:
        self._run(run_id)
        del self._runs[run_id]
        self.adapters.remove(run_id)

    def close(self) -> None:
        """Drop every run and snapshot: the base model is as it was loaded."""
        self._runs.clear()
        self.snapshots.clear()
        self.forward.close()
        self.adapters.close()

    def check_target_modules(self, target_modules: str | list[str]) -> None:
        """Refuse LoRA targets that would break the shared model (Adapters.check_target_modules);
        raises InvalidTarget naming the entry."""
        self.adapters.check_target_modules(target_modules)

    def has_run(self, run_id: str) -> bool:
        return run_id in self._runs

    def step_of(self, run_id: str) -> int:
        return self._run(run_id).step

    def _run(self, run_id: str) -> training.Run:
        try:
            return self._runs[run_id]
        except KeyError:
            raise EngineError(f"unknown run {run_id}") from None

    def _check_adapter(self, adapter: str | None) -> None:
        if adapter is not None and adapter not in self.snapshots:
            self._run(adapter)

    # --------------------------------------------------------------------------- training
    def forward_backward(
        self,
        run_id: str,
        data: Sequence[Datum],
        loss_fn: LossFnName = "cross_entropy",
        *,
        loss_fn_config: dict[str, float] | None = None,
        forward_only: bool = False,
        all_logprobs: bool = False,
    ) -> ForwardBackwardResult:
        """Accumulate the gradient of the summed loss into the run's adapter; forward_only: the loss
        and logprobs only. all_logprobs: the logprob of every target token, not only of those whose
        loss term can be nonzero (the others still add nothing to the loss or gradient)."""
        run = self._run(run_id)
        self._check_tokens(data)
        return self.trainer.forward_backward(
            run_id,
            run,
            data,
            loss_fn,
            loss_fn_config=loss_fn_config,
            forward_only=forward_only,
            all_logprobs=all_logprobs,
        )

    def optim_step(self, run_id: str, adam: AdamParams) -> OptimStepResult:
        return training.optim_step(self._run(run_id), adam)

    # ---------------------------------------------------------------------------- sampling
    def sample(self, specs: list[SampleSpec]) -> list[list[list[SampledSequence]]]:
        """Candidates for many requests, of one or several runs or snapshots (or the base model),
        in one batch."""
        for spec in specs:
            self._check_adapter(spec.adapter)
            self._check_prompts(spec.prompts)
        return self.forward.sample(specs)

    # ----------------------------------------------------------------------------- scoring
    def score(self, run_id: str | None, prompt: list[int], responses: list[list[int]]) -> list[ResponseScore]:
        """Logprob of each response given the prompt, under the run's adapter (or the base model),
        in micro-batches of at most `microbatch_tokens` padded tokens (scoring.py)."""
        if run_id is not None:
            self._run(run_id)
        # Errors name the fields the caller actually passed, not positions in a combined list
        # ("prompts[0]" for the prompt, "prompts[k]" for a response, k shifted past empty ones).
        self._check_ids(prompt, "prompt")
        for i, response in enumerate(responses):
            self._check_ids(response, f"responses[{i}]")
        return scoring.score(self.forward, self.microbatch_tokens, run_id, prompt, responses)

    def prompt_logprobs(
        self,
        adapter: str | None,
        prompts: list[list[int]],
        topk: int = 0,
        last_n: int | None = None,
        extras: list[PromptExtras] | None = None,
    ) -> list[PromptLogprobs]:
        """Per prompt, the logprob (temperature 1) of each of its tokens given the tokens before it,
        and with topk > 0 the k most likely tokens there, under a run's or snapshot's adapter (or
        the bare model). `last_n`: only each prompt's last n tokens are scored (the rest None).
        `extras` (one per prompt): target ids' logprobs and draws at every position (prompt_scoring.py)."""
        self._check_adapter(adapter)
        self._check_prompts(prompts)
        if not all(prompts):
            raise EngineError(f"prompts[{prompts.index([])}] is empty")
        if topk > self.base.vocab_size:
            raise EngineError(f"topk_prompt_logprobs {topk} exceeds the vocabulary size {self.base.vocab_size}")
        return scoring.prompt_logprobs(self.forward, adapter, prompts, topk, last_n, extras)

    # ------------------------------------------------------------------------- snapshots
    def snapshot(self, directory: Path, pinned: Collection[str] = ()) -> str:
        """The adapter (for SampleSpec.adapter) of checkpoint `directory`'s weights, fixed whatever
        its run trains next (snapshots.py); never evicting one in `pinned`."""
        return self.snapshots.of(directory, pinned)

    # ------------------------------------------------------------------------- checkpoints
    def save(self, run_id: str, directory: Path, *, with_optimizer: bool = True) -> None:
        """Adapter in PEFT's own format + optimizer state + step, written atomically. Without
        the optimizer state (`with_optimizer` False: weights for sampling or export), Adam's two
        moments per parameter are left out: two thirds of a checkpoint's bytes."""
        run = self._run(run_id)
        assert self.adapters.peft is not None  # the run's adapter is on the model
        checkpoints.save(
            directory,
            self.adapters.state_dict(run_id),
            self.adapters.peft.peft_config[run_id],
            training_state={
                "step": run.step,
                "lora": run.lora.model_dump(),
                "base_model": self.base.name,
                "optimizer": with_optimizer,
            },
            optimizer_state=run.optimizer.state_dict() if with_optimizer else None,
        )

    def load(self, run_id: str, directory: Path, *, with_optimizer: bool = True) -> int:
        """Replace the run's adapter, optimizer state and step with the checkpoint's (without the
        optimizer state when `with_optimizer` is False: the moments then start from zero).

        Every file is read before anything is applied, so a bad checkpoint fails with a clear
        error and leaves the run untouched (rather than a bare "SafetensorError" after the adapter
        is replaced but before the optimizer state is)."""
        run = self._run(run_id)
        verify_checkpoint(directory)
        saved = read_training_state(directory)
        if with_optimizer and not saved.get("optimizer", True):
            raise EngineError(
                f"checkpoint {checkpoints.ref(directory)} holds weights only (saved for sampling or export), "
                "no optimizer state: load it without the optimizer state"
            )
        if LoraConfig.model_validate(saved["lora"]) != run.lora:  # a field added since has its default
            raise EngineError(
                f"checkpoint LoRA config {saved['lora']} does not match the run's {run.lora.model_dump()}"
            )
        self.adapters.load_weights(run_id, directory)
        if with_optimizer:
            run.optimizer.load_state_dict(checkpoints.read_optimizer_state(directory))
        else:
            run.optimizer = training.adamw(run.params)
        run.optimizer.zero_grad(set_to_none=True)
        run.step = int(saved["step"])
        return run.step

    # ------------------------------------------------------------------------------ checks
    def _check_tokens(self, data: Sequence[Datum]) -> None:
        for i, datum in enumerate(data):
            self._check_ids(datum.model_input.tokens, f"data[{i}].model_input.tokens")
            self._check_ids(datum.loss_fn_inputs.flat_target_tokens(), f"data[{i}].loss_fn_inputs.target_tokens")

    def _check_prompts(self, prompts: Sequence[list[int]]) -> None:
        for i, tokens in enumerate(prompts):
            self._check_ids(tokens, f"prompts[{i}]")

    def _check_ids(self, tokens: Sequence[int], field: str) -> None:
        vocab = self.base.vocab_size
        bad = next((t for t in tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise EngineError(f"{field}: token id {bad} is outside the vocabulary [0, {vocab})")
