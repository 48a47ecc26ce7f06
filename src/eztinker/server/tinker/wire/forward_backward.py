"""A `/api/v1/forward_backward` body (protobuf `tinker_public.ForwardBackwardRequest`, optionally
zstd-compressed) -> a `ForwardBackwardCall` of our own `Datum`s and their provenance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import DecodeError
from pydantic import ValidationError
from tinker.proto import tinker_public_pb2 as pb

from ....types import Datum
from ..provenance import DatumProvenance, ProvenanceSpan, SpanKind
from .errors import TEXT_ONLY, WireError, where
from .tensors import MAX_ELEMENTS, decode_array, decode_tensor, finite_floats, token_ids

# A zstd body may not inflate beyond this (the SDK cuts requests at ~5 MB before compression);
# the server passes its max_request_bytes: a body is bounded alike, compressed or not.
MAX_DECOMPRESSED_BYTES = 64 * 2**20
_INFLATE_CHUNK = 1 << 20

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


def _model_input(datum: pb.Datum, i: int) -> list[int]:
    tokens: list[int] = []
    for j, chunk in enumerate(datum.model_input):
        loc = ("data", i, "model_input", j)
        kind = chunk.WhichOneof("chunk")
        if kind == "encoded_text":
            arr = decode_array(chunk.encoded_text.tokens, pb.DTYPE_INT32, loc, "encoded_text tokens")
            tokens.extend(token_ids(arr, loc))
        elif kind in ("image", "dmel"):
            raise WireError(
                f"{where(loc)}: {kind} chunks are not supported: {TEXT_ONLY}",
                loc,
            )
        else:
            raise WireError(f"{where(loc)} is an empty chunk", loc)
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
                f"{where(loc)} is not supported by this server; loss_fn_inputs may hold {', '.join(_INPUTS)}",
                loc,
            )
        arr = decode_tensor(msg.loss_fn_inputs[name], loc, max_elements, multi=name in _MULTI)
        inputs[name] = token_ids(arr, loc) if _INPUTS[name] else finite_floats(arr, loc)
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
        return WireError(f"{where(loc)} is required", loc)
    for name, values in inputs.items():
        if len(values) != n:
            loc = ("data", i, "loss_fn_inputs", name)
            return WireError(f"{where(loc)} has {len(values)} entries but model_input has {n} tokens", loc)
    first = exc.errors()[0]
    loc = ("data", i, *first["loc"])
    return WireError(f"{where(loc)}: {first['msg']}", loc)


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
            raise WireError(f"{where(loc)} is an empty provenance span", loc)
        arm = getattr(msg, kind)
        if not arm.sequence_id or arm.offset < 0 or arm.length < 0:
            raise WireError(f"{where(loc)} needs a sequence_id, offset >= 0 and length >= 0", loc)
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
    n = sum(len(decode_array(c.encoded_text.tokens, pb.DTYPE_INT32, ("data", i), "tokens")) for c in msg.model_input)
    return DatumProvenance(
        model_input=_spans(msg.model_input_spans, i, "model_input_spans", n),
        targets=_spans(msg.loss_fn_input_spans, i, "loss_fn_input_spans", n),
    )
