"""The Tinker SDK's stable_reinforce (with sampling clients that record stability info and
datums that carry provenance), gspo (with its sequence_ratio_mask) and [N, K] cross_entropy
against a real `eztinker server` process on the tiny Qwen2. Meaning is checked: the loss the
server reports equals its formula over the logprobs it returns and the sampler's recorded ones."""

from __future__ import annotations

import httpx
import pytest

tinker = pytest.importorskip("tinker", reason="the Tinker API needs the tinker package: pip install 'eztinker[tinker]'")
import torch  # noqa: E402
from tinker import types  # noqa: E402

from eztinker.launcher import ServerProcess, offline_env  # noqa: E402

PROMPT = [100, 200, 300, 400]
KEY = "tml-losses"


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("tinker-losses")
    with ServerProcess(
        model=str(tiny_model_dir),
        data_dir=root / "data",
        log_file=root / "server.log",
        extra_args=["--device", "cpu"],
        env=offline_env(),
        startup_timeout=120,
        poll_interval=0.05,
    ) as running:
        yield running


@pytest.fixture(scope="module")
def session(server, tiny_model_dir):
    """One SDK session, a training client, and a sampling client that records stability info."""
    import os

    os.environ["TINKER_TELEMETRY"] = "0"
    service = tinker.ServiceClient(base_url=server.url, api_key=KEY)
    trainer = service.create_lora_training_client(base_model=str(tiny_model_dir), rank=4, seed=1)
    trainer.forward_backward([ce_datum([5, 6, 7, 8], [9, 10])], "cross_entropy").result()
    trainer.optim_step(types.AdamParams(learning_rate=1e-2)).result()  # lora_B nonzero
    sampler = trainer.save_weights_and_get_sampling_client(record_stability_info=True)
    yield service, trainer, sampler
    service.close("success").result()


def ce_datum(prompt, reply, weights=None) -> types.Datum:
    tokens = prompt + reply
    weights = weights if weights is not None else [0.0] * (len(prompt) - 1) + [1.0] * len(reply)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights},
    )


def sample(sampler, n: int = 2, max_tokens: int = 6):
    params = types.SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=11)
    return sampler.sample(types.ModelInput.from_ints(PROMPT), num_samples=n, sampling_params=params).result()


def rl_datum(
    sequence, advantage: float, logprobs=None, provenance: bool = True, sequence_id: str | None = None, extra=None
) -> types.Datum:
    """As the cookbook's rl_loop builds one: prompt + sampled tokens, shifted, with provenance."""
    sampled = list(sequence.tokens)
    ob = len(PROMPT) - 1
    logprobs = list(sequence.logprobs) if logprobs is None else logprobs
    inputs = {
        "target_tokens": [0] * ob + sampled,
        "logprobs": [0.0] * ob + logprobs,
        "advantages": [0.0] * ob + [advantage] * len(sampled),
        **(extra or {}),
    }
    datum = types.Datum(model_input=types.ModelInput.from_ints(PROMPT + sampled[:-1]), loss_fn_inputs=inputs)
    if not provenance:
        return datum
    sid = sequence_id or sequence.sequence_id
    return datum.with_provenance(
        model_input=[
            types.PromptProvenanceSpan(sequence_id=sid, length=len(PROMPT)),
            types.SampledProvenanceSpan(sequence_id=sid, length=len(sampled) - 1),
        ],
        loss_fn_inputs=[
            types.PromptProvenanceSpan(sequence_id=sid, offset=1, length=len(PROMPT) - 1),
            types.SampledProvenanceSpan(sequence_id=sid, length=len(sampled)),
        ],
    )


def returned_logprobs(output) -> list[torch.Tensor]:
    return [out["logprobs"].to_torch().double() for out in output.loss_fn_outputs]


