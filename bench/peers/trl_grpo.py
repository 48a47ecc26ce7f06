"""EZTinker's RL recipe against TRL's GRPOTrainer (issue #16): the same RL problem, trained by each in
turn on this machine, timed per optimizer step, then both adapters scored by one greedy evaluation.

    bench/peers/setup_trl.sh                                    # once: the trl venv and the model folder
    $PEERS_DIR/trl-venv/bin/python bench/peers/trl_grpo.py [--steps 10] [--eval-problems 200]
    $PEERS_DIR/trl-venv/bin/python bench/peers/trl_grpo.py --report   # the recorded results as Markdown

EZTinker: `eztinker server` on the shared SmolLM2-135M-Instruct folder as a real process (its own
data dir and free port), and `eztinker.recipes.rl.main(Config)` against it, both in the project venv
(this script re-run there with `--side eztinker`); the per-step seconds and rewards are the recipe's
own (`rl_results.json`), and its final checkpoint is exported as a PEFT folder (`export_checkpoint`).
TRL: `GRPOTrainer` in this process (trl venv) on the same folder, timed by a callback at each step's end.

Shared (`shared_settings`, read from the recipe's and the engine's defaults): the arithmetic task's
training problems in the recipe's own order (one epoch of `steps x groups_per_step` problems, seeded
shuffle), its prompts (system prompt, worked example) through the model's chat template, 8 problems x
4 candidates per optimizer step, at most 64 new tokens at temperature 1.0, the reward the recipe's
verifier scorer gives (Math-Verify: 1 correct, 0 not), advantages centred and divided by the group's
std, no KL term, Adam (lr 1e-3, constant, betas 0.9/0.999, eps 1e-8, no weight decay, gradient norm
clipped at 1.0), rank-1 LoRA (alpha 16, no dropout, every linear layer but the head) with the same
seeded init, float32 on the CPU, torch's default thread count.

Differences that remain (recorded under "differences" in the JSON): EZTinker's advantages use the
population std, TRL's the sample std (x sqrt(3/4) for groups of 4); EZTinker averages the loss over
the tokens of replies with a nonzero advantage, TRL's `dapo` over every completion token of the step;
the recipe pipelines sampling one step ahead (`max_staleness` 1, importance-weighted with the sampling
logprobs; `--max-staleness 0` makes it on-policy like TRL); the recipe runs forward/backward only on
the replies with a nonzero advantage (the others add nothing to the gradient), in requests of 16, TRL
on all 32 completions in one batch; TRL recomputes no activations here (`activation_checkpointing`
off: TRL's default is on, which a 135M model on a CPU does not need).

Evaluation: EZTinker's server cannot load a plain PEFT folder (a checkpoint needs its own training
state and optimizer files), so every model (the base, EZTinker's adapter, TRL's adapter) is scored in
this process by `evaluate`: greedy `generate`, at most 64 new tokens, on the same held-out problems,
graded as the recipe's evaluation grades (verifier, strict format, lenient). Results:
bench/results/trl_grpo.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results" / "trl_grpo.json"
PEERS_DIR = Path(os.environ.get("PEERS_DIR", "/work/scratch/peers"))
SIDES = ("eztinker", "trl")


# ---------------------------------------------------------------------------- the problem
def shared_settings(args) -> dict:
    """What both sides train with: the RL recipe's defaults, the engine's LoRA and Adam defaults."""
    from eztinker.recipes import rl
    from eztinker.types import AdamParams, LoraConfig

    c, lora, adam = rl.Config(), LoraConfig(), AdamParams()
    return {
        "task": c.task,
        "difficulty": c.difficulty,
        "seed": c.seed,
        "steps": args.steps,
        "groups_per_step": c.groups_per_step,
        "num_candidates": c.num_candidates,
        "max_tokens": c.max_tokens,
        "temperature": c.temperature,
        "learning_rate": c.learning_rate,
        "lr_schedule": "constant",
        "adam_betas": [adam.beta1, adam.beta2],
        "adam_eps": adam.eps,
        "weight_decay": adam.weight_decay,
        "grad_clip_norm": adam.grad_clip_norm,
        "lora_rank": c.lora_rank,
        "lora_alpha": c.lora_alpha,
        "lora_dropout": lora.dropout,
        "lora_target_modules": lora.target_modules,
        "kl_beta": 0.0,
        "normalize_std": c.normalize_std,
        "dtype": "float32",
        "device": "cpu",
        "eval_problems": args.eval_problems,
        "eval_max_tokens": c.max_tokens,
        "eval_temperature": 0.0,
    }


def recipe_config(args, server_url: str, output_dir: Path):
    """The RL recipe's config for this comparison: one epoch that is exactly `steps` steps, no
    evaluation of its own (both sides are scored by `evaluate`), its final checkpoint saved."""
    from eztinker.recipes import rl

    defaults = rl.Config()
    return rl.Config(
        max_samples=args.steps * defaults.groups_per_step,
        epochs=1,
        eval_size=0,
        max_staleness=args.max_staleness,
        checkpoint=True,
        server_url=server_url,
        output_dir=output_dir,
    )


def training_problems(config) -> list:
    """The problems the recipe trains on, in the order its steps take them."""
    from eztinker.recipes import rl
    from eztinker.recipes._rollouts import load_problems

    recipe = rl.RL(config)
    train, _ = load_problems(config, recipe.task)
    return [p for _, step in recipe.schedule(train, 1) for p in step]


def test_problems(settings: dict) -> list:
    from eztinker.tasks import get_task

    return get_task(settings["task"]).load_problems(
        "test", limit=settings["eval_problems"], seed=settings["seed"], difficulty=settings["difficulty"]
    )


# --------------------------------------------------------------------------- EZTinker side
def eztinker_child(args) -> None:
    """(Project venv.) The server and the RL recipe; writes <work>/eztinker/side.json."""
    import peft
    import torch
    import transformers

    from eztinker.export import export_checkpoint
    from eztinker.launcher import ServerProcess, offline_env
    from eztinker.recipes import rl

    out = args.work_dir / "eztinker"
    started = time.monotonic()
    with ServerProcess(
        model=str(args.model_dir),
        data_dir=out / "server",
        log_file=out / "server.log",
        extra_args=["--device", "cpu"],
        env=offline_env(),
    ) as server:
        ready = time.monotonic() - started
        results = rl.main(recipe_config(args, server.url, out))
    export_checkpoint(out / "server", results["epochs"][-1]["checkpoint"], out / "adapter", model=str(args.model_dir))
    (out / "side.json").write_text(
        json.dumps(
            {
                "server_ready_seconds": round(ready, 2),
                "recipe_seconds": round(results["total_seconds"], 2),
                "step_seconds": [s["seconds"] for s in results["steps"]],
                "rewards": [s["mean_reward"] for s in results["steps"]],
                "staleness": [s["staleness"] for s in results["steps"]],
                "trained_replies": [s["trained_replies"] for s in results["steps"]],
                "loss_fn": results["config"]["loss_fn"],
                "max_staleness": results["config"]["max_staleness"],
                "torch_threads_client": torch.get_num_threads(),
                "versions": {
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "peft": peft.__version__,
                },
            }
        )
    )


def run_eztinker(args, work: Path) -> dict:
    """The EZTinker side as a child of the project venv; its wall time covers every start-up."""
    command = [
        str(args.eztinker_python),
        __file__,
        "--side",
        "eztinker",
        "--steps",
        str(args.steps),
        "--max-staleness",
        str(args.max_staleness),
        "--work-dir",
        str(work),
        "--model-dir",
        str(args.model_dir),
    ]
    started = time.monotonic()
    subprocess.run(command, check=True)
    side = json.loads((work / "eztinker" / "side.json").read_text())
    side["total_seconds"] = round(time.monotonic() - started, 2)
    side["adapter"] = str(work / "eztinker" / "adapter")
    return side


# -------------------------------------------------------------------------------- TRL side
def run_trl(args, settings: dict, problems: list, work: Path) -> dict:
    """GRPOTrainer in this process on the same problems; its adapter saved as a PEFT folder."""
    started = time.monotonic()
    import peft
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from eztinker.recipes.scorers import VerifierScorer
    from eztinker.tasks import get_task

    s, task = settings, get_task(settings["task"])
    scorer, by_id, rewards = VerifierScorer(task), {p.id: p for p in problems}, []

    def reward(completions, id, **_) -> list[float]:  # noqa: A002 (the dataset's column)
        # The recipe scores the trimmed reply (text after the answer line dropped) with its verifier.
        scores = [scorer(by_id[i], [task.trim_reply(c[-1]["content"])])[0] for c, i in zip(completions, id)]
        rewards.append(statistics.fmean(scores))  # one call per step: one generation batch per step
        return scores

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []

        def on_train_begin(self, *_, **__):
            self.last = time.monotonic()

        def on_step_end(self, *_, **__):
            now = time.monotonic()
            self.seconds.append(now - self.last)
            self.last = now

    g = s["groups_per_step"] * s["num_candidates"]
    config = GRPOConfig(
        output_dir=str(work / "trl"),
        max_steps=s["steps"],
        seed=s["seed"],
        # One optimizer step = one generation batch of 8 prompts x 4 completions, used once (on-policy).
        per_device_train_batch_size=g,
        num_generations=s["num_candidates"],
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_iterations=1,
        shuffle_dataset=False,  # the recipe's order, not TRL's shuffle
        max_completion_length=s["max_tokens"],
        temperature=s["temperature"],
        top_p=1.0,
        top_k=0,
        beta=s["kl_beta"],
        loss_type="dapo",
        scale_rewards="group" if s["normalize_std"] else "none",
        learning_rate=s["learning_rate"],
        lr_scheduler_type="constant",
        adam_beta1=s["adam_betas"][0],
        adam_beta2=s["adam_betas"][1],
        adam_epsilon=s["adam_eps"],
        weight_decay=s["weight_decay"],
        max_grad_norm=s["grad_clip_norm"],
        activation_checkpointing=False,
        bf16=False,
        fp16=False,
        use_cpu=True,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    lora = peft.LoraConfig(
        r=s["lora_rank"],
        lora_alpha=s["lora_alpha"],
        lora_dropout=s["lora_dropout"],
        target_modules=s["lora_target_modules"],
    )
    # The engine's own init (Adapters.add): the seed set right before wrapping, so lora_A starts equal.
    torch.manual_seed(s["seed"])
    model = peft.get_peft_model(model, lora)
    dataset = Dataset.from_list([{"prompt": task.messages_for(p), "id": p.id} for p in problems])
    timer = StepTimer()
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset, callbacks=[timer])
    trainer.train()
    adapter = work / "trl" / "adapter"
    trainer.model.save_pretrained(adapter)
    return {
        "step_seconds": [round(x, 3) for x in timer.seconds],
        "rewards": rewards,
        "total_seconds": round(time.monotonic() - started, 2),
        "adapter": str(adapter),
        "loss_type": config.loss_type,
        "scale_rewards": config.scale_rewards,
        "torch_threads": torch.get_num_threads(),
        "versions": {
            "trl": trl.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "torch": torch.__version__,
        },
    }


# ------------------------------------------------------------------------------ evaluation
def evaluate(model_dir: Path, adapter: str | None, problems: list, settings: dict, batch_size: int = 32) -> dict:
    """Greedy held-out accuracy of the base model (adapter None) or base + a PEFT adapter folder,
    graded like the recipe's evaluation (`_rollouts.Rollouts.evaluate`)."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from eztinker.chat import render_prompt
    from eztinker.tasks import get_task

    started, task = time.monotonic(), get_task(settings["task"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter:
        model = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.eval()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    greedy = GenerationConfig(
        do_sample=False, max_new_tokens=settings["eval_max_tokens"], eos_token_id=eos, pad_token_id=pad
    )
    replies = []
    for k in range(0, len(problems), batch_size):
        prompts = [render_prompt(tokenizer, task.messages_for(p)) for p in problems[k : k + batch_size]]
        width = max(map(len, prompts))
        ids_B_T = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # left-padded
        mask_B_T = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.no_grad():
            out = model.generate(input_ids=ids_B_T, attention_mask=mask_B_T, generation_config=greedy)
        for row in out[:, width:].tolist():
            row = row[: row.index(eos)] if eos in row else row
            replies.append(task.trim_reply(tokenizer.decode(row, skip_special_tokens=True)))
    n = max(len(problems), 1)
    return {
        "accuracy": sum(task.is_correct(r, p) for r, p in zip(replies, problems)) / n,
        "strict_accuracy": sum(task.strict_correct(r, p) for r, p in zip(replies, problems)) / n,
        "lenient_accuracy": sum(task.lenient_correct(r, p) for r, p in zip(replies, problems)) / n,
        "seconds": round(time.monotonic() - started, 1),
    }


# -------------------------------------------------------------------------------- results
def summary(side: dict) -> dict:
    steps = side["step_seconds"]
    return {
        "first_step_seconds": steps[0],
        "steady_median_seconds": statistics.median(steps[1:] or steps),
        "steps_total_seconds": round(sum(steps), 2),
        "mean_reward": statistics.fmean(side["rewards"]),
    }


def machine() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in lscpu.splitlines() if ":" in line)}
    return {
        "cpu": fields.get("Model name"),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg(),
    }


