"""asample's JSON fields: its prompt, its stop, and its `target_prompt_logprobs` grid (`TargetGrid`,
which also shapes that field's answer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from tinker.proto import tinker_public_pb2 as pb

from .errors import TEXT_ONLY, WireError, where


@dataclass(frozen=True)
class TargetGrid:
    """asample's `target_prompt_logprobs` decoded: the ids asked at each prompt position 1 .. len - 1
    (`rows`, -1 cells left out), and the request's layout (dense or sparse CSR), which the answer keeps."""

    rows: list[list[int]]
    shape: tuple[int, int]
    cells: list[tuple[int, int]]  # (row, id) of each stored value, in the request's order; id -1: nothing asked
    crow_indices: list[int] | None = None  # sparse CSR: the request's, returned as they came
    col_indices: list[int] | None = None

    def answer(self, logprobs: list[list[float]]) -> pb.Tensor:
        """`logprobs[r]`: one per `rows[r]` -> a float32 tensor of the request's shape and layout,
        0.0 where the request had -1."""
        taken = [iter(row) for row in logprobs]
        values = np.asarray([0.0 if token == -1 else next(taken[r]) for r, token in self.cells], dtype="<f4")
        msg = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=list(self.shape))
        if self.crow_indices is None:
            msg.dense = values.tobytes()
        else:
            msg.sparse_csr.values = values.tobytes()
            msg.sparse_csr.crow_indices = np.asarray(self.crow_indices, dtype="<i8").tobytes()
            msg.sparse_csr.col_indices = np.asarray(self.col_indices, dtype="<i8").tobytes()
        return msg


def _int_list(value: Any, loc: tuple[str | int, ...], what: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise WireError(f"{where(loc)}: {what} must be a list of integers", loc)
    return value


def decode_target_grid(tensor: Any) -> TargetGrid:
    """asample's JSON `target_prompt_logprobs` (TensorData: int64 ids of shape [len(prompt) - 1, K],
    -1 for no id; dense, or sparse CSR with `sparse_crow_indices` / `sparse_col_indices`)."""
    loc: tuple[str | int, ...] = ("target_prompt_logprobs",)
    if not isinstance(tensor, dict):
        raise WireError("target_prompt_logprobs must be a TensorData object", loc)
    if tensor.get("dtype") != "int64":
        raise WireError(
            f"target_prompt_logprobs has dtype {tensor.get('dtype')!r}; it must be int64 token ids", (*loc, "dtype")
        )
    shape = _int_list(tensor.get("shape"), (*loc, "shape"), "shape")
    if len(shape) != 2 or min(shape) < 0:
        raise WireError(
            f"target_prompt_logprobs has shape {shape}; it must be 2-D, [len(prompt) - 1, K]", (*loc, "shape")
        )
    rows_n, width = shape
    data = _int_list(tensor.get("data"), (*loc, "data"), "data")
    if any(v < -1 for v in data):
        raise WireError("target_prompt_logprobs holds a negative id other than -1 (no id)", (*loc, "data"))
    crow, col = tensor.get("sparse_crow_indices"), tensor.get("sparse_col_indices")
    if crow is None and col is None:
        if len(data) != rows_n * width:
            raise WireError(f"target_prompt_logprobs has shape {shape} but {len(data)} values", (*loc, "data"))
        row_of = [i // width for i in range(len(data))] if width else []
    else:
        crow = _int_list(crow, (*loc, "sparse_crow_indices"), "sparse_crow_indices")
        col = _int_list(col, (*loc, "sparse_col_indices"), "sparse_col_indices")
        if (
            len(crow) != rows_n + 1
            or crow[0] != 0
            or crow[-1] != len(data)
            or len(col) != len(data)
            or any(b < a for a, b in zip(crow, crow[1:]))
            or any(not 0 <= c < width for c in col)
        ):
            raise WireError(
                f"target_prompt_logprobs is not a valid sparse CSR tensor of shape {shape} "
                f"({len(crow)} crow indices, {len(col)} col indices, {len(data)} values)",
                loc,
            )
        row_of = [r for r in range(rows_n) for _ in range(crow[r + 1] - crow[r])]
    rows: list[list[int]] = [[] for _ in range(rows_n)]
    for r, token in zip(row_of, data):
        if token != -1:
            rows[r].append(token)
    return TargetGrid(
        rows=rows, shape=(rows_n, width), cells=list(zip(row_of, data)), crow_indices=crow, col_indices=col
    )


def _token_list(value: Any, loc: tuple[str | int, ...]) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise WireError(f"{where(loc)} must be a list of integer token ids", loc)
    if any(t < 0 for t in value):
        raise WireError(f"{where(loc)} holds a negative token id", loc)
    return value


def decode_model_input_json(prompt: dict) -> list[int]:
    """asample's JSON prompt `{"chunks": [{"type": "encoded_text", "tokens": [...]}, ...]}`
    -> its tokens, the chunks concatenated."""
    if not isinstance(prompt, dict) or not isinstance(prompt.get("chunks"), list):
        raise WireError('prompt must be an object {"chunks": [...]}', ("prompt",))
    tokens: list[int] = []
    for j, chunk in enumerate(prompt["chunks"]):
        loc = ("prompt", "chunks", j)
        if not isinstance(chunk, dict):
            raise WireError(f"{where(loc)} must be an object", loc)
        kind = chunk.get("type", "encoded_text")  # the SDK's chunk models default their type
        if kind == "encoded_text":
            tokens.extend(_token_list(chunk.get("tokens"), (*loc, "tokens")))
        elif kind in ("image", "image_asset_pointer", "dmel"):
            raise WireError(
                f"{where(loc)}: {kind} chunks are not supported: {TEXT_ONLY}",
                loc,
            )
        else:
            raise WireError(f"{where(loc)} has unknown type {kind!r}", (*loc, "type"))
    if not tokens:
        raise WireError("prompt has no tokens", ("prompt",))
    return tokens


def parse_stop(stop: Any) -> tuple[list[str], list[int]]:
    """sampling_params.stop (None, a string, a list of strings or a list of token ids)
    -> (stop strings, stop token ids). An empty list also turns the model's own end tokens off
    (tinker 0.38: `stop=[]` samples until max_tokens); `stop_disables_eos` says which."""
    loc = ("sampling_params", "stop")
    if stop is None:
        return [], []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list):
        raise WireError("sampling_params.stop must be a string or a list", loc)
    if all(isinstance(s, str) for s in stop):
        if any(s == "" for s in stop):
            raise WireError("sampling_params.stop strings must not be empty", loc)
        return list(stop), []
    if all(isinstance(t, int) and not isinstance(t, bool) for t in stop):
        if any(t < 0 for t in stop):
            raise WireError("sampling_params.stop token ids must not be negative", loc)
        return [], list(stop)
    raise WireError("sampling_params.stop must be all strings or all token ids, not a mix", loc)


def stop_disables_eos(stop: Any) -> bool:
    """`stop=[]`: nothing stops a candidate but max_tokens, not even the model's end tokens (SDK
    0.38's SamplingParams.stop); None keeps them."""
    return isinstance(stop, list) and not stop
