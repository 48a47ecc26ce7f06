"""Tinker's wire formats <-> EZTinker's own types: pure functions, no I/O, no torch.

The Tinker SDK (`tinker` 0.38.0) sends a forward_backward as a protobuf
`tinker_public.ForwardBackwardRequest` (optionally zstd-compressed) and expects the results
of forward_backward and asample as protobuf `ForwardBackwardOutput` / `SampleResponse`;
everything else it speaks is JSON. The schema is the one the SDK itself ships
(`tinker.proto.tinker_public_pb2`), imported here, so this package is only loaded when the
`tinker` extra is installed.

Every problem with what a client sent is a `WireError` (errors.py): a message that names the
offending place (`data[2].loss_fn_inputs.weights ...`) and the same place as a `loc` tuple.
Problems with what the server hands the encoders are programming errors (`ValueError`).

Decoding work and memory are bounded by the input and the limits passed in, checked before
anything is allocated: a zstd body is inflated in chunks up to `max_decompressed_bytes` (a
413 beyond), and a tensor's declared shape may not exceed `max_elements` values (tensors.py).
Decoding a large body takes CPU time: callers run it off the event loop.

One module a direction: forward_backward.py decodes that request's protobuf, sample.py asample's
JSON fields, answers.py encodes the protobuf answers.
"""

from __future__ import annotations

from .answers import encode_forward_backward_output, encode_sample_response
from .errors import WireError
from .forward_backward import ForwardBackwardCall, decode_forward_backward
from .sample import TargetGrid, decode_model_input_json, decode_target_grid, parse_stop, stop_disables_eos

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
]
