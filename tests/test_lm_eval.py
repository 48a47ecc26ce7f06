"""lm-evaluation-harness against the server, offline, on the tiny model: lm-eval itself as a library
(`local-completions` with only a URL and a model name) over local task files, and `eztinker eval`
end to end. One server for the module; a handful of examples per task."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
import torch
from support import train
from transformers import AutoModelForCausalLM, AutoTokenizer

from eztinker import ServiceClient
from eztinker.launcher import ThreadedServer, build_service, offline_env
from eztinker.server.settings import ServerSettings

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is the `eval` extra: pip install 'eztinker[eval]'")
from lm_eval.tasks import TaskManager  # noqa: E402

QUESTIONS = [
    {"question": "What color is the sky on a clear day?", "choices": ["blue", "green", "red"], "answer": 0},
    {"question": "How many legs does a cat have?", "choices": ["two", "four", "six"], "answer": 1},
    {"question": "Which one is a fruit?", "choices": ["carrot", "potato", "apple"], "answer": 2},
]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-eval")
    settings = ServerSettings(data_dir=root / "data", device="cpu", model=[str(tiny_model_dir)], max_new_tokens=64)
    with ThreadedServer(build_service(settings)) as running:
        yield running


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory, gsm8k_dir) -> Path:
    """Two lm-eval tasks over local files: multiple choice (loglikelihood) and GSM8K (generation)."""
    folder = tmp_path_factory.mktemp("tasks")
    (folder / "mc.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (folder / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "mc.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")
    # lm-eval's own gsm8k task, its data read from the local files instead of the Hub.
    stock = Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml"
    (folder / "gsm8k_local.yaml").write_text(f"""include: {stock}
task: gsm8k_local
tag: []
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    train: {gsm8k_dir / "train.jsonl"}
    test: {gsm8k_dir / "test.jsonl"}
num_fewshot: 1
generation_kwargs:
  until: ["Question:", "\\n\\n"]
  do_sample: false
  temperature: 0.0
  max_gen_toks: 12
""")
    return folder


def run_lm_eval(server, tasks_dir: Path, task: str, model: str, limit: int):
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    # Only a URL and a model name: the tokenizer comes from the server (auto-detected).
    return lm_eval.simple_evaluate(
        model="local-completions",
        model_args={"base_url": server.url + "/v1/completions", "model": model},
        tasks=[task],
        limit=limit,
        task_manager=manager,
        log_samples=True,
    )


def continuation_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) by Hugging Face's model directly, split as lm-eval splits it."""
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return sum(float(logprobs[i - 1, whole[i]]) for i in range(len(context_ids), len(whole)))


def test_lm_eval_multiple_choice_scores_as_the_model_does(server, tasks_dir, tiny_model_dir):
    """A loglikelihood task runs to a score, and each choice's loglikelihood is the model's own."""
    results = run_lm_eval(server, tasks_dir, "tiny_mc", server.service.default_model, limit=len(QUESTIONS))
    acc = results["results"]["tiny_mc"]["acc,none"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    correct = []
    for sample in results["samples"]["tiny_mc"]:
        doc = sample["doc"]
        context = f"Question: {doc['question']}\nAnswer:"
        expected = [continuation_logprob(model, tokenizer, context, " " + c) for c in doc["choices"]]
        got = [resp[0][0] for resp in sample["resps"]]
        assert got == pytest.approx(expected, abs=2e-3), doc["question"]
        correct.append(max(range(len(expected)), key=expected.__getitem__) == doc["answer"])
    assert len(correct) == len(QUESTIONS) and acc == pytest.approx(sum(correct) / len(correct))


def test_lm_eval_generates_gsm8k_from_local_files(server, tasks_dir):
    """A generate_until task runs to a score; its replies are the server's greedy completions."""
    model = server.service.default_model
    results = run_lm_eval(server, tasks_dir, "gsm8k_local", model, limit=2)
    metrics = results["results"]["gsm8k_local"]
    assert 0.0 <= metrics["exact_match,strict-match"] <= 1.0 and "exact_match,flexible-extract" in metrics
    samples = [s for s in results["samples"]["gsm8k_local"] if s["filter"] == "strict-match"]  # one per filter
    assert len(samples) == 2
    prompt = samples[0]["arguments"][0][0]  # (context, generation kwargs) of its one request
    assert prompt.count("Question:") == 2  # one shot from train.jsonl, then the test question
    reply = openai.OpenAI(base_url=server.url + "/v1", api_key="none").completions.create(
        model=model, prompt=prompt, max_tokens=12, temperature=0, stop=["Question:", "\n\n"]
    )
    assert samples[0]["resps"][0][0] == reply.choices[0].text


def eztinker_eval(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "eztinker.cli", "eval", *args],
        capture_output=True,
        text=True,
        env=offline_env(),
        timeout=300,
    )


