"""Choosing each sampled row's next token from its logits, with its request's parameters
(temperature, top-k, top-p, min-p, penalties, min_tokens, seed), a handful of passes over reused
[rows, V] buffers per decode step (no `torch.multinomial`, no sort): the logits are shifted by their
max, exponentiated once (which gives the temperature-1 log-normaliser for the logprobs), and a token
is drawn by inverse-CDF with one uniform per row from the request's seeded generator: first over
blocks of the vocabulary (one summing pass), then inside the chosen block.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .prompt_scoring import generator_for

if TYPE_CHECKING:
    from .sampler import SampleSpec, _Row

# Elements of one [rows, V] float32 working buffer (two are used): bounds the memory of a step
# whatever the number of candidates, e.g. 220 rows of a 152k vocabulary, 128 MB a buffer.
_BUFFER_ELEMENTS = 1 << 25
_TOP_P_CANDIDATES = 1024  # top_p first looks among this many most likely tokens, sorts all only if needed


class TokenChooser:
    """Chooses each live row's next token with its request's parameters and reports its logprob
    under the model itself (temperature 1), as importance-sampling losses expect."""

    def __init__(
        self,
        specs: list[SampleSpec],
        head,
        max_rows: int,
        device: torch.device,
        stop_ids: list[frozenset[int]] | None = None,
    ):
        """`stop_ids[s]`: the tokens that stop spec s, masked while it is short of its min_tokens."""
        self.specs, self.head, self.device = specs, head, device
        self.stop_ids = stop_ids or [frozenset(spec.params.stop_token_ids) for spec in specs]
        self.generators = [generator_for(spec.params.seed, device) for spec in specs]
        self.vocab = head.vocab_size
        self.block = _block_size(self.vocab)
        self.chunk_rows = max(1, min(max_rows, _BUFFER_ELEMENTS // self.vocab))
        self._shifted = torch.empty(self.chunk_rows, self.vocab, device=device)  # logits - row max
        self._weights = torch.empty(self.chunk_rows, self.vocab, device=device)  # unnormalised probs

    def choose(
        self, features_B_D: torch.Tensor, spec_of_row: list[int], rows: list[_Row] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, list]:
        """Each row's token, its logprob, and (None unless its request asks) its top tokens. `rows`
        (the rows' candidates so far) serve the repetition penalty and min_tokens."""
        groups = _runs(spec_of_row)  # rows of one spec are contiguous: (spec, start, stop)
        # One uniform per sampled row from its request's generator, drawn before any chunking so
        # that a seeded request's draws never depend on what else shares the batch.
        uniforms = torch.zeros(len(spec_of_row), dtype=torch.float64)
        for s, start, stop in groups:
            if self.specs[s].params.temperature > 0:
                uniforms[start:stop] = torch.rand(
                    stop - start, generator=self.generators[s], dtype=torch.float64, device=self.generators[s].device
                ).cpu()
        uniforms = uniforms.to(self.device)
        tokens, logprobs, tops = [], [], []
        for start in range(0, len(spec_of_row), self.chunk_rows):
            stop = min(start + self.chunk_rows, len(spec_of_row))
            chunk_groups = [
                (s, max(a, start) - start, min(b, stop) - start) for s, a, b in groups if a < stop and b > start
            ]
            t, lp, top = self._choose_chunk(
                features_B_D[start:stop], chunk_groups, uniforms[start:stop], None if rows is None else rows[start:stop]
            )
            tokens.append(t)
            logprobs.append(lp)
            tops.extend(top)
        return torch.cat(tokens).cpu(), torch.cat(logprobs).cpu(), tops

    def _choose_chunk(self, features: torch.Tensor, groups, uniforms: torch.Tensor, rows: list[_Row] | None):
        n = features.shape[0]
        row_adapters = [(self.specs[s].adapter, a, b) for s, a, b in groups]
        shifted, weights = self.head.logits(features, self._shifted[:n], row_adapters), self._weights[:n]
        row_max = shifted.amax(dim=-1, keepdim=True)
        shifted.sub_(row_max)  # max 0 per row: exp never overflows
        torch.exp(shifted, out=weights)
        log_normaliser = weights.sum(dim=-1).log_()  # logsumexp of the shifted logits at temperature 1
        tops: list[list[tuple[int, float]] | None] = [None] * n
        for s, a, b in groups:
            k = min(self.specs[s].top_logprobs, self.vocab)
            if k:  # before any temperature or truncation: logprobs under the model itself, as the token's
                values, ids = torch.topk(shifted[a:b], k, dim=-1)
                top_values = (values - log_normaliser[a:b, None]).tolist()
                for i, (row_ids, row_values) in enumerate(zip(ids.tolist(), top_values)):
                    tops[a + i] = list(zip(row_ids, row_values))
        greedy = torch.zeros(n, dtype=torch.bool)
        forced: list[tuple[int, int, torch.Tensor]] = []  # greedy rows whose logits were adjusted
        for s, a, b in groups:
            params = self.specs[s].params
            adjusted = self._adjusted(s, shifted[a:b], row_max[a:b], rows[a:b]) if rows is not None else None
            if params.temperature == 0:
                if adjusted is None:
                    greedy[a:b] = True
                else:  # greedy after the penalty and masks, as vLLM's
                    forced.append((a, b, adjusted.argmax(dim=-1)))
                continue
            w = weights[a:b]
            logits = shifted[a:b] if adjusted is None else adjusted.sub_(adjusted.amax(dim=-1, keepdim=True))
            if params.temperature != 1 or adjusted is not None:
                torch.mul(logits, 1.0 / params.temperature, out=w).exp_()
            if params.min_p > 0:  # the most likely token's weight is 1 here (its shifted logit is 0)
                w.masked_fill_(w < params.min_p, 0.0)
            if 0 < params.top_k < self.vocab:
                kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
                w.masked_fill_(logits < kth, 0.0)
            if params.top_p < 1.0:
                _keep_top_p(w, params.top_p)
        if greedy.all() and not forced:
            chosen = self._argmax(shifted)
        else:
            chosen = self._inverse_cdf(weights, uniforms)
            if greedy.any():
                index = greedy.nonzero().squeeze(-1).to(self.device)
                chosen[index] = self._argmax(shifted[index])
            for a, b, picked in forced:
                chosen[a:b] = picked
        logprobs = shifted.gather(-1, chosen.unsqueeze(-1)).squeeze(-1) - log_normaliser
        return chosen, logprobs, tops

    def _adjusted(self, s: int, shifted: torch.Tensor, row_max: torch.Tensor, rows: list[_Row]) -> torch.Tensor | None:
        """Spec s's rows' logits after its repetition penalty, with its stop tokens masked in the rows
        short of min_tokens (a new tensor); None when neither applies. The reported logprobs stay
        the model's own."""
        params = self.specs[s].params
        early = [i for i, row in enumerate(rows) if len(row.tokens) < params.min_tokens]
        masked = [t for t in self.stop_ids[s] if t < self.vocab] if early else []
        if params.repetition_penalty == 1.0 and not masked:
            return None
        adjusted = shifted + row_max  # the raw logits: the penalty depends on their sign
        if params.repetition_penalty != 1.0:
            seen = torch.zeros_like(adjusted, dtype=torch.bool)
            for i, row in enumerate(rows):
                ids = torch.tensor(self.specs[s].prompts[row.prompt] + row.tokens, device=self.device)
                seen[i, ids[ids < self.vocab]] = True
            penalty = params.repetition_penalty
            adjusted = torch.where(seen, torch.where(adjusted > 0, adjusted / penalty, adjusted * penalty), adjusted)
        if masked:
            index = torch.tensor(early, device=self.device)
            adjusted[index.unsqueeze(-1), torch.tensor(masked, device=self.device)] = float("-inf")
        return adjusted

    def _block_view(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[n, V] -> its full blocks [n, V // block, block] and the ragged tail [n, rest] (or None)."""
        full = self.vocab // self.block * self.block
        tail = x[:, full:] if full < self.vocab else None
        return x[:, :full].view(x.shape[0], -1, self.block), tail

    def _block_columns(self, block_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        columns = block_index.unsqueeze(-1) * self.block + torch.arange(self.block, device=self.device)
        valid = columns < self.vocab
        return columns.clamp_(max=self.vocab - 1), valid

    def _argmax(self, shifted: torch.Tensor) -> torch.Tensor:
        """First index of each row's max (0 after the shift), like torch.argmax, in two cheap passes."""
        blocks, tail = self._block_view(shifted)
        block_max = blocks.amax(dim=-1)
        if tail is not None:
            block_max = torch.cat([block_max, tail.amax(dim=-1, keepdim=True)], dim=-1)
        first_block = (block_max == 0).to(torch.int8).argmax(dim=-1)
        columns, valid = self._block_columns(first_block)
        values = shifted.gather(-1, columns).masked_fill_(~valid, float("-inf"))
        return columns.gather(-1, values.argmax(dim=-1, keepdim=True)).squeeze(-1)

    def _inverse_cdf(self, weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        """Draw column j with probability weights[j] / sum(weights): block first, then inside it."""
        blocks, tail = self._block_view(weights)
        block_sums = blocks.sum(dim=-1)
        if tail is not None:
            block_sums = torch.cat([block_sums, tail.sum(dim=-1, keepdim=True)], dim=-1)
        cumulative = block_sums.double().cumsum(dim=-1)
        target = uniforms * cumulative[:, -1]
        block = torch.searchsorted(cumulative, target.unsqueeze(-1), right=True)
        block = block.clamp_(max=block_sums.shape[-1] - 1).squeeze(-1)
        before = (
            cumulative.gather(-1, block.unsqueeze(-1)).squeeze(-1)
            - block_sums.gather(-1, block.unsqueeze(-1)).squeeze(-1).double()
        )
        # Where in its block the draw fell, as a fraction of the block's mass, in [0, 1).
        fraction = ((target - before) / block_sums.gather(-1, block.unsqueeze(-1)).squeeze(-1).double()).clamp_(
            0.0, 1.0
        )
        columns, valid = self._block_columns(block)
        values = weights.gather(-1, columns).masked_fill_(~valid, 0.0).double()
        inside = values.cumsum(dim=-1)
        pick = torch.searchsorted(inside, (fraction * inside[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
        # Never a zero-probability column, whatever the rounding: at most the block's last positive one.
        positions = torch.arange(self.block, device=self.device).expand_as(values)
        last_positive = torch.where(values > 0, positions, 0).amax(dim=-1)
        pick = torch.minimum(pick, last_positive)
        return columns.gather(-1, pick.unsqueeze(-1)).squeeze(-1)


def _keep_top_p(weights: torch.Tensor, top_p: float) -> None:
    """Zero, in place, every token once the more likely tokens before it already cover top_p."""
    total = weights.sum(dim=-1, keepdim=True)
    k = min(weights.shape[-1], _TOP_P_CANDIDATES)
    values, order = torch.topk(weights, k, dim=-1)  # sorted, most likely first
    if not bool((values.sum(dim=-1, keepdim=True) >= top_p * total).all()):
        values, order = weights.sort(dim=-1, descending=True)  # the nucleus is wider: sort it all
    keep = (values.cumsum(dim=-1) - values) < top_p * total  # the first always stays
    kept = values * keep
    weights.zero_().scatter_(-1, order, kept)


def _block_size(vocab: int) -> int:
    for size in (256, 128, 64, 32):
        if vocab % size == 0:
            return size
    return 128  # with a ragged last block


def _runs(spec_of_row: list[int]) -> list[tuple[int, int, int]]:
    runs: list[tuple[int, int, int]] = []
    for i, s in enumerate(spec_of_row):
        if runs and runs[-1][0] == s:
            runs[-1] = (s, runs[-1][1], i + 1)
        else:
            runs.append((s, i, i + 1))
    return runs
