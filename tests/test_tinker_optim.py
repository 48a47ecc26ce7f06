"""What the Tinker SDK (0.38) can send about optimizers and the LoRA's shape, through the real SDK
against the real app: every field is honoured (AdamParams' six, `train_unembed`) or refused with a
failed future of category "user" that names it (Dimuon, which Tinker does not publish), never ignored."""

from __future__ import annotations

import pytest

tinker = pytest.importorskip("tinker", reason="the Tinker API needs the tinker package: pip install 'eztinker[tinker]'")
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tinker import types  # noqa: E402

from eztinker import ServiceClient as EZServiceClient  # noqa: E402
from eztinker.engine.engine import ADAPTER_WEIGHTS  # noqa: E402
from eztinker.launcher import ThreadedServer, build_service  # noqa: E402
from eztinker.server.settings import ServerSettings  # noqa: E402
from eztinker.types import AdamParams, Datum, LoraConfig, LossFnInputs, ModelInput  # noqa: E402

KEY = "tml-optim"
TOKENS = [100, 200, 300, 400, 500, 600, 700]
EVERY_FIELD = dict(learning_rate=0.05, beta1=0.5, beta2=0.6, eps=0.3, weight_decay=0.5, grad_clip_norm=0.5)


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    settings = ServerSettings(
        data_dir=tmp_path_factory.mktemp("optim") / "data", device="cpu", model=[str(tiny_model_dir)]
    )
    with ThreadedServer(build_service(settings)) as running:
        yield running


@pytest.fixture()
def service(server, monkeypatch):
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    client = tinker.ServiceClient(base_url=server.url, api_key=KEY)
    yield client
    client.close("success").result()


def sdk_datum() -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(TOKENS[:-1]),
        loss_fn_inputs={"target_tokens": TOKENS[1:], "weights": [1.0] * (len(TOKENS) - 1)},
    )


def our_datum() -> Datum:
    return Datum(
        model_input=ModelInput(tokens=TOKENS[:-1]),
        loss_fn_inputs=LossFnInputs(target_tokens=TOKENS[1:], weights=[1.0] * (len(TOKENS) - 1)),
    )


def failure(future) -> str:
    """The message of a future that must fail as the user's fault."""
    with pytest.raises(tinker.RequestFailedError) as info:
        future.result(timeout=60)
    assert info.value.category == types.RequestErrorCategory.User, info.value.category
    return str(info.value)


def steps_of(server, model_id: str) -> int:
    with EZServiceClient(server.url, api_key=KEY) as rest:
        return rest.training_client(model_id).info().step


def adapter_file(server, model_id: str, name: str) -> dict[str, torch.Tensor]:
    return load_file(server.service.data_dir / "checkpoints" / model_id / name / ADAPTER_WEIGHTS)


def saved_adapter(server, client, name: str) -> dict[str, torch.Tensor]:
    client.save_state(name).result(timeout=60)
    return adapter_file(server, client.model_id, name)


def replica(engine, adam: AdamParams, steps: int = 2) -> list[torch.Tensor]:
    """What the SDK's run should hold: the same LoRA (Tinker's alpha 32, seed 0, head included), data
    and steps, by the engine directly."""
    engine.create_run("replica", LoraConfig(rank=4, alpha=32.0, train_unembed=True), seed=0)
    for _ in range(steps):
        engine.forward_backward("replica", [our_datum()], all_logprobs=True)
        engine.optim_step("replica", adam)
    weights = [p.detach().clone() for p in engine._runs["replica"].params]
    engine.delete_run("replica")
    return weights


def assert_same_weights(saved: dict[str, torch.Tensor], weights: list[torch.Tensor]) -> None:
    assert len(saved) == len(weights)
    # The adapter file lists tensors by name; the run's parameters are in module order. Match by shape
    # and value: each saved tensor equals exactly one parameter.
    remaining = list(weights)
    for tensor in saved.values():
        match = next(
            (
                i
                for i, w in enumerate(remaining)
                if w.shape == tensor.shape and torch.allclose(w, tensor, rtol=1e-4, atol=1e-6)
            ),
            None,
        )
        assert match is not None, "a saved tensor matches no parameter of the replica"
        remaining.pop(match)


def train(client, adam: types.AdamParams, steps: int = 2) -> None:
    for _ in range(steps):
        client.forward_backward([sdk_datum()], "cross_entropy").result(timeout=60)
        client.optim_step(adam).result(timeout=60)


# ----------------------------------------------------------------------------------- AdamW
def test_every_adam_field_and_tinkers_defaults_reach_the_step(server, service, tiny_model_dir, engine):
    """Two runs through the SDK: one with every AdamParams field set, one with the SDK's defaults.
    Each holds exactly what the engine computes with those hyperparameters (and Tinker's defaults
    are not REST's: beta2 0.95, eps 1e-12, no clipping)."""
    every = service.create_lora_training_client(base_model=str(tiny_model_dir), rank=4).result()
    train(every, types.AdamParams(**EVERY_FIELD))
    assert_same_weights(saved_adapter(server, every, "every-field"), replica(engine, AdamParams(**EVERY_FIELD)))

    defaults = service.create_lora_training_client(base_model=str(tiny_model_dir), rank=4).result()
    train(defaults, types.AdamParams(learning_rate=0.05))
    want = replica(engine, AdamParams.tinker({"learning_rate": 0.05}))
    assert_same_weights(saved_adapter(server, defaults, "sdk-defaults"), want)
    rest_defaults = replica(engine, AdamParams(learning_rate=0.05))
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(want, rest_defaults))
    info = defaults.get_info()
    assert isinstance(info.optimizer_config, types.AdamOptimizerConfig)


