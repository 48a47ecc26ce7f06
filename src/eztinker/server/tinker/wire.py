"""Tinker's wire formats <-> EZTinker's own types: pure functions, no I/O, no torch.

The Tinker SDK (`tinker` 0.38.0) sends a forward_backward as a protobuf
`tinker_public.ForwardBackwardRequest` (optionally zstd-compressed) and expects the results
of forward_backward and asample as protobuf `ForwardBackwardOutput` / `SampleResponse`;
everything else it speaks is JSON. The schema is the one the SDK itself ships
(`tinker.proto.tinker_public_pb2`), imported here, so this module is only loaded when the
`tinker` extra is installed.

Every problem with what a client sent is a `WireError`: a message that names the offending
place (`data[2].loss_fn_inputs.weights ...`) and the same place as a `loc` tuple. Problems
with what the server hands the encoders are programming errors (`ValueError`).

Decoding work and memory are bounded by the input and the limits passed in, checked before
anything is allocated: a zstd body is inflated in chunks up to `max_decompressed_bytes` (a
413 beyond), and a tensor's declared shape may not exceed `max_elements` values. Decoding a
large body takes CPU time: callers run it off the event loop.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError
from pydantic import ValidationError
from tinker.proto import tinker_public_pb2 as pb

from ...types import Datum
from .provenance import DatumProvenance, ProvenanceSpan, SpanKind

__all__ = [
    "WireError",
    "ForwardBackwardCall",
    "decode_forward_backward",
    "encode_forward_backward_output",
    "encode_sample_response",
    "decode_model_input_json",
    "parse_stop",
    "stop_disables_eos",
    "TargetGrid",
    "decode_target_grid",
    "MAX_DECOMPRESSED_BYTES",
    "TOPK_SENTINEL",
]

# A zstd body may not inflate beyond this (the SDK cuts requests at ~5 MB before compression);
# the server passes its max_request_bytes: a body is bounded alike, compressed or not.
MAX_DECOMPRESSED_BYTES = 64 * 2**20
# A loss_fn_inputs tensor holds one value per token: its declared shape may not hold more.
MAX_ELEMENTS = 256 * 1024
_INFLATE_CHUNK = 1 << 20

# What the SDK reads as "no entry" in a TopkLogprobs cell.
TOPK_SENTINEL: tuple[int, float] = (0, -99999.0)

TEXT_ONLY = "this server's models are text-only"

# Tinker's loss_fn_inputs names that map onto our LossFnInputs, and whether they hold ints.
_INPUTS: dict[str, bool] = {
    "target_tokens": True,
    "weights": False,
    "logprobs": False,
    "advantages": False,
    "sequence_ratio_mask": False,
}
# The inputs that may carry several values a position ([N, K]: top-k distillation's targets).
_MULTI = {"target_tokens", "weights"}

_DTYPE_NAMES = {
    pb.DTYPE_UNSPECIFIED: "unspecified",
    pb.DTYPE_FLOAT32: "float32",
    pb.DTYPE_INT64: "int64",
    pb.DTYPE_INT32: "int32",
    pb.DTYPE_BFLOAT16: "bfloat16",
}
# The numpy type each DType's bytes are read as (bfloat16: raw uint16, widened below).
_DTYPE_NUMPY: dict[pb.DType.ValueType, np.dtype] = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_INT64: np.dtype("<i8"),
    pb.DTYPE_INT32: np.dtype("<i4"),
    pb.DTYPE_BFLOAT16: np.dtype("<u2"),
}

_STOP_REASONS = {"stop": pb.STOP_REASON_STOP, "length": pb.STOP_REASON_LENGTH}


class WireError(ValueError):
    """A request body that does not decode into something this server can run.

    `message` is meant for the client and names the offending place; `loc` is that place as
    a path (`("data", 0, "loss_fn_inputs", "weights")`), `()` for the body as a whole.
    """

    def __init__(self, message: str, loc: tuple[str | int, ...] = (), status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.loc = tuple(loc)
        self.status = status  # 413: a body over a size limit


@dataclass(frozen=True)
class ForwardBackwardCall:
    """One decoded `/api/v1/forward_backward` body (one chunk of a client's call)."""

    model_id: str
    seq_id: int
    loss_fn: str
    loss_fn_config: dict[str, float] = field(default_factory=dict)
    forward_only: bool = False
    data: list[Datum] = field(default_factory=list)
    # Per datum, its provenance (Datum.with_provenance in the SDK), None where it has none.
    provenance: list[DatumProvenance | None] = field(default_factory=list)


def _where(loc: Sequence[str | int]) -> str:
    """("data", 0, "loss_fn_inputs", "weights") -> "data[0].loss_fn_inputs.weights"."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


# --------------------------------------------------------------------------- forward_backward
def _inflate(body: bytes, content_encoding: str | None, limit: int) -> bytes:
    encoding = (content_encoding or "").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding != "zstd":
        raise WireError(f"unsupported Content-Encoding {content_encoding!r}: send the body plain or zstd")
    import zstandard  # a dependency of tinker

    bad = "malformed ForwardBackwardRequest protobuf: bad zstd body"
    too_big = f"the zstd body inflates to more than max_request_bytes ({limit} bytes)"
    try:
        size = zstandard.get_frame_parameters(body).content_size
    except zstandard.ZstdError as exc:
        raise WireError(f"{bad}: {exc}") from exc
    if size != zstandard.CONTENTSIZE_UNKNOWN and size > limit:  # refused before anything inflates
        raise WireError(f"{too_big}: it declares {size}", status=413)
    # Inflated in chunks, whatever the frame declares, and stopped as soon as it passes the limit:
    # a 30 KB bomb costs at most `limit` bytes and the time to inflate them.
    out, total = [], 0
    try:
        with zstandard.ZstdDecompressor().stream_reader(body) as reader:
            while chunk := reader.read(_INFLATE_CHUNK):
                total += len(chunk)
                if total > limit:
                    raise WireError(too_big, status=413)
                out.append(chunk)
    except zstandard.ZstdError as exc:
        raise WireError(f"{bad}: {exc}") from exc
    return b"".join(out)


def _array(buf: bytes, dtype: pb.DType.ValueType, loc: tuple[str | int, ...], what: str) -> np.ndarray:
    """Little-endian bytes of a DType -> a 1-D numpy array (int64 or float32)."""
    np_dtype = _DTYPE_NUMPY.get(dtype)
    if np_dtype is None:
        raise WireError(
            f"{_where(loc)} has dtype {_DTYPE_NAMES.get(dtype, dtype)}; expected int64, int32, float32 or bfloat16",
            loc,
        )
    if len(buf) % np_dtype.itemsize:
        raise WireError(
            f"{_where(loc)}: {what} holds {len(buf)} bytes, not a whole number of {_DTYPE_NAMES[dtype]} values",
            loc,
        )
    arr = np.frombuffer(buf, dtype=np_dtype)
    if dtype == pb.DTYPE_BFLOAT16:
        return (arr.astype(np.uint32) << 16).view(np.float32)
    if dtype == pb.DTYPE_INT32:
        return arr.astype(np.int64)
    return arr


def _index_array(buf: bytes, loc: tuple[str | int, ...], what: str) -> np.ndarray:
    if len(buf) % 8:
        raise WireError(f"{_where(loc)}: sparse {what} is not a whole number of int64 values", loc)
    return np.frombuffer(buf, dtype="<i8")


def _dense(msg: pb.Tensor, loc: tuple[str | int, ...], max_elements: int = MAX_ELEMENTS) -> np.ndarray:
    """A Tensor -> a numpy array of its shape; sparse CSR is expanded with zeros. The declared
    shape is checked against `max_elements` first: a 177-byte CSR tensor may declare [3, 2^36]."""
    shape = [int(s) for s in msg.shape]
    if any(s < 0 for s in shape):
        raise WireError(f"{_where(loc)} has a negative dimension in shape {shape}", loc)
    if math.prod(shape) > max_elements:
        raise WireError(
            f"{_where(loc)} declares shape {shape}, {math.prod(shape)} values; a loss_fn_inputs tensor "
            f"holds at most max_tokens_per_request ({max_elements})",
            loc,
        )
    which = msg.WhichOneof("encoding")
    if which == "sparse_csr":
        if len(shape) != 2:
            raise WireError(f"{_where(loc)} is sparse CSR with shape {shape}; CSR needs a 2-D shape", loc)
        rows, cols = shape
        csr = msg.sparse_csr
        values = _array(csr.values, msg.dtype, loc, "values")
        crow = _index_array(csr.crow_indices, loc, "crow_indices")
        col = _index_array(csr.col_indices, loc, "col_indices")
        nnz = len(values)
        if (
            len(crow) != rows + 1
            or crow[0] != 0
            or crow[-1] != nnz
            or np.any(np.diff(crow) < 0)
            or len(col) != nnz
            or (nnz and (col.min() < 0 or col.max() >= cols))
        ):
            raise WireError(
                f"{_where(loc)} is not a valid sparse CSR tensor of shape {shape} "
                f"({len(crow)} crow_indices, {len(col)} col_indices, {nnz} values)",
                loc,
            )
        dense = np.zeros((rows, cols), dtype=values.dtype)
        row_of = np.repeat(np.arange(rows), np.diff(crow))
        dense[row_of, col] = values
        return dense
    arr = _array(msg.dense, msg.dtype, loc, "dense data")
    if not shape:
        return arr
    if math.prod(shape) != arr.size:
        raise WireError(f"{_where(loc)} has shape {shape} but {arr.size} values", loc)
    return arr.reshape(shape)


def _tensor(
    msg: pb.Tensor, loc: tuple[str | int, ...], max_elements: int = MAX_ELEMENTS, multi: bool = False
) -> np.ndarray:
    """A Tensor -> a 1-D numpy array, or with `multi` a 2-D [N, K] one (K >= 2). A 2-D tensor
    of shape [N, 1] counts as 1-D."""
    arr = _dense(msg, loc, max_elements)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim == 2 and multi:
        return arr
    if arr.ndim > 1:
        takes = "[N] or [N, K]" if multi else "[N] (one value per input token)"
        raise WireError(f"{_where(loc)} has shape {list(arr.shape)}; it must be {takes}", loc)
    return arr.reshape(-1)


def _ints(arr: np.ndarray, loc: tuple[str | int, ...]) -> list[int]:
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise WireError(f"{_where(loc)} must hold integer token ids", loc)
        arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        raise WireError(f"{_where(loc)} holds a negative token id ({int(arr.min())})", loc)
    return arr.tolist()


def _floats(arr: np.ndarray, loc: tuple[str | int, ...]) -> list[float]:
    arr = arr.astype(np.float64)
    bad = np.argwhere(~np.isfinite(arr))
    if bad.size:
        at = tuple(int(i) for i in bad[0])
        index = "".join(f"[{i}]" for i in at)
        raise WireError(f"{_where(loc)}{index} is {arr[at]}; only finite values are accepted", (*loc, *at))
    return arr.tolist()


def _model_input(datum: pb.Datum, i: int) -> list[int]:
    tokens: list[int] = []
    for j, chunk in enumerate(datum.model_input):
        loc = ("data", i, "model_input", j)
        kind = chunk.WhichOneof("chunk")
        if kind == "encoded_text":
            arr = _array(chunk.encoded_text.tokens, pb.DTYPE_INT32, loc, "encoded_text tokens")
            tokens.extend(_ints(arr, loc))
        elif kind in ("image", "dmel"):
            raise WireError(
                f"{_where(loc)}: {kind} chunks are not supported: {TEXT_ONLY}",
                loc,
            )
        else:
            raise WireError(f"{_where(loc)} is an empty chunk", loc)
    return tokens


def _datum(msg: pb.Datum, i: int, max_elements: int = MAX_ELEMENTS) -> Datum:
    tokens = _model_input(msg, i)
    inputs: dict[str, Any] = {}
    for name in sorted(msg.loss_fn_inputs):
        loc = ("data", i, "loss_fn_inputs", name)
        if name not in _INPUTS:
            # Refused rather than ignored: a per-token clip_low_threshold, a mask or a
            # sequence_ratio_mask that silently did nothing would train something else than
            # the client asked for (the REST schema refuses unknown fields for the same reason).
            raise WireError(
                f"{_where(loc)} is not supported by this server; loss_fn_inputs may hold {', '.join(_INPUTS)}",
                loc,
            )
        arr = _tensor(msg.loss_fn_inputs[name], loc, max_elements, multi=name in _MULTI)
        inputs[name] = _ints(arr, loc) if _INPUTS[name] else _floats(arr, loc)
    try:
        return Datum(model_input={"tokens": tokens}, loss_fn_inputs=inputs)
    except ValidationError as exc:
        raise _datum_error(exc, i, tokens, inputs) from None


def _datum_error(exc: ValidationError, i: int, tokens: list[int], inputs: dict[str, Any]) -> WireError:
    """Our Datum refused what decoded fine: say which datum and which field, in Tinker's terms."""
    n = len(tokens)
    if n == 0:
        return WireError(f"data[{i}].model_input has no tokens", ("data", i, "model_input"))
    loc: tuple[str | int, ...]
    if "target_tokens" not in inputs:
        loc = ("data", i, "loss_fn_inputs", "target_tokens")
        return WireError(f"{_where(loc)} is required", loc)
    for name, values in inputs.items():
        if len(values) != n:
            loc = ("data", i, "loss_fn_inputs", name)
            return WireError(f"{_where(loc)} has {len(values)} entries but model_input has {n} tokens", loc)
    first = exc.errors()[0]
    loc = ("data", i, *first["loc"])
    return WireError(f"{_where(loc)}: {first['msg']}", loc)


def _loss_fn_config(msg: pb.ForwardBackwardRequest) -> dict[str, float]:
    config: dict[str, float] = dict(msg.loss_fn_config)
    for key, value in msg.loss_fn_config_v2.items():  # v2 wins: the SDK dual-writes numbers
        loc = ("loss_fn_config", key)
        kind = value.WhichOneof("value")
        if kind == "text":
            raise WireError(
                f"loss_fn_config[{key!r}] is the text {value.text!r}; this server's losses take numbers only",
                loc,
            )
        if kind is None:
            raise WireError(f"loss_fn_config[{key!r}] has no value", loc)
        config[key] = value.number
    for key, number in config.items():
        if not math.isfinite(number):
            raise WireError(
                f"loss_fn_config[{key!r}] is {number}; only finite values are accepted",
                ("loss_fn_config", key),
            )
    return config


def decode_forward_backward(
    body: bytes,
    content_encoding: str | None,
    *,
    max_decompressed_bytes: int = MAX_DECOMPRESSED_BYTES,
    max_elements: int = MAX_ELEMENTS,
) -> ForwardBackwardCall:
    """A `/api/v1/forward_backward` body (protobuf, zstd when `content_encoding` says so). CPU
    work that grows with the body: call it off the event loop."""
    raw = _inflate(body, content_encoding, max_decompressed_bytes)
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(raw)
    except DecodeError as exc:
        raise WireError(f"malformed ForwardBackwardRequest protobuf: {exc}") from exc
    if not msg.data:
        raise WireError("ForwardBackwardRequest has no data", ("data",))
    return ForwardBackwardCall(
        model_id=msg.model_id,
        seq_id=msg.seq_id,
        loss_fn=msg.loss_fn,
        loss_fn_config=_loss_fn_config(msg),
        forward_only=msg.forward_only,
        data=[_datum(d, i, max_elements) for i, d in enumerate(msg.data)],
        provenance=[_provenance(d, i) for i, d in enumerate(msg.data)],
    )


def _spans(msgs: Sequence[pb.ProvenanceSpan], i: int, name: str, covers: int) -> tuple[ProvenanceSpan, ...]:
    spans = []
    for j, msg in enumerate(msgs):
        loc = ("data", i, name, j)
        kind = msg.WhichOneof("span")
        if kind is None:
            raise WireError(f"{_where(loc)} is an empty provenance span", loc)
        arm = getattr(msg, kind)
        if not arm.sequence_id or arm.offset < 0 or arm.length < 0:
            raise WireError(f"{_where(loc)} needs a sequence_id, offset >= 0 and length >= 0", loc)
        spans.append(
            ProvenanceSpan(
                SpanKind.PROMPT if kind == "prompt_tokens" else SpanKind.SAMPLED,
                arm.sequence_id,
                int(arm.offset),
                int(arm.length),
            )
        )
    total = sum(span.length for span in spans)
    if total != covers:
        raise WireError(
            f"data[{i}].{name} cover {total} positions but the field has {covers}; the runs must tile it exactly",
            ("data", i, name),
        )
    return tuple(spans)


def _provenance(msg: pb.Datum, i: int) -> DatumProvenance | None:
    """A datum's provenance runs, checked to tile its model input and its targets."""
    if not msg.model_input_spans and not msg.loss_fn_input_spans:
        return None
    if not msg.model_input_spans or not msg.loss_fn_input_spans:
        raise WireError(
            f"data[{i}]: provenance comes as a pair, model_input_spans and loss_fn_input_spans",
            ("data", i, "model_input_spans"),
        )
    n = sum(len(_array(c.encoded_text.tokens, pb.DTYPE_INT32, ("data", i), "tokens")) for c in msg.model_input)
    return DatumProvenance(
        model_input=_spans(msg.model_input_spans, i, "model_input_spans", n),
        targets=_spans(msg.loss_fn_input_spans, i, "loss_fn_input_spans", n),
    )


# ------------------------------------------------------------------------------------ outputs
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
        raise WireError(f"{_where(loc)}: {what} must be a list of integers", loc)
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


# ---------------------------------------------------------------------------- asample (JSON)
def _token_list(value: Any, loc: tuple[str | int, ...]) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise WireError(f"{_where(loc)} must be a list of integer token ids", loc)
    if any(t < 0 for t in value):
        raise WireError(f"{_where(loc)} holds a negative token id", loc)
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
            raise WireError(f"{_where(loc)} must be an object", loc)
        kind = chunk.get("type", "encoded_text")  # the SDK's chunk models default their type
        if kind == "encoded_text":
            tokens.extend(_token_list(chunk.get("tokens"), (*loc, "tokens")))
        elif kind in ("image", "image_asset_pointer", "dmel"):
            raise WireError(
                f"{_where(loc)}: {kind} chunks are not supported: {TEXT_ONLY}",
                loc,
            )
        else:
            raise WireError(f"{_where(loc)} has unknown type {kind!r}", (*loc, "type"))
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
