"""Results -> the protobuf answers the SDK decodes: `ForwardBackwardOutput` and `SampleResponse`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import groupby
from typing import Any

import numpy as np
from tinker.proto import tinker_public_pb2 as pb

# What the SDK reads as "no entry" in a TopkLogprobs cell.
TOPK_SENTINEL: tuple[int, float] = (0, -99999.0)

_STOP_REASONS = {"stop": pb.STOP_REASON_STOP, "length": pb.STOP_REASON_LENGTH}


def _batched_float32(rows: Sequence[Sequence[Any]], trailing: tuple[int, ...] = ()) -> pb.BatchedTensor:
    arrays = [np.asarray(row, dtype="<f4").reshape(-1) for row in rows]
    offsets = np.zeros(len(arrays) + 1, dtype="<i8")
    offsets[1:] = np.cumsum([a.nbytes for a in arrays])
    data = np.concatenate(arrays).tobytes() if arrays else b""
    return pb.BatchedTensor(data=data, offsets=offsets.tobytes(), dtype=pb.DTYPE_FLOAT32, trailing_shape=trailing)


def _trailing(row: Sequence[Any]) -> tuple[int, ...]:
    """() for an [N] row, (K,) for an [N, K] one."""
    first = row[0] if len(row) else None
    return (len(first),) if isinstance(first, (list, tuple)) else ()


def encode_forward_backward_output(
    logprobs: list[list[Any]],
    metrics: dict[str, float],
    elementwise_loss: list[list[float]] | None = None,
) -> bytes:
    """A forward_backward result: the datums' `logprobs` (and `elementwise_loss`), [N] or [N, K]
    each, in one ArrayRecord per run of one shape, plus the metrics. Metric keys are `name:reduction` (`loss:sum`)."""
    for key in metrics:
        if key.count(":") != 1:
            raise ValueError(
                f"metric key {key!r} must be 'name:reduction' with exactly one ':' (the SDK splits every key on it)"
            )
    if elementwise_loss is not None and (
        len(elementwise_loss) != len(logprobs) or any(len(a) != len(b) for a, b in zip(elementwise_loss, logprobs))
    ):
        raise ValueError("elementwise_loss must have the shape of logprobs, datum by datum")
    # One ArrayRecord per run of datums of one trailing shape ([N] rows, or [N, K] rows of one K):
    # the SDK reads ragged outputs as several internally rectangular records, in order.
    runs = [list(run) for _, run in groupby(range(len(logprobs)), key=lambda i: _trailing(logprobs[i]))] or [[]]
    records: list[pb.ArrayRecord] = []
    for run in runs:
        shape = _trailing(logprobs[run[0]]) if run else ()
        record = pb.ArrayRecord(type_tag="ArrayRecord", num_datums=len(run))
        record.fields["logprobs"].CopyFrom(_batched_float32([logprobs[i] for i in run], shape))
        if elementwise_loss is not None:
            record.fields["elementwise_loss"].CopyFrom(_batched_float32([elementwise_loss[i] for i in run], shape))
        records.append(record)
    out = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    out.loss_fn_outputs.extend(records)
    for key, value in metrics.items():
        out.metrics[key] = float(value)
    return out.SerializeToString()


def _field(seq: Any, name: str) -> Any:
    return seq[name] if isinstance(seq, Mapping) else getattr(seq, name)


def _topk(rows: Sequence[Sequence[tuple[int, float]] | None]) -> pb.TopkLogprobs:
    k = max((len(row) for row in rows if row), default=0)
    token_ids = np.full((len(rows), k), TOPK_SENTINEL[0], dtype="<i4")
    values = np.full((len(rows), k), TOPK_SENTINEL[1], dtype="<f4")
    for i, row in enumerate(rows):
        for j, (token, logprob) in enumerate(row or ()):
            token_ids[i, j] = token
            values[i, j] = logprob
    return pb.TopkLogprobs(token_ids=token_ids.tobytes(), logprobs=values.tobytes(), k=k, length=len(rows))


def encode_sample_response(
    sequences: Sequence[Any],
    prompt_logprobs: list[float | None] | None = None,
    topk_prompt_logprobs: list[list[tuple[int, float]] | None] | None = None,
    *,
    target_prompt_logprobs: pb.Tensor | None = None,
    prompt_alt_tokens: tuple[list[list[int]], list[list[float]]] | None = None,
) -> bytes:
    """An asample result. Each sequence is a mapping (or an object) with `tokens`, `logprobs`
    (one per token), `stop_reason` ("stop" or "length") and, when asked for, `top_logprobs` (per
    token, its k most likely (token, logprob)). A prompt logprob of None goes out as NaN; top-k
    rows go out as a length x k matrix padded with (0, -99999.0). `target_prompt_logprobs`: the
    tensor `TargetGrid.answer` made; `prompt_alt_tokens`: the draws and their logprobs, [len - 1][k]."""
    out = pb.SampleResponse()
    for n, seq in enumerate(sequences):
        tokens = list(_field(seq, "tokens"))
        logprobs = list(_field(seq, "logprobs"))
        stop_reason = _field(seq, "stop_reason")
        if len(logprobs) != len(tokens):
            raise ValueError(f"sequence {n} has {len(tokens)} tokens but {len(logprobs)} logprobs")
        if stop_reason not in _STOP_REASONS:
            raise ValueError(f"sequence {n}: stop_reason must be 'stop' or 'length'")
        encoded = out.sequences.add(
            stop_reason=_STOP_REASONS[stop_reason],
            tokens=np.asarray(tokens, dtype="<i4").tobytes(),
            logprobs=np.asarray(logprobs, dtype="<f4").tobytes(),
        )
        top = seq.get("top_logprobs") if isinstance(seq, Mapping) else getattr(seq, "top_logprobs", None)
        if top is not None:
            if len(top) != len(tokens):
                raise ValueError(f"sequence {n} has {len(tokens)} tokens but {len(top)} top_logprobs rows")
            encoded.topk_sampled_logprobs.CopyFrom(_topk(top))
    if target_prompt_logprobs is not None:
        out.target_prompt_logprobs.CopyFrom(target_prompt_logprobs)
    if prompt_alt_tokens is not None:
        alt_tokens, alt_logprobs = prompt_alt_tokens
        out.prompt_alt_tokens.tokens.CopyFrom(_dense_tensor(alt_tokens, "<i8", pb.DTYPE_INT64))
        out.prompt_alt_tokens.logprobs.CopyFrom(_dense_tensor(alt_logprobs, "<f4", pb.DTYPE_FLOAT32))
    if prompt_logprobs is not None:
        values = [math.nan if v is None else v for v in prompt_logprobs]
        out.prompt_logprobs = np.asarray(values, dtype="<f4").tobytes()
    if topk_prompt_logprobs is not None:
        out.topk_prompt_logprobs.CopyFrom(_topk(topk_prompt_logprobs))
    return out.SerializeToString()


def _dense_tensor(rows: list[list[Any]], np_dtype: str, dtype: pb.DType.ValueType) -> pb.Tensor:
    width = len(rows[0]) if rows else 0
    arr = np.asarray(rows, dtype=np_dtype).reshape(len(rows), width)
    return pb.Tensor(dense=arr.tobytes(), dtype=dtype, shape=[len(rows), width])
