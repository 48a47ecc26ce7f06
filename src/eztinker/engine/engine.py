"""The training engine: one base model, one LoRA adapter + AdamW state per training run.

Pure torch + transformers + peft. It knows nothing of HTTP, databases or job ids, and it is not
thread-safe: one caller (the server's worker thread, or a test) drives it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import peft
import torch
from safetensors.torch import load_file, save_file

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
from . import losses
from .checkpoints import write_atomically
from .models import BaseModel
from .sampler import SampleSpec, sample

ADAPTER_WEIGHTS = "adapter_model.safetensors"
OPTIMIZER_STATE = "optimizer.pt"
TRAINING_STATE = "training_state.json"
_PEFT_BASE_ROW = "__base__"  # peft's name for "no adapter" in a mixed-adapter batch


class EngineError(ValueError):
    """A request the engine cannot carry out (unknown run, mismatched checkpoint, NaN loss...)."""


@dataclass
class _Run:
    lora: LoraConfig
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.AdamW
    step: int = 0


class Engine:
    def __init__(self, base: BaseModel, *, microbatch_tokens: int = 8192, logits_chunk: int = 1024):
        self.base = base
        self.microbatch_tokens = microbatch_tokens  # padded tokens per forward pass in training
        self.logits_chunk = logits_chunk  # positions per output-projection chunk
        self._peft: peft.PeftModel | None = None
        self._runs: dict[str, _Run] = {}

    # ------------------------------------------------------------------------------- runs
    def create_run(self, run_id: str, lora: LoraConfig, seed: int = 0) -> None:
        if run_id in self._runs:
            raise EngineError(f"run {run_id} already exists")
        config = peft.LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            base_model_name_or_path=self.base.name,
        )
        # Seeded adapter init (lora_A is random, lora_B zero) without touching the global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                if self._peft is None:
                    self._peft = peft.get_peft_model(self.base.model, config, adapter_name=run_id)
                else:
                    self._peft.add_adapter(run_id, config)
            except ValueError as exc:  # e.g. target modules that do not exist in this model
                raise EngineError(f"lora.target_modules: {exc}") from exc
        params = [p for n, p in self._peft.named_parameters() if f".{run_id}." in n]
        optimizer = torch.optim.AdamW(params, lr=AdamParams().learning_rate)
        self._runs[run_id] = _Run(lora=lora, params=params, optimizer=optimizer)

    def delete_run(self, run_id: str) -> None:
        self._run(run_id)
        del self._runs[run_id]
        if self._runs:
            self._peft.delete_adapter(run_id)
        else:
            # peft cannot add an adapter after its last one is deleted: strip the LoRA layers
            # (the base weights are untouched and never copied) and wrap afresh next time.
            self._peft.unload()
            self._peft = None

    def has_run(self, run_id: str) -> bool:
        return run_id in self._runs

    def step_of(self, run_id: str) -> int:
        return self._run(run_id).step

    def _run(self, run_id: str) -> _Run:
        try:
            return self._runs[run_id]
        except KeyError:
            raise EngineError(f"unknown run {run_id}") from None

    def _activate(self, run_id: str) -> None:
        self._peft.set_adapter(run_id)

    # --------------------------------------------------------------------------- training
    def forward_backward(
        self, run_id: str, data: Sequence[Datum], loss_fn: LossFnName = "cross_entropy"
    ) -> ForwardBackwardResult:
        """Accumulate the gradient of the summed loss into the run's adapter."""
        run = self._run(run_id)
        self._check_tokens(data)
        self._activate(run_id)
        self._peft.train(run.lora.dropout > 0)
        # Fix: a failure part-way through (e.g. a non-finite loss in a later micro-batch) used to
        # leave the earlier micro-batches' gradients accumulated, so the next optim_step applied a
        # partial batch. Snapshot the run's gradients (tiny LoRA tensors) and restore them on error.
        saved_grads = [None if p.grad is None else p.grad.detach().clone() for p in run.params]
        try:
            total_loss, num_tokens = 0.0, 0
            logprobs: list[list[float | None]] = [[] for _ in data]
            for batch in self._microbatches(data):
                loss, count, batch_logprobs = self._loss_and_backward(batch, data, loss_fn)
                total_loss += loss
                num_tokens += count
                for i, row in zip(batch, batch_logprobs):
                    logprobs[i] = row
        except BaseException:
            for param, grad in zip(run.params, saved_grads):
                param.grad = grad
            raise
        finally:
            self._peft.eval()
        return ForwardBackwardResult(loss=total_loss, num_tokens=num_tokens, logprobs=logprobs)

    def _microbatches(self, data: Sequence[Datum]) -> list[list[int]]:
        """Group examples of similar length so padding stays small (longest first)."""
        order = sorted(range(len(data)), key=lambda i: -len(data[i].model_input.tokens))
        batches: list[list[int]] = []
        for i in order:
            if batches:
                width = len(data[batches[-1][0]].model_input.tokens)  # its first is its longest
                if width * (len(batches[-1]) + 1) <= self.microbatch_tokens:
                    batches[-1].append(i)
                    continue
            batches.append([i])
        return batches

    def _loss_and_backward(self, batch: list[int], data: Sequence[Datum], loss_fn: LossFnName):
        examples = [data[i] for i in batch]
        input_ids, attention_mask = self._right_pad([d.model_input.tokens for d in examples])
        selected = losses.select_positions(examples, loss_fn, input_ids.shape[1])  # [B, T] bool
        hidden_B_T_H = self._decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        hidden_N_H = hidden_B_T_H[selected]
        # Chunked output projection: the 152k-wide logits of only a chunk of positions are alive
        # at a time; their gradient flows back into the decoder in one backward pass.
        detached = hidden_N_H.detach().requires_grad_(True)
        inputs = losses.gather_inputs(examples, selected, loss_fn, self.base.device)
        total = 0.0
        logprobs_N = torch.empty(hidden_N_H.shape[0])
        for start in range(0, hidden_N_H.shape[0], self.logits_chunk):
            chunk = slice(start, start + self.logits_chunk)
            token_logprobs = self._target_logprobs(detached[chunk], inputs.targets[chunk])
            loss = losses.compute(loss_fn, token_logprobs, inputs, chunk)
            if not torch.isfinite(loss):
                raise EngineError(f"{loss_fn} loss is not finite ({loss.item()}); no gradient applied")
            loss.backward()
            total += loss.item()
            logprobs_N[chunk] = token_logprobs.detach().float().cpu()
        if hidden_N_H.shape[0]:
            hidden_N_H.backward(detached.grad)
        return total, int(hidden_N_H.shape[0]), losses.scatter_rows(logprobs_N, selected, examples)

    def _decoder(self) -> torch.nn.Module:
        model = self.base.model
        return getattr(model, model.base_model_prefix)

    def _target_logprobs(self, hidden_N_H: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
        logits = self.base.model.get_output_embeddings()(hidden_N_H).float()
        return torch.log_softmax(logits, dim=-1).gather(-1, targets_N.unsqueeze(-1)).squeeze(-1)

    def optim_step(self, run_id: str, adam: AdamParams) -> OptimStepResult:
        run = self._run(run_id)
        for group in run.optimizer.param_groups:
            group.update(
                lr=adam.learning_rate,
                betas=(adam.beta1, adam.beta2),
                eps=adam.eps,
                weight_decay=adam.weight_decay,
            )
        max_norm = adam.grad_clip_norm if adam.grad_clip_norm is not None else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(run.params, max_norm))
        if not math.isfinite(grad_norm):
            run.optimizer.zero_grad(set_to_none=True)
            raise EngineError(f"gradient norm is {grad_norm}; the step was skipped and gradients cleared")
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.step += 1
        return OptimStepResult(step=run.step, grad_norm=grad_norm, learning_rate=adam.learning_rate)

    # ---------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, specs: list[SampleSpec]) -> list[list[list[SampledSequence]]]:
        """Candidates for many requests, of one or several runs (or the base model), in one batch."""
        for spec in specs:
            if spec.adapter is not None:
                self._run(spec.adapter)
            self._check_prompts(spec.prompts)
        return sample(
            self._logits_fn(),
            self.base.tokenizer,
            specs,
            stop_token_ids=self.base.stop_token_ids,
            pad_token_id=self.base.pad_token_id,
            device=self.base.device,
        )

    def _logits_fn(self):
        def forward(input_ids, attention_mask, position_ids, cache, adapters):
            kwargs = dict(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            distinct = set(adapters)
            if self._peft is None:
                return self.base.model(**kwargs).logits[:, -1]
            if distinct == {None}:
                with self._peft.disable_adapter():
                    return self._peft(**kwargs).logits[:, -1]
            if len(distinct) == 1:
                self._activate(adapters[0])
                return self._peft(**kwargs).logits[:, -1]
            names = [_PEFT_BASE_ROW if a is None else a for a in adapters]
            return self._peft(**kwargs, adapter_names=names).logits[:, -1]

        return forward

    @torch.no_grad()
    def score(self, run_id: str | None, prompt: list[int], responses: list[list[int]]) -> list[ResponseScore]:
        """Logprob of each response given the prompt, under the run's adapter (or the base model)."""
        if run_id is not None:
            self._run(run_id)
        # Fix: errors used to name the prompt "prompts[0]" and a response "prompts[k]" (k shifted
        # past empty responses); name the fields the caller actually passed.
        self._check_ids(prompt, "prompt")
        for i, response in enumerate(responses):
            self._check_ids(response, f"responses[{i}]")
        sequences = [prompt + r for r in responses]
        input_ids, attention_mask = self._right_pad(sequences)
        positions = torch.zeros(input_ids.shape, dtype=torch.bool)
        for i, r in enumerate(responses):
            positions[i, len(prompt) - 1 : len(prompt) - 1 + len(r)] = True
        targets = torch.cat([torch.tensor(r, dtype=torch.long) for r in responses if r] or [torch.empty(0, dtype=torch.long)])
        if self._peft is None or run_id is None:
            context = self._peft.disable_adapter() if self._peft is not None else nullcontext()
        else:
            self._activate(run_id)
            context = nullcontext()
        with context:
            hidden = self._decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            logprobs = self._target_logprobs(hidden[positions.to(hidden.device)], targets.to(hidden.device)).cpu()
        scores, offset = [], 0
        for r in responses:
            lp = logprobs[offset : offset + len(r)]
            offset += len(r)
            total = float(lp.sum()) if len(r) else 0.0
            scores.append(ResponseScore(sum_logprob=total, mean_logprob=total / max(len(r), 1), num_tokens=len(r)))
        return scores

    # ------------------------------------------------------------------------- checkpoints
    def save(self, run_id: str, directory: Path) -> None:
        """Adapter in PEFT's own format + optimizer state + step, written atomically."""
        run = self._run(run_id)
        state = peft.get_peft_model_state_dict(self._peft, adapter_name=run_id)
        config = self._peft.peft_config[run_id]

        def write(staging: Path) -> None:
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, staging / ADAPTER_WEIGHTS)
            config.save_pretrained(staging)
            torch.save(run.optimizer.state_dict(), staging / OPTIMIZER_STATE)
            (staging / TRAINING_STATE).write_text(
                json.dumps({"step": run.step, "lora": run.lora.model_dump(), "base_model": self.base.name})
            )

        write_atomically(directory, write)

    def load(self, run_id: str, directory: Path) -> int:
        """Replace the run's adapter, optimizer state and step with the checkpoint's."""
        run = self._run(run_id)
        saved = read_training_state(directory)
        if saved["lora"] != run.lora.model_dump():
            raise EngineError(
                f"checkpoint LoRA config {saved['lora']} does not match the run's {run.lora.model_dump()}"
            )
        weights = load_file(directory / ADAPTER_WEIGHTS, device=str(self.base.device))
        result = peft.set_peft_model_state_dict(self._peft, weights, adapter_name=run_id)
        missing = [k for k in result.missing_keys if f".{run_id}." in k and "lora_" in k]
        if missing:
            raise EngineError(f"checkpoint is missing {len(missing)} adapter tensors, e.g. {missing[0]}")
        # weights_only: a checkpoint can never run code on the server.
        optimizer_state = torch.load(directory / OPTIMIZER_STATE, weights_only=True, map_location="cpu")
        run.optimizer.load_state_dict(optimizer_state)
        run.optimizer.zero_grad(set_to_none=True)
        run.step = int(saved["step"])
        return run.step

    # ------------------------------------------------------------------------------ helpers
    def _right_pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), self.base.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, s in enumerate(sequences):
            input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            attention_mask[i, : len(s)] = 1
        return input_ids.to(self.base.device), attention_mask.to(self.base.device)

    def _check_tokens(self, data: Sequence[Datum]) -> None:
        for i, datum in enumerate(data):
            self._check_ids(datum.model_input.tokens, f"data[{i}].model_input.tokens")
            self._check_ids(datum.loss_fn_inputs.target_tokens, f"data[{i}].loss_fn_inputs.target_tokens")

    def _check_prompts(self, prompts: Sequence[list[int]]) -> None:
        for i, tokens in enumerate(prompts):
            self._check_ids(tokens, f"prompts[{i}]")

    def _check_ids(self, tokens: Sequence[int], field: str) -> None:
        vocab = self.base.vocab_size
        bad = next((t for t in tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise EngineError(f"{field}: token id {bad} is outside the vocabulary [0, {vocab})")


def read_training_state(directory: Path) -> dict:
    try:
        return json.loads((directory / TRAINING_STATE).read_text())
    except (OSError, ValueError) as exc:
        raise EngineError(f"{directory} is not a readable EZTinker checkpoint: {exc}") from exc