def test_eztinker_eval_end_to_end_records_a_checkpoint(server, tasks_dir, tmp_path):
    sdk = ServiceClient(server.url)
    run = sdk.create_training_run(lora_rank=2)
    train(run, 2)
    run.save_state("two").result(timeout=60)
    done = eztinker_eval(
        f"{run.run_id}/two",
        "--tasks",
        "tiny_mc",
        "--include-path",
        str(tasks_dir),
        "--limit",
        "3",
        "--server-url",
        server.url,
        "--output-dir",
        str(tmp_path / "out"),
    )
    assert done.returncode == 0, done.stderr
    assert "|tiny_mc|" in done.stdout.replace(" ", "") and "acc" in done.stdout
    written = list((tmp_path / "out").glob("lm_eval_*.json"))
    assert len(written) == 1
    results = json.loads(written[0].read_text())
    acc = results["results"]["tiny_mc"]["acc,none"]
    assert results["config"]["model_args"]["model"] == f"{run.run_id}/two"

    recorded = httpx.get(f"{server.url}/v1/runs/{run.run_id}/evaluations").json()
    assert len(recorded) == 1
    assert recorded[0]["checkpoint"] == "two" and recorded[0]["step"] == 2 and recorded[0]["tasks"] == ["tiny_mc"]
    assert math.isclose(recorded[0]["scores"]["tiny_mc"]["acc,none"], acc)
    assert recorded[0]["config"]["limit"] == 3 and recorded[0]["harness"].startswith("lm-eval 0.4")


def test_eztinker_eval_bad_input_is_one_line(server, tasks_dir):
    from click.testing import CliRunner

    from eztinker.cli import app

    model = server.service.default_model
    cases = [
        (["no-such-model", "--tasks", "tiny_mc"], "has no model 'no-such-model'"),
        ([model, "--tasks", "no_such_task", "--include-path", str(tasks_dir)], "no task 'no_such_task'"),
        ([model, "--tasks", "tiny_mc", "--include-path", str(tasks_dir / "missing")], "--include-path"),
        ([model, "--tasks", "tiny_mc", "--limit", "0"], "--limit"),
        ([model, "--tasks", ","], "--tasks"),
        ([model, "--tasks", "tiny_mc", "--server-url", "http://127.0.0.1:9"], "no EZTinker server at"),
    ]
    for args, message in cases:
        url = [] if "--server-url" in args else ["--server-url", server.url]
        done = CliRunner().invoke(app, ["eval", *args, *url])
        assert done.exit_code == 2, (args, done.output, done.exception)
        assert message in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.strip().startswith("error:") and done.stderr.strip().count("\n") == 0, done.stderr


def test_recipe_eval_tasks_run_lm_eval_at_every_evaluation(server, tasks_dir, gsm8k_dir, tmp_path):
    """rsft --eval-tasks: lm-eval's scores beside the task's own accuracy, before and after training,
    in the results, as JSON files and on the server (rl and dpo share the hook and the flags)."""
    from click.testing import CliRunner

    from eztinker.cli import app
    from eztinker.recipes.rejection_sft import Config, main

    config = Config(
        task="gsm8k",
        server_url=server.url,
        gsm8k_dir=gsm8k_dir,
        max_samples=2,
        num_candidates=1,
        epochs=1,
        max_tokens=4,
        eval_size=1,
        batch_size=2,
        micro_batch_size=2,
        learning_rate=1e-3,
        output_dir=tmp_path / "out",
        reward_fn=lambda text, problem: True,
        eval_tasks="tiny_mc",
        eval_include_path=tasks_dir,
        eval_limit=2,
    )
    results = main(config)
    epochs = results["epochs"]
    assert [e["epoch"] for e in epochs] == [0, 1]
    for entry in epochs:
        assert "test_accuracy" in entry and 0.0 <= entry["lm_eval"]["tiny_mc"]["acc,none"] <= 1.0
        assert entry["seconds"]["lm_eval"] > 0
    assert len(list((tmp_path / "out" / "lm_eval").glob("lm_eval_*.json"))) == 2
    recorded = httpx.get(f"{server.url}/v1/runs/{results['run_id']}/evaluations").json()
    run_step = httpx.get(f"{server.url}/v1/runs/{results['run_id']}").json()["step"]
    assert [(r["checkpoint"], r["step"]) for r in recorded] == [(None, 0), (None, run_step)] and run_step > 0
    for command in ("rl", "dpo"):
        assert "--eval-tasks" in CliRunner().invoke(app, [command, "--help"]).output


def test_eval_of_a_second_base_model_uses_its_own_tokenizer(make_server, tiny_model_dir, tasks_dir, tmp_path):
    """lm-eval's remote tokenizer is the default model's; another base model's comes as its files."""
    from eztinker.evaluation import evaluate
    from eztinker.tiny import make_tiny_llama

    llama_dir = make_tiny_llama(tmp_path / "tiny-llama")
    with make_server(model=[str(tiny_model_dir), str(llama_dir)]) as two:
        outcome = evaluate(two.url, str(llama_dir), ["tiny_mc"], include_path=tasks_dir, limit=1, log_samples=True)
    assert outcome.results["config"]["model_args"]["tokenizer_backend"] == "huggingface"
    sample = outcome.results["samples"]["tiny_mc"][0]
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    context = f"Question: {sample['doc']['question']}\nAnswer:"
    expected = [continuation_logprob(model, tokenizer, context, " " + c) for c in sample["doc"]["choices"]]
    assert [resp[0][0] for resp in sample["resps"]] == pytest.approx(expected, abs=2e-3)
    assert outcome.recorded is None  # a base model: nothing to record on


def test_two_results_written_within_one_second_are_both_kept(tmp_path):
    from eztinker.evaluation import EvalTarget, write_results

    target = EvalTarget(model="run_x", base_model="tiny")
    paths = [write_results(tmp_path, target, {"results": {"t": {"acc,none": n}}}) for n in range(3)]
    assert len(set(paths)) == 3
    assert [json.loads(p.read_text())["results"]["t"]["acc,none"] for p in paths] == [0, 1, 2]
