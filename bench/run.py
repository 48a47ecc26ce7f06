"""EZTinker vs the straightforward way, side by side in one process, on the same model.

    python bench/run.py [--model tiny|smollm2|qwen2-0.5b|both] [--quick]

qwen2-0.5b is the flagship's architecture (Qwen2-0.5B-Instruct) with random weights built from
../shared/models/qwen2-0.5b-instruct-config (no download): its speed, not its answers, is the point.

Each comparison runs both sides on the same weights, dtype (float32), thread count and inputs,
interleaved, and reports the ratio of their throughputs. Results go to bench/results/<model>.json
and the plot to docs/performance.png; docs/performance.md explains them.

The naive baselines are what a user without EZTinker would write with transformers + peft:
  * sampling: one `model.generate` call per candidate (do_sample, same temperature/top_p, the
    model's stop ids, no repetition penalty);
  * training: one example per forward/backward, padded to the batch's longest, full logits and
    plain cross-entropy;
  * end to end: generate per candidate, verify, then train one example per step.
The slowest naive loops are timed on a subset of their identical items (candidates, examples) and
scaled to the full count; the JSON records how many items were timed.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
from transformers import GenerationConfig  # noqa: E402

from eztinker.chat import datum_from_messages, render_prompt  # noqa: E402
from eztinker.engine import Engine, SampleSpec, load_base_model  # noqa: E402
from eztinker.engine.sampler import left_pad  # noqa: E402
from eztinker.launcher import ThreadedServer, build_service  # noqa: E402
from eztinker.server.settings import ServerSettings  # noqa: E402
from eztinker.tasks import get_task  # noqa: E402
from eztinker.types import AdamParams, LoraConfig, SamplingParams  # noqa: E402

RESULTS_DIR = ROOT / "bench" / "results"
PLOT = ROOT / "docs" / "performance.png"
LORA = LoraConfig(rank=1, alpha=16.0)  # the service's default adapter
TEMPERATURE = 0.8  # the rejection-SFT recipe's default
GOALS = {"sampling": 8.0, "sampling_vs_batched_generate": 0.9, "multi_run": 3.0, "training": 2.0, "end_to_end": 5.0}


# ------------------------------------------------------------------------------ plumbing
def log(message: str) -> None:
    print(message, flush=True)


class Timer:
    def __enter__(self):
        gc.collect()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def machine() -> dict:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        flags = fields.get("Flags", "").split()
    except (OSError, subprocess.CalledProcessError):
        fields, flags = {}, []
    import peft
    import transformers

    return {
        "cpu": fields.get("Model name", platform.processor()),
        "cpus": os.cpu_count(),
        "cores_per_socket": fields.get("Core(s) per socket"),
        "simd": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags],
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg(),
    }


def matmul_peak() -> float:
    """Measured fp32 matmul throughput (FLOP/s): the best of a few large torch.mm calls."""
    best = 0.0
    for n in (2048, 4096):
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        for _ in range(3):
            start = time.perf_counter()
            a @ b
            best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


def neutral_generation_config(base, max_new_tokens: int, temperature: float) -> GenerationConfig:
    """Exactly our sampling parameters: no top-k, no repetition penalty, the model's stop ids."""
    return GenerationConfig(
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_p=1.0,
        top_k=0,
        repetition_penalty=1.0,
        max_new_tokens=max_new_tokens,
        eos_token_id=sorted(base.stop_token_ids),
        pad_token_id=base.pad_token_id,
        bos_token_id=None,
    )


def load(model: str, cache_dir: Path, tiny_dir: Path):
    if model == "qwen2-0.5b":
        base = random_qwen2()
    else:
        base = load_base_model(str(tiny_dir) if model == "tiny" else "smollm2-135m", cache_dir=cache_dir, device="cpu")
    # Our explicit sampling parameters only: never the checkpoint's defaults (Qwen2: top_k 20, ...).
    base.model.generation_config = neutral_generation_config(base, 16, 1.0)
    return base