def test_bad_adam_fields_are_refused_naming_them(server, service, tiny_model_dir):
    client = service.create_lora_training_client(base_model=str(tiny_model_dir), rank=4).result()
    client.forward_backward([sdk_datum()], "cross_entropy").result(timeout=60)
    assert "adam_params.beta1" in failure(client.optim_step(types.AdamParams(learning_rate=0.01, beta1=1.5)))
    assert "adam_params.grad_clip_norm" in failure(client.optim_step(types.AdamParams(grad_clip_norm=-1.0)))
    assert steps_of(server, client.model_id) == 0


# ----------------------------------------------------------------------------------- Dimuon
def test_dimuon_is_refused_wherever_it_can_be_sent(server, service, tiny_model_dir):
    message = failure(
        service.create_lora_training_client(
            base_model=str(tiny_model_dir), rank=4, optimizer=types.DimuonOptimizerConfig()
        )
    )
    assert "optimizer_config" in message and "Dimuon" in message

    client = service.create_lora_training_client(base_model=str(tiny_model_dir), rank=4).result()
    client.forward_backward([sdk_datum()], "cross_entropy").result(timeout=60)
    message = failure(client.optim_step(types.DimuonParams(learning_rate=0.05)))
    assert "optimizer_params" in message and "Dimuon" in message
    assert steps_of(server, client.model_id) == 0  # no Adam step in its place
    client.optim_step(types.AdamParams(learning_rate=0.01)).result(timeout=60)
    assert steps_of(server, client.model_id) == 1

    path = client.save_state("for-dimuon").result(timeout=60).path
    message = failure(service.create_training_client_from_state(path, optimizer=types.DimuonOptimizerConfig()))
    assert "optimizer_config" in message and "Dimuon" in message


# ----------------------------------------------------------------------------- train_unembed
def test_train_unembed_is_honoured_and_reported(server, service, tiny_model_dir):
    """The SDK's default trains a LoRA on the output head too; weights_info says which parts a
    checkpoint trains, and the sampler's logprobs are the trainer's, the head's LoRA included."""
    rest = service.create_rest_client()
    for kwargs, parts in (
        ({}, (True, True, True)),
        ({"train_unembed": False}, (True, True, False)),
        ({"train_attn": False, "train_mlp": False}, (False, False, True)),
    ):
        client = service.create_lora_training_client(base_model=str(tiny_model_dir), rank=4, **kwargs).result()
        losses = []
        for _ in range(3):
            output = client.forward_backward([sdk_datum()], "cross_entropy").result(timeout=60)
            losses.append(output.metrics["loss:sum"])
            client.optim_step(types.AdamParams(learning_rate=0.05)).result(timeout=60)
        assert losses[-1] < losses[0]
        path = client.save_weights_for_sampler("head").result(timeout=60).path
        info = rest.get_weights_info_by_tinker_path(path).result(timeout=60)
        assert (info.train_attn, info.train_mlp, info.train_unembed) == parts
        saved = adapter_file(server, client.model_id, "sampler_weights.head")
        assert any("lm_head" in k for k in saved) == parts[2]
        if parts == (True, True, True):
            sampler = service.create_sampling_client(model_path=path)
            prompt = types.ModelInput.from_ints(TOKENS[:3])
            result = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=4, seed=1)).result(timeout=60)
            sequence = result.sequences[0]
            tokens = TOKENS[:3] + list(sequence.tokens)
            forward = client.forward(
                [
                    types.Datum(
                        model_input=types.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
                    )
                ],
                "cross_entropy",
            ).result(timeout=60)
            trained = forward.loss_fn_outputs[0]["logprobs"].tolist()[2:]
            assert list(sequence.logprobs) == pytest.approx(trained, abs=1e-4)


# ------------------------------------------------------------------- the REST and OpenAI doors
def test_rest_run_with_head_lora_serves_its_checkpoint_over_openai(server, tiny_model_dir):
    """REST's LoraConfig offers train_unembed; the OpenAI API serving the checkpoint gives plain peft's
    greedy tokens and logprobs for that adapter (the head's LoRA included)."""
    openai = pytest.importorskip("openai")
    import peft
    from transformers import AutoModelForCausalLM

    with EZServiceClient(server.url, api_key=KEY) as rest:
        run = rest.create_training_run(lora_rank=4, train_unembed=True)
        assert run.info().lora.train_unembed
        for _ in range(3):
            run.forward_backward([our_datum()]).result(timeout=60)
            run.optim_step(AdamParams(learning_rate=0.05)).result(timeout=60)
        run.save_state("served").result(timeout=60)
    directory = server.service.data_dir / "checkpoints" / run.run_id / "served"
    assert any("lm_head.lora_B" in k for k in load_file(directory / ADAPTER_WEIGHTS))

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY)
    out = client.completions.create(
        model=f"{run.run_id}/served", prompt=TOKENS[:3], max_tokens=4, temperature=0, logprobs=0
    )
    served = out.choices[0].logprobs.token_logprobs

    model = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), directory
    ).eval()
    tokens, want = list(TOKENS[:3]), []
    with torch.no_grad():
        for _ in range(4):
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([tokens])).logits[0, -1].float(), -1)
            tokens.append(int(logprobs.argmax()))
            want.append(float(logprobs.max()))
    assert served == pytest.approx(want, abs=1e-4)