def report(results: dict) -> str:
    """The recorded results as a Markdown table."""
    sides = [results[name] for name in SIDES]
    rows = [
        ("steady step, median (s)", lambda s: f"{s['summary']['steady_median_seconds']:.1f}"),
        ("first step (s)", lambda s: f"{s['summary']['first_step_seconds']:.1f}"),
        (f"{results['settings']['steps']} steps (s)", lambda s: f"{s['summary']['steps_total_seconds']:.0f}"),
        ("whole side, start-up included (s)", lambda s: f"{s['total_seconds']:.0f}"),
        ("mean reward over the steps", lambda s: f"{s['summary']['mean_reward']:.3f}"),
        ("test accuracy after (verifier)", lambda s: f"{s['accuracy_after']['accuracy']:.1%}"),
        (
            "strict / lenient after",
            lambda s: f"{s['accuracy_after']['strict_accuracy']:.1%} / {s['accuracy_after']['lenient_accuracy']:.1%}",
        ),
    ]
    base = results["accuracy_before"]
    lines = [
        "| | EZTinker | TRL GRPOTrainer |",
        "| --- | ---: | ---: |",
        *(f"| {label} | {cell(sides[0])} | {cell(sides[1])} |" for label, cell in rows),
        "",
        f"Base model before training: {base['accuracy']:.1%} (strict {base['strict_accuracy']:.1%}, lenient "
        f"{base['lenient_accuracy']:.1%}) on {results['settings']['eval_problems']} held-out problems. "
        f"TRL steady step / EZTinker steady step: **{results['ratio_trl_over_eztinker_steady']:.2f}x** (goal 2x).",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps of each side")
    parser.add_argument("--eval-problems", type=int, default=200, help="held-out test problems (greedy)")
    parser.add_argument(
        "--max-staleness",
        type=int,
        default=1,
        help="the recipe's (its default: 1, sampling one step ahead; 0: on-policy like TRL)",
    )
    parser.add_argument("--model-dir", type=Path, default=PEERS_DIR / "models" / "smollm2-135m-instruct")
    parser.add_argument("--eztinker-python", type=Path, default=ROOT / ".venv" / "bin" / "python")
    parser.add_argument("--work-dir", type=Path, default=None, help="default: $PEERS_DIR/runs/trl-grpo-<time>")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--report", action="store_true", help="print the recorded results as Markdown")
    parser.add_argument("--side", choices=["eztinker"], help=argparse.SUPPRESS)  # internal: the child
    args = parser.parse_args()
    if args.report:
        return print(report(json.loads(args.results.read_text())))
    if args.side == "eztinker":
        return eztinker_child(args)

    work = args.work_dir or PEERS_DIR / "runs" / time.strftime("trl-grpo-%Y%m%d-%H%M%S")
    work.mkdir(parents=True, exist_ok=True)
    settings = shared_settings(args)
    problems = training_problems(recipe_config(args, "", work / "eztinker"))
    results = {
        "command": shlex.join(["trl-venv/bin/python", "bench/peers/trl_grpo.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "settings": settings,
        "work_dir": str(work),
    }
    print(f"[{time.strftime('%H:%M:%S')}] EZTinker: server + RL recipe, {args.steps} steps", flush=True)
    results["eztinker"] = run_eztinker(args, work)
    print(f"[{time.strftime('%H:%M:%S')}] TRL: GRPOTrainer, {args.steps} steps", flush=True)
    results["trl"] = run_trl(args, settings, problems, work)
    test = test_problems(settings)
    print(f"[{time.strftime('%H:%M:%S')}] evaluating base, EZTinker and TRL on {len(test)} problems", flush=True)
    results["accuracy_before"] = evaluate(args.model_dir, None, test, settings)
    for name in SIDES:
        side = results[name]
        side["accuracy_after"] = evaluate(args.model_dir, side["adapter"], test, settings)
        side["summary"] = summary(side)
    results["ratio_trl_over_eztinker_steady"] = (
        results["trl"]["summary"]["steady_median_seconds"] / results["eztinker"]["summary"]["steady_median_seconds"]
    )
    results["differences"] = {
        "advantage_std": "EZTinker: population std of the group; TRL: sample std (n-1), + 1e-4",
        "loss_normaliser": f"EZTinker ({results['eztinker']['loss_fn']}): tokens of replies with a nonzero advantage; "
        f"TRL ({results['trl']['loss_type']}): every completion token of the step",
        "staleness": (
            f"EZTinker: max_staleness {results['eztinker']['max_staleness']} (importance-weighted); TRL: on-policy"
        ),
        "trained_replies": "EZTinker: forward/backward on the replies with a nonzero advantage only, 16 per request; "
        "TRL: on all 32 completions, one batch",
        "activation_checkpointing": "off on both (TRL's default is on)",
        "sampler": "EZTinker: its own batched decoder; TRL: transformers generate (no vLLM on CPU)",
    }
    results["machine"]["load_average_at_end"] = os.getloadavg()
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=1) + "\n")
    print(report(results))


if __name__ == "__main__":
    main()
