"""Run by an older `tinker` SDK's own interpreter (tests/test_tinker_old_sdk.py): the calls a
training loop makes, against the server at argv[1], with the tiny model argv[2]. Prints one JSON
object of what came back; the test checks its meaning. Token ids only: no tokenizer, no torch."""

import json
import sys

import tinker
from tinker import types

url, model = sys.argv[1], sys.argv[2]
PROMPT, REPLY = [100, 200, 300], [400, 500, 600, 700]
tokens = PROMPT + REPLY
datum = types.Datum(
    model_input=types.ModelInput.from_ints(tokens[:-1]),
    loss_fn_inputs={"target_tokens": tokens[1:], "weights": [0.0] * (len(PROMPT) - 1) + [1.0] * len(REPLY)},
)
out = {"sdk": tinker.__version__}
service = tinker.ServiceClient(base_url=url, api_key="tml-old-sdk")
client = service.create_lora_training_client(base_model=model, rank=4)
client = client.result() if hasattr(client, "result") else client
forward = client.forward([datum], "cross_entropy").result()
out["forward_logprobs"] = forward.loss_fn_outputs[0]["logprobs"].tolist()
out["losses"] = []
for _ in range(4):
    fb = client.forward_backward([datum], "cross_entropy")
    step = client.optim_step(types.AdamParams(learning_rate=1e-2))
    out["losses"].append(fb.result().metrics["loss:sum"])
    step.result()
out["state_path"] = client.save_state("old-sdk").result().path
after = client.forward([datum], "cross_entropy").result()
out["trained_logprobs"] = after.loss_fn_outputs[0]["logprobs"].tolist()
sampler_path = client.save_weights_for_sampler("old-sdk-sampler").result().path
sampler = service.create_sampling_client(model_path=sampler_path)
sampler = sampler.result() if hasattr(sampler, "result") else sampler
sampled = sampler.sample(
    types.ModelInput.from_ints(PROMPT),
    num_samples=2,
    sampling_params=types.SamplingParams(max_tokens=4, temperature=1.0, seed=3),
).result()
out["samples"] = [{"tokens": list(s.tokens), "logprobs": list(s.logprobs)} for s in sampled.sequences]
out["prompt_logprobs"] = sampler.compute_logprobs(types.ModelInput.from_ints(tokens)).result()
restored = service.create_training_client_from_state(out["state_path"])
restored = restored.result() if hasattr(restored, "result") else restored
out["restored_logprobs"] = restored.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist()
run_id = out["state_path"].split("/")[2]
listed = service.create_rest_client().list_checkpoints(run_id).result()
out["checkpoints"] = sorted(c.checkpoint_id for c in listed.checkpoints)
print(json.dumps(out))