def random_qwen2():
    """Qwen2-0.5B-Instruct's architecture and tokenizer with seeded random weights, float32 on the
    CPU, built in memory (each call the same weights: the bare baseline is a second copy)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from eztinker.engine.models import BaseModel, _pad_token_id, _stop_token_ids
    from eztinker.tiny import qwen2_config_dir

    folder = qwen2_config_dir()
    raw = json.loads((folder / "config.json").read_text())
    raw.pop("torch_dtype", None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**raw), dtype=torch.float32)
    model.eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return BaseModel(
        name="qwen2-0.5b",
        model=model,
        tokenizer=tokenizer,
        stop_token_ids=_stop_token_ids(model, tokenizer),
        pad_token_id=_pad_token_id(tokenizer),
        source=str(folder),
    )


def decode_flops_per_token(model) -> float:
    """Matmul FLOPs of one decoded token: every linear layer and the output head once (2 per weight);
    attention over the cache is left out (small at these lengths)."""
    return 2.0 * sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def tiny_model_dir(model: str) -> Path:
    """A fresh folder; for the tiny model, holding the tiny random Qwen2 of the tests."""
    folder = Path(tempfile.mkdtemp(prefix="eztinker-bench-tiny-"))
    if model == "tiny":
        from eztinker.tiny import make_tiny_model

        make_tiny_model(folder)
    return folder


def side_bench_arguments(description: str) -> argparse.ArgumentParser:
    """The options every side benchmark (bench/*.py beside this file) shares."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--repeats", type=int, default=2, help="Rounds per side; the best counts.")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=ROOT / "data" / "cache",
        help="where the embedded SmolLM2 is converted once (as the server's data/cache)",
    )
    return parser


def alternate_in_children(
    script: str, option: str, variants: Sequence[str], args: argparse.Namespace, calls: Sequence[str]
):
    """Side by side where a variant needs a process of its own: `script --<option> VARIANT` (with
    --model, --cache-dir and --calls from `args`) runs once per variant a round, the variants
    alternating, `args.repeats` rounds. A child prints its result as JSON on its last line, with
    the medians of its steady calls under "median_seconds". Returns the rows (round, variant,
    result) and the best (smallest) median per variant and call."""
    rows = []
    for round_ in range(args.repeats):
        for variant in variants:
            out = subprocess.run(
                [
                    sys.executable,
                    script,
                    f"--{option}",
                    variant,
                    "--model",
                    args.model,
                    "--cache-dir",
                    str(args.cache_dir),
                    "--calls",
                    str(args.calls),
                ],
                capture_output=True,
                text=True,
            )
            if out.returncode:
                sys.exit(f"{variant} failed:\n{out.stderr[-3000:]}")
            result = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append({"round": round_, option: variant, **result})
            log(
                f"  round {round_} {variant:15s} "
                + "  ".join(f"{k} {v:.3f} s" for k, v in result["median_seconds"].items())
            )
    best = {
        variant: {name: min(r["median_seconds"][name] for r in rows if r[option] == variant) for name in calls}
        for variant in variants
    }
    return rows, best


def generated_length(row: list[int], stop_ids: frozenset[int]) -> int:
    """Tokens a batched `generate` row really produced: up to and including its first stop id."""
    for i, token in enumerate(row):
        if token in stop_ids:
            return i + 1
    return len(row)


def spread(n_items: int, k: int) -> list[int]:
    """k indices spread evenly over n_items."""
    k = min(k, n_items)
    return [round(i * n_items / k) for i in range(k)]


# ----------------------------------------------------------------------------- workload
class Workload:
    def __init__(self, base, quick: bool):
        self.base, self.quick = base, quick
        self.task = get_task("gsm8k")
        gsm8k = ROOT.parent / "shared" / "data" / "gsm8k"
        data_dir = gsm8k if gsm8k.is_dir() else None  # else $EZTINKER_GSM8K_DIR / the Hub
        self.problems = self.task.load_problems("train", limit=64, seed=0, data_dir=data_dir)
        tok = base.tokenizer
        self.prompts = [render_prompt(tok, self.task.messages_for(p)) for p in self.problems]
        # Supervised examples: question -> reference solution; prompt weight 0.
        self.examples = [
            datum_from_messages(tok, [*self.task.messages_for(p), {"role": "assistant", "content": p.solution}])
            for p in self.problems
        ]


# ---------------------------------------------------------------------------- sampling
def bench_sampling(engine: Engine, bare, work: Workload, cfg: dict, peak: float) -> dict:
    P, N, T = cfg["prompts"], cfg["candidates"], cfg["new_tokens"]
    prompts = work.prompts[:P]
    params = SamplingParams(max_tokens=T, temperature=TEMPERATURE, seed=0)
    gen = neutral_generation_config(work.base, T, TEMPERATURE)
    peft_model = engine.adapters.peft
    stop = work.base.stop_token_ids
    subset = spread(P * N, cfg["naive_candidates"])

    def ours(adapter):
        with Timer() as t:
            out = engine.sample([SampleSpec(adapter, prompts, N, params)])[0]
        return sum(len(c.tokens) for per in out for c in per), t.seconds

    def naive():  # one generate call per candidate, the run's adapter active
        engine.adapters.activate("bench")
        tokens = 0
        with Timer() as t, torch.no_grad():
            for i in subset:
                prompt = prompts[i // N]
                torch.manual_seed(i)
                out = peft_model.generate(
                    input_ids=torch.tensor([prompt]),
                    attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                    generation_config=gen,
                )
                tokens += out.shape[1] - len(prompt)
        return tokens, t.seconds

    def batched_generate():  # the bare base model, every prompt x candidate in one generate call
        ids, mask = left_pad(prompts, work.base.pad_token_id)
        torch.manual_seed(0)
        many = GenerationConfig(**{**gen.to_diff_dict(), "num_return_sequences": N})
        with Timer() as t, torch.no_grad():
            out = bare.model.generate(input_ids=ids, attention_mask=mask, generation_config=many)
        rows = out[:, ids.shape[1] :].tolist()
        return sum(generated_length(r, stop) for r in rows), t.seconds

    # Warm-up (first-call costs: lazy initialisation, first-touch of buffers), untimed.
    engine.sample([SampleSpec("bench", prompts[:1], 2, params.model_copy(update={"max_tokens": 4}))])
    with torch.no_grad():
        peft_model.generate(
            input_ids=torch.tensor([prompts[0]]), generation_config=neutral_generation_config(work.base, 4, TEMPERATURE)
        )
        bare.model.generate(
            input_ids=torch.tensor([prompts[0]]), generation_config=neutral_generation_config(work.base, 4, TEMPERATURE)
        )
    sides = {
        "eztinker": lambda: ours("bench"),
        "eztinker_bare_base": lambda: ours(None),
        "naive_generate_per_candidate": naive,
        "batched_generate_bare_base": batched_generate,
    }
    results = interleave(sides, cfg["repeats"])
    rate = {k: v["per_s"] for k, v in results.items()}
    per_token = decode_flops_per_token(work.base.model)
    return {
        "workload": f"{P} prompts x {N} candidates x {T} new tokens, temperature {TEMPERATURE}, top_p 1",
        "decode_flops_per_token": per_token,
        "fraction_of_matmul_peak": {k: r * per_token / peak for k, r in rate.items()},
        "naive_candidates_timed": len(subset),
        "unit": "tokens/s",
        "sides": results,
        "ratios": {
            "sampling": rate["eztinker"] / rate["naive_generate_per_candidate"],
            "sampling_vs_batched_generate": rate["eztinker"] / rate["batched_generate_bare_base"],
            "adapter_cost": 1 - rate["eztinker"] / rate["eztinker_bare_base"],
        },
    }


def interleave(sides: dict, repeats: int) -> dict:
    """Run every side once per round, rounds back to back; keep each side's best rate."""
    runs: dict[str, list[tuple[int, float, float]]] = {name: [] for name in sides}
    for r in range(repeats):
        for name, fn in sides.items():
            count, seconds = fn()
            load = os.getloadavg()[0]  # 1-minute load average: > threads means other work competed
            runs[name].append((count, seconds, load))
            log(
                f"    {name:34s} round {r + 1}: {count:6d} in {seconds:7.2f} s = {count / seconds:9.1f}/s  "
                f"(load {load:.1f})"
            )
    return {
        name: {
            "count": [c for c, _, _ in rs],
            "seconds": [round(s, 4) for _, s, _ in rs],
            "load_average_after": [round(x, 2) for _, _, x in rs],
            # Best round: on a shared machine, interference only ever slows a round down.
            "per_s": max(c / s for c, s, _ in rs),
        }
        for name, rs in runs.items()
    }


# ----------------------------------------------------------------------- multi-run sampling
def bench_multi_run(engine: Engine, work: Workload, cfg: dict) -> dict:
    R, P, N, T = cfg["runs"], cfg["run_prompts"], cfg["run_candidates"], cfg["new_tokens"]
    specs = []
    for r in range(R):
        run_id = f"multi{r}"
        if not engine.has_run(run_id):
            engine.create_run(run_id, LORA, seed=r)
            # One small step so that every adapter is different (lora_B starts at zero).
            engine.forward_backward(run_id, [work.examples[40 + r]])
            engine.optim_step(run_id, AdamParams(learning_rate=1e-3))
        specs.append(
            SampleSpec(
                run_id,
                work.prompts[r * P : (r + 1) * P],
                N,
                SamplingParams(max_tokens=T, temperature=TEMPERATURE, seed=r),
            )
        )
    outputs = {}

    def together():
        with Timer() as t:
            out = engine.sample(specs)
        outputs["together"] = [c for spec in out for per in spec for c in per]
        return sum(len(c.tokens) for spec in out for per in spec for c in per), t.seconds

    def run_by_run():
        with Timer() as t:
            out = [engine.sample([spec])[0] for spec in specs]
        outputs["alone"] = [c for spec in out for per in spec for c in per]
        return sum(len(c.tokens) for spec in out for per in spec for c in per), t.seconds

    engine.sample(
        [SampleSpec(s.adapter, s.prompts[:1], 1, s.params.model_copy(update={"max_tokens": 2})) for s in specs]
    )  # warm-up
    results = interleave({"eztinker_one_batch": together, "eztinker_run_by_run": run_by_run}, cfg["repeats"])
    return {
        "workload": f"{R} runs (adapters) x {P} prompts x {N} candidates x {T} new tokens",
        "unit": "tokens/s",
        "sides": results,
        **agreement(outputs["together"], outputs["alone"]),
        "ratios": {"multi_run": results["eztinker_one_batch"]["per_s"] / results["eztinker_run_by_run"]["per_s"]},
    }


def agreement(ours: list, theirs: list) -> dict:
    """How far two samplings of the same candidates agree. Batched and unbatched float sums differ
    in the last bits (~1e-5 in a logprob), which over thousands of draws can flip a near-tie; after
    a flip the candidate's tokens differ. Logprobs are compared up to the first differing token."""
    same, worst = 0, 0.0
    for a, b in zip(ours, theirs):
        same += a.tokens == b.tokens
        n = 0
        while n < min(len(a.tokens), len(b.tokens)) and a.tokens[n] == b.tokens[n]:
            n += 1
        worst = max([worst, *(abs(x - y) for x, y in zip(a.logprobs[:n], b.logprobs[:n]))])
    return {"identical_candidates": f"{same} of {len(ours)}", "max_logprob_difference": worst}


# ----------------------------------------------------------------------------- training
def model_flops(model, examples, selected_positions: int) -> float:
    """Forward + backward FLOPs of the useful work (no padding, no base-weight gradients):
    linear layers 2*params*tokens forward and again backward (input gradients only), attention
    (causal) 2*2*d*T^2/2 per layer forward and twice that backward, the output projection at the
    selected positions forward and backward. The LoRA matrices are negligible at rank 1."""
    config = model.config
    head = model.get_output_embeddings()
    linear = sum(
        m.weight.numel()
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and m is not head and "lora_" not in name
    )
    d_attn = config.num_attention_heads * getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    tokens = sum(len(d.model_input.tokens) for d in examples)
    squares = sum(len(d.model_input.tokens) ** 2 for d in examples)
    forward = (
        2 * linear * tokens
        + 2 * d_attn * squares * config.num_hidden_layers
        + 2 * head.weight.numel() * selected_positions
    )
    backward = (
        2 * linear * tokens
        + 4 * d_attn * squares * config.num_hidden_layers
        + 2 * head.weight.numel() * selected_positions
    )
    return forward + backward


def naive_example_loss(model, datum, width: int, pad: int) -> torch.Tensor:
    """The textbook step: full logits for every position, cross-entropy where the weight is nonzero."""
    tokens = datum.model_input.tokens
    ids = torch.full((1, width), pad, dtype=torch.long)
    ids[0, : len(tokens)] = torch.tensor(tokens)
    mask = torch.zeros((1, width), dtype=torch.long)
    mask[0, : len(tokens)] = 1
    labels = torch.full((1, width), -100, dtype=torch.long)
    w = datum.loss_fn_inputs.weights
    for i, (target, weight) in enumerate(zip(datum.loss_fn_inputs.target_tokens, w)):
        if weight:
            labels[0, i] = target
    logits = model(input_ids=ids, attention_mask=mask).logits
    return torch.nn.functional.cross_entropy(
        logits.view(-1, logits.shape[-1]).float(), labels.view(-1), ignore_index=-100, reduction="sum"
    )


def bench_training(engine: Engine, work: Workload, cfg: dict, peak: float) -> dict:
    data = work.examples[: cfg["examples"]]
    width = max(len(d.model_input.tokens) for d in data)
    subset = spread(len(data), cfg["naive_examples"])
    if not engine.has_run("sft"):
        engine.create_run("sft", LORA, seed=0)
    run = engine._runs["sft"]
    model = engine.adapters.peft
    ours_logprobs = {}

    def ours():
        with Timer() as t:
            result = engine.forward_backward("sft", data)
        run.optimizer.zero_grad(set_to_none=True)
        for i in subset:
            ours_logprobs[i] = sum(lp for lp in result.logprobs[i] if lp is not None)
        return len(data), t.seconds

    naive_losses = {}

    def naive():
        engine.adapters.activate("sft")
        with Timer() as t:
            for i in subset:
                loss = naive_example_loss(model, data[i], width, work.base.pad_token_id)
                loss.backward()
                naive_losses[i] = loss.item()
        run.optimizer.zero_grad(set_to_none=True)
        return len(subset), t.seconds

    engine.forward_backward("sft", data[:1])  # warm-up, untimed
    naive_example_loss(model, data[0], len(data[0].model_input.tokens), work.base.pad_token_id).backward()
    run.optimizer.zero_grad(set_to_none=True)
    results = interleave(
        {"eztinker_forward_backward": ours, "naive_one_padded_example_per_step": naive}, cfg["repeats"]
    )
    selected = sum(sum(1 for w in d.loss_fn_inputs.weights if w) for d in data)
    flops = model_flops(work.base.model, data, selected)
    ours_rate = results["eztinker_forward_backward"]["per_s"]
    achieved = flops / (len(data) / ours_rate)
    agree = all(math.isclose(-ours_logprobs[i], naive_losses[i], rel_tol=1e-3) for i in subset)
    return {
        "workload": f"{len(data)} GSM8K examples (question -> reference solution), "
        f"{sum(len(d.model_input.tokens) for d in data)} tokens, "
        f"{selected} with nonzero weight, longest {width}",
        "naive_examples_timed": len(subset),
        "unit": "examples/s",
        "sides": results,
        "losses_agree_with_naive": agree,
        "model_flops_per_batch": flops,
        "achieved_flops_per_s": achieved,
        "fraction_of_matmul_peak": achieved / peak,
        "ratios": {"training": ours_rate / results["naive_one_padded_example_per_step"]["per_s"]},
    }


# ---------------------------------------------------------------------------- end to end
def bench_end_to_end(model_name: str, load_copy, work: Workload, cfg: dict) -> dict:
    """One rejection-SFT round: sample P problems x N candidates, verify, pick one per problem
    (a correct one first, then the model's own mean logprob, as the recipe does; always one, so
    that the training work does not depend on the model's accuracy), train one step on them."""
    from eztinker import ServiceClient
    from eztinker.verify import evaluate_answer

    P, N, T = cfg["e2e_problems"], cfg["candidates"], cfg["new_tokens"]
    problems = work.problems[:P]
    messages = [work.task.messages_for(p) for p in problems]
    task = work.task
    evaluate_answer("#### 1", "1")  # start the verifier's worker processes outside the timings

    def pick(candidates):  # candidates: (text, mean_logprob)
        scored = [(task.is_correct(task.trim_reply(text), problem), lp, text) for (text, lp), problem in candidates]
        return max(range(len(scored)), key=lambda i: scored[i][:2])

    # ---- EZTinker: the server, the SDK, one batched sample, one forward_backward + optim_step
    server_base = load_copy()
    with (
        tempfile.TemporaryDirectory() as tmp,
        ThreadedServer(
            build_service(ServerSettings(model=[server_base.name], data_dir=Path(tmp)), [server_base])
        ) as server,
    ):
        client = ServiceClient(server.url)
        run = client.create_training_run(lora_rank=LORA.rank, lora_alpha=LORA.alpha)
        tok = run.get_tokenizer()
        # Server overhead: a no-op round trip (optim_step without gradients: nothing to update).
        latencies = []
        for _ in range(cfg["round_trips"]):
            start = time.perf_counter()
            run.optim_step(AdamParams()).result()
            latencies.append(time.perf_counter() - start)

        run.sample(messages[:1], num_samples=2, sampling_params=SamplingParams(max_tokens=4)).result()  # warm-up

        def ours():
            with Timer() as t:
                params = SamplingParams(max_tokens=T, temperature=TEMPERATURE, seed=1)
                result = run.sample(messages, num_samples=N, sampling_params=params).result()
                chosen = []
                for problem, m, seqs in zip(problems, messages, result.sequences):
                    cands = [((s.text, sum(s.logprobs) / max(len(s.logprobs), 1)), problem) for s in seqs]
                    text = seqs[pick(cands)].text
                    chosen.append(
                        datum_from_messages(tok, [*m, {"role": "assistant", "content": task.trim_reply(text)}])
                    )
                _normalise(chosen)
                fb = run.forward_backward(chosen)
                step = run.optim_step(AdamParams(learning_rate=1e-4))
                fb.result(), step.result()
            return P, t.seconds

        ours_results = interleave({"eztinker_server_round": ours}, cfg["repeats"])
        client.close()
    del server_base

    # ---- naive: generate per candidate, verify, train one example per step (timed on subsets)
    import peft

    naive_base = load_copy()
    model = peft.get_peft_model(
        naive_base.model, peft.LoraConfig(r=LORA.rank, lora_alpha=LORA.alpha, target_modules="all-linear")
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = neutral_generation_config(naive_base, T, TEMPERATURE)
    gen.output_logits, gen.return_dict_in_generate = True, True
    tok = naive_base.tokenizer
    cand_subset = spread(P * N, cfg["naive_e2e_candidates"])
    train_subset = spread(P, cfg["naive_e2e_examples"])

    def naive():
        texts = {}
        with Timer() as t_sample:
            for i in cand_subset:
                problem = problems[i // N]
                prompt = render_prompt(tok, messages[i // N])
                torch.manual_seed(i)
                with torch.no_grad():
                    out = model.generate(
                        input_ids=torch.tensor([prompt]),
                        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                        generation_config=gen,
                    )
                new = out.sequences[0, len(prompt) :]
                logprobs = [
                    torch.log_softmax(step[0].float(), -1)[tok_id].item()
                    for step, tok_id in zip(out.logits, new.tolist())
                ]
                text = tok.decode(
                    [t for t in new.tolist() if t not in naive_base.stop_token_ids], skip_special_tokens=True
                )
                texts[i] = text
                pick([((text, sum(logprobs) / max(len(logprobs), 1)), problem)])  # verify it
        with Timer() as t_train:
            model.train(False)
            for j in train_subset:
                text = texts.get(j * N, "")
                datum = datum_from_messages(
                    tok, [*messages[j], {"role": "assistant", "content": task.trim_reply(text) or "0"}]
                )
                loss = naive_example_loss(model, datum, len(datum.model_input.tokens), naive_base.pad_token_id)
                (loss / max(1, sum(1 for w in datum.loss_fn_inputs.weights if w))).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        # Scaled to the whole round: every candidate, every selected example.
        seconds = t_sample.seconds * (P * N) / len(cand_subset) + t_train.seconds * P / len(train_subset)
        return P, seconds

    naive_results = interleave({"naive_round_scaled": naive}, 1)
    ours_rate = ours_results["eztinker_server_round"]["per_s"]
    naive_rate = naive_results["naive_round_scaled"]["per_s"]
    return {
        "workload": f"{P} problems x {N} candidates x {T} new tokens, verify, select 1 per problem, one training step",
        "naive_candidates_timed": len(cand_subset),
        "naive_examples_timed": len(train_subset),
        "unit": "problems/s",
        "sides": {**ours_results, **naive_results},
        "no_op_round_trip_ms": {
            "median": 1000 * statistics.median(latencies),
            "min": 1000 * min(latencies),
            "count": len(latencies),
        },
        "ratios": {"end_to_end": ours_rate / naive_rate},
    }


def _normalise(data) -> None:
    """Mean per-token loss over the batch, as the recipe does."""
    tokens = sum(sum(1 for w in d.loss_fn_inputs.weights if w) for d in data)
    for d in data:
        d.loss_fn_inputs.weights = [w / tokens for w in d.loss_fn_inputs.weights]


# ------------------------------------------------------------------------------- driver
def config_for(model: str, quick: bool) -> dict:
    if quick:
        return dict(
            prompts=4,
            candidates=4,
            new_tokens=32,
            naive_candidates=2,
            repeats=1,
            runs=2,
            run_prompts=2,
            run_candidates=2,
            examples=8,
            naive_examples=2,
            e2e_problems=4,
            naive_e2e_candidates=2,
            naive_e2e_examples=2,
            round_trips=20,
        )
    smol = model in ("smollm2", "qwen2-0.5b")
    return dict(
        prompts=16,
        candidates=8,
        new_tokens=128,
        naive_candidates=4 if smol else 8,
        repeats=1,
        runs=4,
        run_prompts=4,
        run_candidates=4,
        examples=32,
        naive_examples=4 if smol else 8,
        e2e_problems=16,
        naive_e2e_candidates=4 if smol else 8,
        naive_e2e_examples=4 if smol else 8,
        round_trips=50,
    )


def save(model: str, args, results: dict) -> Path:
    """Write bench/results/<model>.json (atomically); a partial re-run (--only) keeps the other sections."""
    path = RESULTS_DIR / f"{model}{'-quick' if args.quick else ''}.json"
    sections = ("sampling", "multi_run", "training", "end_to_end")
    if set(args.only) != set(sections) and path.exists():
        previous = json.loads(path.read_text())
        previous.update({k: v for k, v in results.items() if k not in sections or k in args.only})
        previous["rerun_sections"] = args.only
        results = previous
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(path)
    return path


def run_model(model: str, args) -> dict:
    cfg = config_for(model, args.quick)
    if args.repeats:
        cfg["repeats"] = args.repeats
    tiny_dir = tiny_model_dir(model)

    def load_copy():
        return load(model, args.cache_dir, tiny_dir)

    base = load_copy()
    work = Workload(base, args.quick)
    engine = Engine(base)
    engine.warm_up()  # as the backend does: weights packed before any timed call
    engine.create_run("bench", LORA, seed=0)
    bare = load_copy()  # a second copy, never wrapped by peft: the bare-model baseline
    log(
        f"\n== {model}: {base.model.config.model_type}, "
        f"{sum(p.numel() for p in base.model.parameters()) / 1e6:.1f} M params, "
        f"vocab {base.vocab_size}, {torch.get_num_threads()} threads"
    )
    peak = matmul_peak()
    log(f"  fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s")
    results = {
        "model": model,
        "model_name": base.name,
        "quick": args.quick,
        "config": cfg,
        "machine": machine(),
        "matmul_peak_flops": peak,
    }
    started = time.perf_counter()
    if "sampling" in args.only:
        log("  sampling")
        results["sampling"] = bench_sampling(engine, bare, work, cfg, peak)
        save(model, args, results)  # after every section: a stopped run keeps what it measured
    del bare
    if "multi_run" in args.only:
        log("  multi-run sampling")
        results["multi_run"] = bench_multi_run(engine, work, cfg)
        save(model, args, results)  # after every section: a stopped run keeps what it measured
    if "training" in args.only:
        log("  training")
        results["training"] = bench_training(engine, work, cfg, peak)
        save(model, args, results)  # after every section: a stopped run keeps what it measured
    if "end_to_end" in args.only:
        log("  end to end")
        results["end_to_end"] = bench_end_to_end(model, load_copy, work, cfg)
        save(model, args, results)  # after every section: a stopped run keeps what it measured
    results["bench_seconds"] = time.perf_counter() - started
    return results


def summary_rows(results: dict) -> list[tuple[str, str, float, float | None]]:
    rows = []
    s = results.get("sampling")
    if s:
        rows.append(("sampling vs generate per candidate", "tokens/s", s["ratios"]["sampling"], GOALS["sampling"]))
        rows.append(
            (
                "sampling vs bare-model batched generate",
                "tokens/s",
                s["ratios"]["sampling_vs_batched_generate"],
                GOALS["sampling_vs_batched_generate"],
            )
        )
    if results.get("multi_run"):
        rows.append(
            (
                "multi-run: one batch vs run by run",
                "tokens/s",
                results["multi_run"]["ratios"]["multi_run"],
                GOALS["multi_run"],
            )
        )
    if results.get("training"):
        rows.append(
            (
                "training vs one padded example/step",
                "examples/s",
                results["training"]["ratios"]["training"],
                GOALS["training"],
            )
        )
    if results.get("end_to_end"):
        rows.append(
            (
                "end to end: RSFT round via server vs naive",
                "problems/s",
                results["end_to_end"]["ratios"]["end_to_end"],
                GOALS["end_to_end"],
            )
        )
    return rows


def print_table(results: dict) -> None:
    log(
        f"\n{results['model']} ({'quick' if results['quick'] else 'full'}), "
        f"{results['machine']['torch_threads']} threads, fp32 peak {results['matmul_peak_flops'] / 1e9:.0f} GFLOP/s"
    )
    log(f"  {'comparison':44s} {'unit':>10s} {'ratio':>8s} {'goal':>6s}")
    for name, unit, ratio, goal in summary_rows(results):
        mark = "" if goal is None else ("ok" if ratio >= goal else "MISSED")
        log(f"  {name:44s} {unit:>10s} {ratio:8.2f} {'>= ' + format(goal, 'g') if goal else '':>6s} {mark}")
    s = results.get("sampling")
    if s:
        log(f"  adapter cost in EZTinker's sampler: {100 * s['ratios']['adapter_cost']:.1f}% of tokens/s")
        if "fraction_of_matmul_peak" in s:
            fractions = s["fraction_of_matmul_peak"]
            log(
                f"  sampling at {100 * fractions['eztinker']:.1f}% of the matmul peak (batched generate "
                f"{100 * fractions['batched_generate_bare_base']:.1f}%, generate per candidate "
                f"{100 * fractions['naive_generate_per_candidate']:.1f}%)"
            )
    t = results.get("training")
    if t:
        log(
            f"  training: {t['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s achieved = "
            f"{100 * t['fraction_of_matmul_peak']:.0f}% of the matmul peak; "
            f"losses agree with naive: {t['losses_agree_with_naive']}"
        )
    m = results.get("multi_run")
    if m and "identical_candidates" in m:
        log(
            f"  multi-run vs run by run: {m['identical_candidates']} candidates identical; logprobs agree to "
            f"{m['max_logprob_difference']:.1e} up to any divergence"
        )
    e = results.get("end_to_end")
    if e:
        log(f"  server no-op round trip: median {e['no_op_round_trip_ms']['median']:.1f} ms")


def markdown(results: dict) -> str:
    """The results of one model as the Markdown rows docs/performance.md shows."""
    lines = ["| comparison | EZTinker | baseline | ratio | goal |", "| --- | ---: | ---: | ---: | ---: |"]
    pairs = [
        ("sampling", "eztinker", "naive_generate_per_candidate", "sampling", "tokens/s"),
        ("sampling", "eztinker", "batched_generate_bare_base", "sampling_vs_batched_generate", "tokens/s"),
        ("multi_run", "eztinker_one_batch", "eztinker_run_by_run", "multi_run", "tokens/s"),
        ("training", "eztinker_forward_backward", "naive_one_padded_example_per_step", "training", "examples/s"),
        ("end_to_end", "eztinker_server_round", "naive_round_scaled", "end_to_end", "problems/s"),
    ]
    for section, ours, theirs, ratio, unit in pairs:
        data = results.get(section)
        if not data:
            continue
        a, b = data["sides"][ours]["per_s"], data["sides"][theirs]["per_s"]
        goal = GOALS[ratio]
        lines.append(
            f"| {section.replace('_', ' ')}: {ours} vs {theirs} | {a:.3g} {unit} | {b:.3g} {unit} | "
            f"**{data['ratios'][ratio]:.2f}x** | >= {goal:g}x {'met' if data['ratios'][ratio] >= goal else 'missed'} |"
        )
    return "\n".join(lines)


def plot(all_results: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["sampling", "sampling_vs_batched_generate", "multi_run", "training", "end_to_end"]
    labels = [
        "sampling vs\ngenerate/candidate",
        "sampling vs bare\nbatched generate",
        "multi-run vs\nrun by run",
        "training vs\n1 example/step",
        "RSFT round\nvs naive",
    ]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / max(1, len(all_results))
    for k, (model, results) in enumerate(sorted(all_results.items(), reverse=True)):
        ratios = {}
        for section in ("sampling", "multi_run", "training", "end_to_end"):
            ratios.update((results.get(section) or {}).get("ratios", {}))
        xs = [i + (k - (len(all_results) - 1) / 2) * width for i in range(len(names))]
        present = [(x, ratios[n]) for x, n in zip(xs, names) if n in ratios]  # a section not run: no bar
        ax.bar(
            [x for x, _ in present],
            [v for _, v in present],
            width,
            label=f"{model}{' (quick)' if results['quick'] else ''}",
        )
        for x, v in present:
            ax.text(x, v, f"{v:.1f}x", ha="center", va="bottom", fontsize=8)
    for i, n in enumerate(names):
        ax.hlines(GOALS[n], i - 0.45, i + 0.45, colors="k", linestyles="dashed", linewidth=1)
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("speed-up (EZTinker / baseline), log scale")
    ax.set_title("EZTinker vs the straightforward way (dashed: goal)")
    ax.legend()
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["tiny", "smollm2", "qwen2-0.5b", "both"], default="both")
    parser.add_argument("--quick", action="store_true", help="a small smoke run (about a minute for tiny)")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=ROOT / "data" / "cache",
        help="where the embedded SmolLM2 is converted once (as the server's data/cache)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=None, help="rounds per comparison (default 1; the best counts)")
    parser.add_argument(
        "--only",
        nargs="+",
        default=["sampling", "multi_run", "training", "end_to_end"],
        choices=["sampling", "multi_run", "training", "end_to_end"],
    )
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--report", action="store_true", help="print the recorded results as Markdown; run nothing")
    args = parser.parse_args()
    if args.report:
        for model in ("tiny", "smollm2", "qwen2-0.5b"):
            path = RESULTS_DIR / f"{model}.json"
            if path.exists():
                results = json.loads(path.read_text())
                print(f"\n### {model}\n\n{markdown(results)}")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = ["tiny", "smollm2"] if args.model == "both" else [args.model]
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    for model in models:
        results = run_model(model, args)
        path = save(model, args, results)
        results = json.loads(path.read_text())
        print_table(results)
        log(f"  wrote {path.relative_to(ROOT)} ({results['bench_seconds']:.0f} s)")
    if not args.no_plot and not args.quick:  # a smoke run never replaces the recorded plot
        all_results = {}
        for model in ("tiny", "smollm2"):
            path = RESULTS_DIR / f"{model}.json"
            if path.exists():
                all_results[model] = json.loads(path.read_text())
        if all_results:
            plot(all_results)
            log(f"wrote {PLOT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
