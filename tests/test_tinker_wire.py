"""The Tinker wire layer against the real `tinker` SDK (0.38.0): requests are built and
encoded by the SDK's own code (its AsyncTinker client, over an in-memory httpx transport),
results are decoded by the SDK's own response decoders. No hand-written stand-ins, except
where the SDK cannot produce the case (noted)."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

tinker = pytest.importorskip("tinker")
pytestmark = pytest.mark.filterwarnings("ignore:The `construct` method is deprecated")

import httpx  # noqa: E402
import zstandard  # noqa: E402
from tinker import types as T  # noqa: E402
from tinker._client import AsyncTinker  # noqa: E402
from tinker.lib.chunked_fwdbwd_helpers import combine_fwd_bwd_output_results  # noqa: E402
from tinker.proto import tinker_public_pb2 as pb  # noqa: E402
from tinker.proto.response_conv import (  # noqa: E402
    deserialize_forward_backward_output,
    deserialize_sample_response,
)
from tinker.types.client_config_response import ClientConfigResponse  # noqa: E402

from eztinker.server.tinker import wire  # noqa: E402
from eztinker.server.tinker.wire import WireError  # noqa: E402
from eztinker.server.tinker.wire.tensors import decode_dense  # noqa: E402
from eztinker.types import Datum  # noqa: E402


# ------------------------------------------------------------------------ the SDK's send side
def _sdk_post(call, *, compress: bool = False) -> httpx.Request:
    """Run `call(client)` on a real AsyncTinker whose transport records the HTTP request."""
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        request.read()
        sent.append(request)
        return httpx.Response(200, json={"request_id": "req-1"})

    async def main() -> None:
        client = AsyncTinker(
            api_key="tml-wire-test",
            base_url="http://wire.test",
            max_retries=0,
            http_client=httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://wire.test"),
            _client_config=ClientConfigResponse(proto_compress_fwdbwd=compress),
        )
        try:
            await call(client)
        finally:
            await client.close()

    asyncio.run(main())
    assert len(sent) == 1
    return sent[0]


def sdk_forward_backward(
    data,
    loss_fn="cross_entropy",
    loss_fn_config=None,
    *,
    forward_only=False,
    compress=False,
    model_id="sess-1:train:0",
    seq_id=7,
) -> httpx.Request:
    request = T.ForwardBackwardRequest(
        forward_backward_input=T.ForwardBackwardInput(data=data, loss_fn=loss_fn, loss_fn_config=loss_fn_config),
        model_id=model_id,
        seq_id=seq_id,
    )
    req = _sdk_post(
        lambda c: c.training.forward_backward(request=request, forward_only=forward_only),
        compress=compress,
    )
    assert req.url.path == "/api/v1/forward_backward"
    assert req.headers["content-type"] == "application/x-protobuf"
    return req


def decode(req: httpx.Request) -> wire.ForwardBackwardCall:
    return wire.decode_forward_backward(req.content, req.headers.get("content-encoding"))


def sdk_asample_body(prompt: T.ModelInput, **params) -> dict:
    request = T.SampleRequest(
        prompt=prompt,
        sampling_params=T.SamplingParams(**params),
        num_samples=1,
        sampling_session_id="sess-1:sample:0",
        seq_id=0,
    )
    req = _sdk_post(lambda c: c.sampling.asample(request=request))
    assert req.url.path == "/api/v1/asample"
    import json

    return json.loads(req.content)


def _proto_body(msg: pb.ForwardBackwardRequest) -> bytes:
    return msg.SerializeToString()


# ---------------------------------------------------------------------- forward_backward in
@pytest.mark.parametrize("compress", [False, True], ids=["plain", "zstd"])
def test_sdk_cross_entropy_request_decodes_field_by_field(compress):
    data = [
        T.Datum(
            model_input=T.ModelInput.from_ints([11, 12, 13, 14]),
            loss_fn_inputs={"target_tokens": [12, 13, 14, 15], "weights": [0.0, 1.0, 0.5, -2.0]},
        ),
        T.Datum(
            # two chunks, concatenated in order
            model_input=T.ModelInput(chunks=[T.EncodedTextChunk(tokens=[1, 2]), T.EncodedTextChunk(tokens=[70000])]),
            loss_fn_inputs={
                "target_tokens": np.array([2, 70000, 3], dtype=np.int64),
                "weights": np.array([1.0, 1.0, 0.25], dtype=np.float32),
            },
        ),
    ]
    req = sdk_forward_backward(data, compress=compress, seq_id=7)
    assert (req.headers.get("content-encoding") == "zstd") is compress
    call = decode(req)
    assert call.model_id == "sess-1:train:0"
    assert call.seq_id == 7
    assert call.loss_fn == "cross_entropy"
    assert call.loss_fn_config == {}
    assert call.forward_only is False
    assert all(isinstance(d, Datum) for d in call.data)
    d0, d1 = call.data
    assert d0.model_input.tokens == [11, 12, 13, 14]
    assert d0.loss_fn_inputs.target_tokens == [12, 13, 14, 15]
    assert d0.loss_fn_inputs.weights == [0.0, 1.0, 0.5, -2.0]
    assert d0.loss_fn_inputs.logprobs is None and d0.loss_fn_inputs.advantages is None
    assert d1.model_input.tokens == [1, 2, 70000]
    assert d1.loss_fn_inputs.target_tokens == [2, 70000, 3]
    assert d1.loss_fn_inputs.weights == [1.0, 1.0, 0.25]
    assert all(type(t) is int for t in d1.loss_fn_inputs.target_tokens)


def test_sdk_rl_request_with_config_and_forward_only():
    datum = T.Datum(
        model_input=T.ModelInput.from_ints([5, 6, 7]),
        loss_fn_inputs={
            "target_tokens": [6, 7, 8],
            "logprobs": [-0.5, -1.25, -3.0],
            "advantages": [0.0, 1.5, -1.5],
        },
    )
    req = sdk_forward_backward(
        [datum],
        loss_fn="ppo",
        loss_fn_config={"clip_low_threshold": 0.7, "clip_high_threshold": 1.3},
        forward_only=True,
        compress=True,
        model_id="sess-9:train:2",
        seq_id=41,
    )
    call = decode(req)
    assert (call.model_id, call.seq_id, call.loss_fn, call.forward_only) == (
        "sess-9:train:2",
        41,
        "ppo",
        True,
    )
    assert call.loss_fn_config == pytest.approx({"clip_low_threshold": 0.7, "clip_high_threshold": 1.3})
    inputs = call.data[0].loss_fn_inputs
    assert inputs.target_tokens == [6, 7, 8]
    assert inputs.logprobs == [-0.5, -1.25, -3.0]
    assert inputs.advantages == [0.0, 1.5, -1.5]
    assert inputs.weights is None


def test_loss_fn_config_v2_wins_and_text_values_are_refused():
    datum = T.Datum(model_input=T.ModelInput.from_ints([1]), loss_fn_inputs={"target_tokens": [2]})
    req = sdk_forward_backward([datum], loss_fn="dro", loss_fn_config={"beta": 0.05, "loss_id": "abc"})
    with pytest.raises(WireError) as err:
        decode(req)
    assert "loss_id" in err.value.message and err.value.loc == ("loss_fn_config", "loss_id")

    # the legacy map alone (an older client), and v2 overriding it
    msg = pb.ForwardBackwardRequest()
    msg.ParseFromString(sdk_forward_backward([datum], loss_fn_config={"beta": 0.05}).content)
    del msg.loss_fn_config_v2["beta"]
    msg.loss_fn_config["gamma"] = 2.0
    assert wire.decode_forward_backward(_proto_body(msg), None).loss_fn_config == {
        "beta": 0.05,
        "gamma": 2.0,
    }
    msg.loss_fn_config_v2["beta"].number = 0.5
    assert wire.decode_forward_backward(_proto_body(msg), None).loss_fn_config["beta"] == 0.5
    msg.loss_fn_config_v2["beta"].number = math.inf
    with pytest.raises(WireError, match="beta"):
        wire.decode_forward_backward(_proto_body(msg), None)


def test_sdk_sparse_csr_tensors_expand_to_dense():
    torch = pytest.importorskip("torch")
    # What the SDK turns into sparse CSR: a 2-D torch target_tokens/weights that is mostly 0.
    dense = torch.zeros((6, 8), dtype=torch.int64)
    dense[1, 3], dense[4, 0], dense[5, 7] = 9, 4, 2
    datum = T.Datum(
        model_input=T.ModelInput.from_ints([1, 2, 3, 4, 5, 6]),
        loss_fn_inputs={"target_tokens": dense},
    )
    tensor = datum.loss_fn_inputs["target_tokens"]
    assert tensor.sparse_crow_indices is not None  # the SDK really chose sparse
    req = sdk_forward_backward([datum])
    msg = pb.ForwardBackwardRequest()
    msg.ParseFromString(req.content)
    assert msg.data[0].loss_fn_inputs["target_tokens"].WhichOneof("encoding") == "sparse_csr"
    # expanded exactly as the SDK (torch) densifies it ...
    loc = ("data", 0, "loss_fn_inputs", "target_tokens")
    expanded = decode_dense(msg.data[0].loss_fn_inputs["target_tokens"], loc)
    assert expanded.dtype == np.int64
    assert np.array_equal(expanded, tensor.to_numpy()) and np.array_equal(expanded, dense.numpy())
    # ... and decoded as [N, K] targets (several per position, top-k distillation)
    assert decode(req).data[0].loss_fn_inputs.target_tokens == dense.tolist()
    # which only target_tokens and weights may be
    datum = T.Datum(
        model_input=T.ModelInput.from_ints([1, 2, 3, 4, 5, 6]),
        loss_fn_inputs={"target_tokens": [1] * 6, "advantages": T.TensorData.from_torch(dense.float())},
    )
    with pytest.raises(WireError) as err:
        decode(sdk_forward_backward([datum]))
    assert err.value.loc == ("data", 0, "loss_fn_inputs", "advantages")
    assert "shape [6, 8]" in err.value.message and "it must be [N]" in err.value.message


def test_declared_shapes_are_bounded_before_anything_is_allocated():
    """177 bytes of sparse CSR once declared [3, 2^36]: numpy asked for 768 GiB (a 500)."""
    loc = ("data", 0, "loss_fn_inputs", "weights")
    huge = pb.Tensor(
        dtype=pb.DTYPE_FLOAT32,
        shape=[3, 2**36],
        sparse_csr=pb.SparseCsr(
            crow_indices=np.array([0, 1, 1, 1], "<i8").tobytes(),
            col_indices=np.array([5], "<i8").tobytes(),
            values=np.array([1.0], "<f4").tobytes(),
        ),
    )
    for tensor in (huge, pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2**62, 2**62], dense=b"")):
        with pytest.raises(WireError, match="max_tokens_per_request") as err:
            decode_dense(tensor, loc, max_elements=1000)
        assert err.value.loc == loc and err.value.status == 400
    msg = pb.ForwardBackwardRequest(model_id="m", loss_fn="cross_entropy")
    datum = msg.data.add()
    datum.model_input.add().encoded_text.tokens = np.array([1, 2, 3], "<i4").tobytes()
    datum.loss_fn_inputs["target_tokens"].CopyFrom(
        pb.Tensor(dtype=pb.DTYPE_INT64, shape=[3], dense=np.array([2, 3, 4], "<i8").tobytes())
    )
    datum.loss_fn_inputs["weights"].CopyFrom(huge)
    with pytest.raises(WireError, match=r"declares shape \[3, 68719476736\]") as err:
        wire.decode_forward_backward(msg.SerializeToString(), None)
    assert err.value.loc == loc


def test_sparse_csr_of_one_column_decodes_as_1d():
    # The SDK never sparsifies a [N, 1] tensor (CSR would not be smaller), but its encoder
    # takes a sparse TensorData built by hand: target_tokens [N, 1] with zeros left out.
    target = T.TensorData(
        data=np.array([7, 9], dtype=np.int64),
        dtype="int64",
        shape=[4, 1],
        sparse_crow_indices=[0, 1, 1, 2, 2],
        sparse_col_indices=[0, 0],
    )
    weights = T.TensorData(
        data=np.array([0.5, 1.0, 2.0], dtype=np.float32),
        dtype="float32",
        shape=[4, 1],
        sparse_crow_indices=[0, 0, 1, 2, 3],
        sparse_col_indices=[0, 0, 0],
    )
    datum = T.Datum(
        model_input=T.ModelInput.from_ints([1, 2, 3, 4]),
        loss_fn_inputs={"target_tokens": target, "weights": weights},
    )
    call = decode(sdk_forward_backward([datum], compress=True))
    assert call.data[0].loss_fn_inputs.target_tokens == [7, 0, 9, 0]
    assert call.data[0].loss_fn_inputs.weights == [0.0, 0.5, 1.0, 2.0]


def test_int32_and_bfloat16_tensors():
    # The SDK only writes int64/float32, but the schema has int32/bfloat16: built by hand.
    datum = T.Datum(
        model_input=T.ModelInput.from_ints([1, 2, 3]),
        loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0, 1.0, 1.0]},
    )
    msg = pb.ForwardBackwardRequest()
    msg.ParseFromString(sdk_forward_backward([datum]).content)
    tt = msg.data[0].loss_fn_inputs["target_tokens"]
    tt.dtype, tt.dense = pb.DTYPE_INT32, np.array([2, 3, 4], dtype="<i4").tobytes()
    w = msg.data[0].loss_fn_inputs["weights"]
    as_f32 = np.array([0.5, -1.0, 3.0], dtype="<f4")
    w.dtype, w.dense = pb.DTYPE_BFLOAT16, (as_f32.view(np.uint32) >> 16).astype("<u2").tobytes()
    call = wire.decode_forward_backward(_proto_body(msg), None)
    assert call.data[0].loss_fn_inputs.target_tokens == [2, 3, 4]
    assert call.data[0].loss_fn_inputs.weights == [0.5, -1.0, 3.0]


def test_image_chunk_is_refused_as_text_only():
    datum = T.Datum(
        model_input=T.ModelInput(
            chunks=[
                T.EncodedTextChunk(tokens=[1, 2]),
                T.ImageChunk(data=b"\x89PNG...", format="png", expected_tokens=4),
            ]
        ),
        loss_fn_inputs={"target_tokens": [0] * 6},
    )
    ok = T.Datum(model_input=T.ModelInput.from_ints([1]), loss_fn_inputs={"target_tokens": [2]})
    with pytest.raises(WireError) as err:
        decode(sdk_forward_backward([ok, datum]))
    assert err.value.loc == ("data", 1, "model_input", 1)
    assert "image chunks are not supported: this server's models are text-only" in err.value.message
    assert err.value.message.startswith("data[1].model_input[1]")


def test_mismatched_lengths_name_the_datum_and_field():
    good = T.Datum(model_input=T.ModelInput.from_ints([1, 2]), loss_fn_inputs={"target_tokens": [2, 3]})
    bad = T.Datum(
        model_input=T.ModelInput.from_ints([1, 2, 3, 4]),
        loss_fn_inputs={"target_tokens": [2, 3, 4, 5], "weights": [1.0, 1.0, 1.0]},
    )
    with pytest.raises(WireError) as err:
        decode(sdk_forward_backward([good, bad]))
    assert err.value.message == "data[1].loss_fn_inputs.weights has 3 entries but model_input has 4 tokens"
    assert err.value.loc == ("data", 1, "loss_fn_inputs", "weights")


def test_missing_target_tokens_and_empty_input():
    datum = T.Datum(model_input=T.ModelInput.from_ints([1, 2]), loss_fn_inputs={"weights": [1.0, 1.0]})
    with pytest.raises(WireError, match=r"data\[0\]\.loss_fn_inputs\.target_tokens is required"):
        decode(sdk_forward_backward([datum]))
    empty = T.Datum(model_input=T.ModelInput.from_ints([]), loss_fn_inputs={"target_tokens": []})
    with pytest.raises(WireError, match=r"data\[0\]\.model_input has no tokens"):
        decode(sdk_forward_backward([empty]))
    with pytest.raises(WireError, match="no data"):
        wire.decode_forward_backward(b"", None)


def test_unknown_per_token_input_is_refused():
    datum = T.Datum(
        model_input=T.ModelInput.from_ints([1, 2]),
        loss_fn_inputs={
            "target_tokens": [2, 3],
            "logprobs": [-1.0, -1.0],
            "advantages": [1.0, 1.0],
            "clip_low_threshold": [0.9, 0.9],
        },
    )
    with pytest.raises(WireError) as err:
        decode(sdk_forward_backward([datum], loss_fn="ppo"))
    assert err.value.loc == ("data", 0, "loss_fn_inputs", "clip_low_threshold")
    assert "not supported" in err.value.message


def test_non_finite_floats_are_refused():
    datum = T.Datum(
        model_input=T.ModelInput.from_ints([1, 2, 3]),
        loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0, float("nan"), 1.0]},
    )
    with pytest.raises(WireError) as err:
        decode(sdk_forward_backward([datum]))
    assert err.value.loc == ("data", 0, "loss_fn_inputs", "weights", 1)
    assert "finite" in err.value.message
    datum = T.Datum(
        model_input=T.ModelInput.from_ints([1]),
        loss_fn_inputs={"target_tokens": [2], "advantages": [float("-inf")], "logprobs": [0.0]},
    )
    with pytest.raises(WireError, match="advantages"):
        decode(sdk_forward_backward([datum], loss_fn="importance_sampling"))


def test_shape_and_byte_count_must_agree():
    datum = T.Datum(model_input=T.ModelInput.from_ints([1, 2]), loss_fn_inputs={"target_tokens": [2, 3]})
    msg = pb.ForwardBackwardRequest()
    msg.ParseFromString(sdk_forward_backward([datum]).content)
    tt = msg.data[0].loss_fn_inputs["target_tokens"]
    tt.dense = tt.dense[:-3]
    with pytest.raises(WireError, match="whole number of int64"):
        wire.decode_forward_backward(_proto_body(msg), None)
    tt.dense = np.array([2, 3, 4], dtype="<i8").tobytes()
    with pytest.raises(WireError, match=r"shape \[2\] but 3 values"):
        wire.decode_forward_backward(_proto_body(msg), None)


@pytest.mark.parametrize(
    "body, encoding",
    [
        (b"not a protobuf", None),
        (b"\xff\xff\xff\xff\xff", None),
        (b"definitely not zstd", "zstd"),
        (zstandard.ZstdCompressor().compress(b"\xff\xff\xff\xff")[:-2], "zstd"),
        (zstandard.ZstdCompressor().compress(b"\xff")[:4], "zstd"),
        (zstandard.ZstdCompressor().compress(b"garbage \x00\x01 garbage"), "zstd"),
    ],
    ids=["text", "ff", "not-zstd", "truncated-zstd", "zstd-magic-only", "zstd-of-garbage"],
)
def test_garbage_bytes(body, encoding):
    with pytest.raises(WireError) as err:
        wire.decode_forward_backward(body, encoding)
    assert err.value.message.startswith("malformed ForwardBackwardRequest protobuf: ")
    assert err.value.loc == ()


def test_zstd_without_content_size_and_bomb_limit():
    datum = T.Datum(model_input=T.ModelInput.from_ints([1, 2]), loss_fn_inputs={"target_tokens": [2, 3]})
    raw = sdk_forward_backward([datum]).content
    streamed = zstandard.ZstdCompressor(write_content_size=False).compress(raw)
    assert wire.decode_forward_backward(streamed, "ZSTD").data[0].model_input.tokens == [1, 2]
    with pytest.raises(WireError, match=rf"more than max_request_bytes \(8 bytes\): it declares {len(raw)}") as err:
        wire.decode_forward_backward(zstandard.ZstdCompressor().compress(raw), "zstd", max_decompressed_bytes=8)
    assert err.value.status == 413
    with pytest.raises(WireError, match=r"inflates to more than max_request_bytes \(8 bytes\)") as err:
        wire.decode_forward_backward(streamed, "zstd", max_decompressed_bytes=8)
    assert err.value.status == 413
    # a frame that declares more than the limit is refused before anything is allocated
    bomb = zstandard.ZstdCompressor().compress(bytes(1 << 20))
    params = zstandard.get_frame_parameters(bomb)
    assert params.content_size == 1 << 20
    with pytest.raises(WireError, match="more than"):
        wire.decode_forward_backward(bomb, "zstd", max_decompressed_bytes=1 << 19)
    # one that does not declare its size, or lies about it, is stopped as it inflates past the limit
    hidden = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(1 << 22))
    with pytest.raises(WireError, match="inflates to more than") as err:
        wire.decode_forward_backward(hidden, "zstd", max_decompressed_bytes=1 << 20)
    assert err.value.status == 413
    with pytest.raises(WireError, match="Content-Encoding"):
        wire.decode_forward_backward(raw, "gzip")


# -------------------------------------------------------------------- forward_backward out
def test_forward_backward_output_decodes_with_the_sdk():
    logprobs = [[-0.5, -1.25, -2.0], [], [-0.125]]
    elementwise = [[0.5, 1.25, 0.0], [], [0.125]]
    metrics = {"loss:sum": 1.875, "num_tokens:sum": 4.0}
    body = wire.encode_forward_backward_output(logprobs, metrics, elementwise)
    out = deserialize_forward_backward_output(body)
    assert out.loss_fn_output_type == "ArrayRecord"
    assert out.metrics == metrics
    assert len(out.loss_fn_outputs) == 3
    for i, row in enumerate(out.loss_fn_outputs):
        assert set(row) == {"logprobs", "elementwise_loss"}
        assert row["logprobs"].dtype == "float32"
        assert row["logprobs"].shape == [len(logprobs[i])]
        assert row["logprobs"].tolist() == logprobs[i]
        assert row["elementwise_loss"].tolist() == elementwise[i]
    # the SDK's chunk merge splits every metric key on ':'
    merged = combine_fwd_bwd_output_results([out, deserialize_forward_backward_output(body)])
    assert merged.metrics["loss:sum"] == pytest.approx(3.75)
    assert len(merged.loss_fn_outputs) == 6

    # raw layout: one record, byte offsets
    msg = pb.ForwardBackwardOutput()
    msg.ParseFromString(body)
    (record,) = msg.loss_fn_outputs
    assert record.type_tag == "ArrayRecord" and record.num_datums == 3
    assert np.frombuffer(record.fields["logprobs"].offsets, "<i8").tolist() == [0, 12, 12, 16]


def test_forward_backward_output_without_elementwise_loss_and_bad_metric_keys():
    out = deserialize_forward_backward_output(wire.encode_forward_backward_output([[-1.0, -2.0]], {"loss:sum": 3.0}))
    assert list(out.loss_fn_outputs[0]) == ["logprobs"]
    assert out.loss_fn_outputs[0]["logprobs"].tolist() == [-1.0, -2.0]
    for key in ("loss", "loss:sum:x"):
        with pytest.raises(ValueError, match="exactly one ':'"):
            wire.encode_forward_backward_output([[-1.0]], {key: 1.0})
    with pytest.raises(ValueError, match="shape of logprobs"):
        wire.encode_forward_backward_output([[-1.0]], {"loss:sum": 1.0}, [[1.0, 2.0]])


def test_forward_backward_output_of_k_targets_goes_out_in_records_of_one_shape():
    logprobs = [[-1.0, -2.0], [[-0.5, -0.25], [-3.0, -4.0], [-5.0, -6.0]], [[-1.0, -1.5, -2.5]], [-7.0]]
    body = wire.encode_forward_backward_output(logprobs, {"loss:sum": 1.0})
    msg = pb.ForwardBackwardOutput()
    msg.ParseFromString(body)
    assert [(r.num_datums, list(r.fields["logprobs"].trailing_shape)) for r in msg.loss_fn_outputs] == [
        (1, []),
        (1, [2]),
        (1, [3]),
        (1, []),
    ]
    out = deserialize_forward_backward_output(body)
    assert [row["logprobs"].shape for row in out.loss_fn_outputs] == [[2], [3, 2], [1, 3], [1]]
    assert [row["logprobs"].to_numpy().tolist() for row in out.loss_fn_outputs] == logprobs


def test_provenance_spans_decode_and_must_tile_their_fields():
    spans = dict(
        model_input=[
            T.PromptProvenanceSpan(sequence_id="s:0", length=2),
            T.SampledProvenanceSpan(sequence_id="s:0", length=1),
        ],
        loss_fn_inputs=[
            T.PromptProvenanceSpan(sequence_id="s:0", offset=1, length=1),
            T.SampledProvenanceSpan(sequence_id="s:0", length=2),
        ],
    )
    datum = T.Datum(model_input=T.ModelInput.from_ints([1, 2, 3]), loss_fn_inputs={"target_tokens": [2, 3, 4]})
    call = decode(sdk_forward_backward([datum.with_provenance(**spans), datum]))
    first, second = call.provenance
    assert second is None
    assert [(s.kind.value, s.sequence_id, s.offset, s.length) for s in first.targets] == [
        ("prompt", "s:0", 1, 1),
        ("sampled", "s:0", 0, 2),
    ]
    # runs that do not tile the tokens (bypassing the SDK's own check) are refused by name
    short = T.Datum(
        model_input=datum.model_input,
        loss_fn_inputs=datum.loss_fn_inputs,
        model_input_spans=spans["model_input"][:1],
        loss_fn_input_spans=spans["loss_fn_inputs"],
    )
    with pytest.raises(WireError) as err:
        decode(sdk_forward_backward([short]))
    assert err.value.loc == ("data", 0, "model_input_spans") and "cover 2 positions" in err.value.message


# --------------------------------------------------------------------------------- sample out
def test_sample_response_decodes_with_the_sdk():
    from eztinker.types import SampledSequence

    sequences = [
        {"tokens": [10, 11, 151645], "logprobs": [-0.25, -1.5, -0.125], "stop_reason": "stop"},
        SampledSequence(text="xy", tokens=[12, 13], logprobs=[-2.0, -3.0], stop_reason="length"),
    ]
    prompt_logprobs = [None, -1.5, -0.25, None]
    topk = [None, [(5, -0.5), (6, -1.0), (7, -2.0)], [(8, -0.25)], []]
    body = wire.encode_sample_response(sequences, prompt_logprobs, topk)
    out = deserialize_sample_response(body)
    assert [s.tokens for s in out.sequences] == [[10, 11, 151645], [12, 13]]
    assert [s.logprobs for s in out.sequences] == [[-0.25, -1.5, -0.125], [-2.0, -3.0]]
    assert [s.stop_reason for s in out.sequences] == ["stop", "length"]
    assert out.prompt_logprobs == [None, -1.5, -0.25, None]
    assert out.topk_prompt_logprobs == [None, [(5, -0.5), (6, -1.0), (7, -2.0)], [(8, -0.25)], None]
    assert out.topk_prompt_logprobs_np.token_ids.shape == (4, 3)


def test_sample_response_without_prompt_fields():
    out = deserialize_sample_response(
        wire.encode_sample_response([{"tokens": [1], "logprobs": [-0.5], "stop_reason": "length"}])
    )
    assert out.prompt_logprobs is None and out.topk_prompt_logprobs is None
    assert out.sequences[0].tokens == [1] and out.sequences[0].logprobs == [-0.5]
    with pytest.raises(ValueError, match="logprobs"):
        wire.encode_sample_response([{"tokens": [1, 2], "logprobs": [-0.5], "stop_reason": "stop"}])
    with pytest.raises(ValueError, match="stop_reason"):
        wire.encode_sample_response([{"tokens": [1], "logprobs": [-0.5], "stop_reason": "eos"}])


# ---------------------------------------------------------------------------- asample JSON in
def test_asample_prompt_as_the_sdk_sends_it():
    body = sdk_asample_body(
        T.ModelInput(chunks=[T.EncodedTextChunk(tokens=[5, 6]), T.EncodedTextChunk(tokens=[7])]),
        max_tokens=3,
        stop=[151645],
    )
    assert wire.decode_model_input_json(body["prompt"]) == [5, 6, 7]
    assert wire.parse_stop(body["sampling_params"]["stop"]) == ([], [151645])
    body = sdk_asample_body(T.ModelInput.from_ints([1]), stop="\n")
    assert wire.parse_stop(body["sampling_params"]["stop"]) == (["\n"], [])
    body = sdk_asample_body(T.ModelInput.from_ints([1]), stop=["\n\n", "User:"])
    assert wire.parse_stop(body["sampling_params"]["stop"]) == (["\n\n", "User:"], [])
    body = sdk_asample_body(T.ModelInput.from_ints([1]))
    assert wire.parse_stop(body["sampling_params"].get("stop")) == ([], [])


@pytest.mark.parametrize(
    "chunk",
    [
        T.ImageChunk(data=b"\xff\xd8jpeg", format="jpeg"),
        T.ImageAssetPointerChunk(format="png", location="s3://bucket/a.png", expected_tokens=3),
        T.DmelChunk(dmel=b"\x00\x01"),
    ],
    ids=["image", "image_asset_pointer", "dmel"],
)
def test_asample_non_text_chunks_are_refused(chunk):
    body = sdk_asample_body(T.ModelInput(chunks=[T.EncodedTextChunk(tokens=[1]), chunk]))
    with pytest.raises(WireError) as err:
        wire.decode_model_input_json(body["prompt"])
    assert err.value.loc == ("prompt", "chunks", 1)
    assert f"{chunk.type} chunks are not supported: this server's models are text-only" in err.value.message


def test_asample_bad_prompts():
    with pytest.raises(WireError, match="no tokens"):
        wire.decode_model_input_json(sdk_asample_body(T.ModelInput.empty())["prompt"])
    with pytest.raises(WireError, match="no tokens"):
        wire.decode_model_input_json({"chunks": [{"type": "encoded_text", "tokens": []}]})
    for prompt in (
        {"chunks": [{"type": "encoded_text", "tokens": [1, "2"]}]},
        {"chunks": [{"type": "encoded_text", "tokens": [-1]}]},
    ):
        with pytest.raises(WireError) as err:
            wire.decode_model_input_json(prompt)
        assert err.value.loc == ("prompt", "chunks", 0, "tokens")
    with pytest.raises(WireError):
        wire.decode_model_input_json({"tokens": [1]})
    with pytest.raises(WireError, match="unknown type"):
        wire.decode_model_input_json({"chunks": [{"type": "video"}]})


def test_parse_stop_edge_cases():
    assert wire.parse_stop([]) == ([], [])
    for bad in ([1, "a"], ["", "x"], [True], 3, [-1]):
        with pytest.raises(WireError) as err:
            wire.parse_stop(bad)
        assert err.value.loc == ("sampling_params", "stop")


# ------------------------------------------------------------------------------- module rules
def test_wire_needs_no_torch():
    modules = list(Path(wire.__file__).parent.glob("*.py"))
    assert len(modules) > 1
    for module in modules:
        assert "import torch" not in module.read_text(), module
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from eztinker.server.tinker import wire\n"
        "from tinker.proto import tinker_public_pb2 as pb\n"
        "m = pb.ForwardBackwardRequest(model_id='m', seq_id=1)\n"
        "d = m.data.add(); d.model_input.add().encoded_text.tokens = bytes(4)\n"
        "t = d.loss_fn_inputs['target_tokens']; t.dtype = pb.DTYPE_INT64; t.dense = bytes(8)\n"
        "print(wire.decode_forward_backward(m.SerializeToString(), None).data[0].model_input.tokens)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[0]"


# ------------------------------------------------------------- asample's per-position fields
def _json_tensor(td: T.TensorData) -> dict:
    """A TensorData as the SDK's asample JSON carries it (built and sent by the SDK's own code)."""
    import json

    from tinker.lib.public_interfaces.sampling_client import _tensor_data_to_model

    request = T.SampleRequest(
        prompt=T.ModelInput.from_ints([1, 2, 3, 4]),
        sampling_params=T.SamplingParams(stop=[]),
        num_samples=1,
        sampling_session_id="sess-1:sample:0",
        seq_id=0,
        target_prompt_logprobs=_tensor_data_to_model(td),
    )
    body = json.loads(_sdk_post(lambda c: c.sampling.asample(request=request)).content)
    assert body["sampling_params"]["stop"] == []  # stop=[] reaches the server as []: EOS off
    return body["target_prompt_logprobs"]


@pytest.mark.parametrize("sparse", [False, True])
def test_target_prompt_logprobs_decode_and_answer_in_the_requests_layout(sparse):
    import torch

    ids = torch.full((5, 4), -1)
    ids[0, 2], ids[2, 0], ids[2, 1] = 7, 9, 9
    td = T.TensorData.from_torch_sparse(ids, pad_value=-1) if sparse else T.TensorData.from_torch(ids)
    assert (td.sparse_crow_indices is not None) == sparse
    grid = wire.decode_target_grid(_json_tensor(td))
    assert grid.rows == [[7], [], [9, 9], [], []] and grid.shape == (5, 4)
    body = wire.encode_sample_response(
        [{"tokens": [1], "logprobs": [-0.5], "stop_reason": "length"}],
        target_prompt_logprobs=grid.answer([[-2.0], [], [-3.0, -3.0], [], []]),
    )
    got = deserialize_sample_response(body).target_prompt_logprobs
    assert (got.sparse_crow_indices is not None) == sparse  # the answer keeps the request's layout
    want = torch.zeros(5, 4)
    want[0, 2], want[2, 0], want[2, 1] = -2.0, -3.0, -3.0
    assert got.to_torch(pad_value=0).tolist() == want.tolist()


@pytest.mark.parametrize(
    "tensor, message",
    [
        ({"data": [1.0], "dtype": "float32", "shape": [1, 1]}, "int64"),
        ({"data": [1, 2], "dtype": "int64", "shape": [2]}, "2-D"),
        ({"data": [1, 2, 3], "dtype": "int64", "shape": [2, 2]}, "but 3 values"),
        ({"data": [1, -2], "dtype": "int64", "shape": [1, 2]}, "negative id"),
        (
            {"data": [1], "dtype": "int64", "shape": [2, 2], "sparse_crow_indices": [0, 1], "sparse_col_indices": [0]},
            "sparse CSR",
        ),
    ],
)
def test_bad_target_prompt_logprobs_are_refused_naming_the_field(tensor, message):
    with pytest.raises(WireError) as err:
        wire.decode_target_grid(tensor)
    assert "target_prompt_logprobs" in err.value.message and message in err.value.message


def test_sampled_top_k_and_alt_tokens_reach_the_sdks_types():
    seq = {
        "tokens": [3, 4],
        "logprobs": [-0.1, -0.2],
        "stop_reason": "stop",
        "top_logprobs": [[(3, -0.1), (8, -2.5)], [(9, -0.05), (4, -0.2)]],
    }
    body = wire.encode_sample_response([seq], prompt_alt_tokens=([[1, 2], [3, 3]], [[-1.5, -2.5], [-0.5, -0.5]]))
    response = deserialize_sample_response(body)
    (got,) = response.sequences
    assert [[t for t, _ in row] for row in got.topk_logprobs] == [[3, 8], [9, 4]]
    assert [[lp for _, lp in row] for row in got.topk_logprobs] == [
        pytest.approx([-0.1, -2.5]),
        pytest.approx([-0.05, -0.2]),
    ]
    alt = response.prompt_alt_tokens
    assert alt.tokens.dtype == "int64" and alt.tokens.to_torch().tolist() == [[1, 2], [3, 3]]
    assert alt.logprobs.to_torch().tolist() == [[-1.5, -2.5], [-0.5, -0.5]]
    assert wire.stop_disables_eos([]) and not wire.stop_disables_eos(None) and not wire.stop_disables_eos(["x"])