def test_capabilities_list_the_losses(server):
    caps = httpx.get(f"{server.url}/api/v1/get_server_capabilities", headers={"X-API-Key": KEY}).json()
    assert {"stable_reinforce", "gspo", "cross_entropy"} <= set(caps["supported_loss_fns"])
    info = httpx.get(f"{server.url}/v1/info", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert "stable_reinforce" in info["loss_fns"]


def test_stable_reinforce_uses_the_recorded_sampler_logprobs(session):
    _, trainer, sampler = session
    sequences = sample(sampler).sequences
    assert len({s.sequence_id for s in sequences}) == 2
    advantages = [1.0, -1.0]
    # The client sends wrong sampler logprobs: the server's record of the sampled tokens wins.
    data = [rl_datum(s, a, logprobs=[-30.0] * len(s.tokens)) for s, a in zip(sequences, advantages)]
    out = trainer.forward_backward(data, "stable_reinforce").result()
    ob = len(PROMPT) - 1
    loss = 0.0
    for s, a, lp in zip(sequences, advantages, returned_logprobs(out)):
        q = torch.tensor(s.logprobs, dtype=torch.float64)
        p = lp[ob:]
        # Sampler and trainer agree on the sampled tokens (same weights on both sides).
        assert p.tolist() == pytest.approx(q.tolist(), abs=2e-4)
        loss += float(-(torch.exp(p - q).clamp(max=2.0) * p * a).sum())
    assert out.metrics["loss:sum"] == pytest.approx(loss, rel=1e-4, abs=1e-4)


def test_stable_reinforce_refuses_data_whose_provenance_does_not_hold(session, server, tiny_model_dir):
    service, trainer, sampler = session
    sequence = sample(sampler, n=1).sequences[0]

    def refusal(data) -> str:
        with pytest.raises(tinker.RequestFailedError) as err:
            trainer.forward_backward(data, "stable_reinforce").result()
        return str(err.value)

    assert "data[0] has no provenance" in refusal([rl_datum(sequence, 1.0, provenance=False)])
    forged = rl_datum(sequence, 1.0)
    tokens = forged.model_input.to_ints()
    tokens[-1] = (tokens[-1] + 1) % 1000
    forged = types.Datum(
        model_input=types.ModelInput.from_ints(tokens),
        loss_fn_inputs=forged.loss_fn_inputs,
        model_input_spans=forged.model_input_spans,
        loss_fn_input_spans=forged.loss_fn_input_spans,
    )
    assert "data[0].model_input_spans[1]" in refusal([forged])
    assert "is not a recorded sequence" in refusal([rl_datum(sequence, 1.0, sequence_id="job_nope:0")])
    # A sampler that does not record: its sequences cannot be trained on with stable_reinforce.
    plain = trainer.save_weights_and_get_sampling_client()
    assert "is not a recorded sequence" in refusal([rl_datum(sample(plain, n=1).sequences[0], 1.0)])
    # Another session cannot name this session's sequences.
    other = tinker.ServiceClient(base_url=server.url, api_key=KEY)
    try:
        theirs = other.create_lora_training_client(base_model=str(tiny_model_dir), rank=4)
        with pytest.raises(tinker.RequestFailedError, match="is not a recorded sequence of session"):
            theirs.forward_backward([rl_datum(sequence, 1.0)], "stable_reinforce").result()
    finally:
        other.close("success").result()
    # The same datum with its true provenance trains.
    assert trainer.forward_backward([rl_datum(sequence, 1.0)], "stable_reinforce").result().metrics


def test_gspo_takes_its_sequence_ratio_mask(session):
    _, trainer, sampler = session
    sequences = sample(sampler).sequences
    ob = len(PROMPT) - 1
    data = [
        rl_datum(s, a, provenance=False, extra={"sequence_ratio_mask": [0.0] * ob + [1.0] * len(s.tokens)})
        for s, a in zip(sequences, [2.0, -1.0])
    ]
    out = trainer.forward_backward(data, "gspo").result()
    want = 0.0
    for s, a, lp in zip(sequences, [2.0, -1.0], returned_logprobs(out)):
        ratio = float(torch.exp((lp[ob:] - torch.tensor(s.logprobs, dtype=torch.float64)).mean()))
        want += -min(ratio * a, min(max(ratio, 0.8), 1.2) * a) * len(s.tokens)
    assert out.metrics["loss:sum"] == pytest.approx(want, rel=1e-4)
    with pytest.raises(tinker.RequestFailedError, match="sequence_ratio_mask is required by gspo"):
        trainer.forward_backward([rl_datum(sequences[0], 1.0, provenance=False)], "gspo").result()


def test_cross_entropy_over_k_targets_is_the_sum_of_its_one_target_terms(session):
    _, trainer, _ = session
    tokens = [11, 12, 13, 14, 15, 16]
    n, k = len(tokens), 4
    gen = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 5000, (n, k), generator=gen)
    weights = torch.rand(n, k, generator=gen)
    weights[:2] = 0.0
    multi = types.Datum(
        model_input=types.ModelInput.from_ints(tokens),
        loss_fn_inputs={
            "target_tokens": types.TensorData.from_torch(targets),
            "weights": types.TensorData.from_torch(weights),
        },
    )
    # As a torch tensor, the SDK sends 2-D weights and targets sparse (CSR).
    sparse = types.Datum(
        model_input=types.ModelInput.from_ints(tokens), loss_fn_inputs={"target_tokens": targets, "weights": weights}
    )
    singles = [
        types.Datum(
            model_input=types.ModelInput.from_ints(tokens),
            loss_fn_inputs={"target_tokens": targets[:, j], "weights": weights[:, j]},
        )
        for j in range(k)
    ]
    out = trainer.forward([multi, sparse], "cross_entropy").result()
    one = trainer.forward(singles, "cross_entropy").result()
    assert out.metrics["loss:sum"] == pytest.approx(2 * one.metrics["loss:sum"], rel=1e-5)
    lp_multi = out.loss_fn_outputs[0]["logprobs"].to_torch()
    assert tuple(lp_multi.shape) == (n, k)
    for j in range(k):
        assert lp_multi[:, j].tolist() == pytest.approx(one.loss_fn_outputs[j]["logprobs"].tolist(), abs=1e-5)
    assert torch.allclose(out.loss_fn_outputs[1]["logprobs"].to_torch(), lp_multi, atol=1e-6)


def test_recorded_sequences_last_a_day_after_their_last_use():
    from eztinker.server.tinker.provenance import ProvenanceError, RecordedSequence, StabilityRecords

    now = [0.0]
    records = StabilityRecords(clock=lambda: now[0], max_tokens=20)
    mine = RecordedSequence("sess_a", (1, 2), (3, 4), (-0.5, -0.25))
    records.record("job_1:0", mine)
    now[0] = 20 * 3600
    assert records.use("job_1:0", "sess_a", ()) == mine  # used at 20 h: good until 44 h
    with pytest.raises(ProvenanceError, match="not a recorded sequence of session sess_b"):
        records.use("job_1:0", "sess_b", ())  # another session's
    now[0] = 43 * 3600
    assert records.use("job_1:0", "sess_a", ()) == mine
    now[0] = 43 * 3600 + 24 * 3600 + 1  # a day after its last use: gone
    with pytest.raises(ProvenanceError):
        records.use("job_1:0", "sess_a", ())
    assert len(records) == 0
    # Beyond max_tokens, the least recently used go first.
    for i in range(6):
        records.record(f"job_2:{i}", mine)  # 4 tokens each
    assert len(records) == 5 and records.use("job_2:5", "sess_a", ()) == mine
    with pytest.raises(ProvenanceError):
        records.use("job_2:0", "sess_a", ())
