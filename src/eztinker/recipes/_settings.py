"""The settings every recipe that samples a task's problems shares: the server, the task and its
data, sampling, evaluation, the run's LoRA shape, the schedule and the output folder. A recipe's
`Config` extends `TaskRecipeSettings` with its own fields and redeclares those it describes or
defaults otherwise (a redeclared field keeps its place, so the flags keep their order); its CLI
flags are generated from all of them (`_cli.py`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..tasks import TASK_NAMES, aqua, competition_math, gsm8k
from ..tasks.arithmetic import DIFFICULTIES
from ._cli import setting
from ._rollouts import RewardFn


@dataclass
class TaskRecipeSettings:
    task: str = setting("gsm8k", "Problem set.", choices=TASK_NAMES)
    server_url: str = setting("http://127.0.0.1:8000", "The EZTinker server.")
    api_key: str | None = setting(None, "API key, if the server needs one.", envvar="EZTINKER_API_KEY")
    gsm8k_dir: Path | None = setting(
        None, f"Folder with GSM8K train.jsonl/test.jsonl (else ${gsm8k.ENV_VAR}, else the Hub).", envvar=gsm8k.ENV_VAR
    )
    math_dir: Path | None = setting(
        None,
        f"Folder with MATH train.jsonl/test.jsonl (else ${competition_math.ENV_VAR}, else the Hub).",
        envvar=competition_math.ENV_VAR,
    )
    aqua_dir: Path | None = setting(
        None, f"Folder with AQuA-RAT train.jsonl/test.jsonl (else ${aqua.ENV_VAR}, else the Hub).", envvar=aqua.ENV_VAR
    )
    difficulty: str = setting("medium", "Arithmetic task only.", choices=DIFFICULTIES)
    max_samples: int = setting(100, "Training problems.")
    num_candidates: int = setting(4, "Candidates sampled per problem.")
    epochs: int = setting(3, "Rounds of sample, select, train.")
    learning_rate: float = setting(2e-4, "Adam learning rate of the first epoch.")
    lr_decay: float = setting(1.0, "Learning-rate multiplier applied after every epoch.")
    temperature: float = setting(0.8, "For candidates; evaluation is greedy.")
    max_tokens: int = setting(256, "New tokens per candidate.")
    eval_size: int = setting(100, "Held-out test problems (greedy).")
    micro_batch_size: int = setting(4, "Examples per forward_backward request.")
    prompts_per_sample_call: int = setting(32, "Problems per batched `sample` request.")
    lora_rank: int = setting(1, "LoRA rank of a new run (a resumed run keeps its checkpoint's).")
    lora_alpha: float = setting(16.0, "LoRA alpha of a new run.")
    seed: int = setting(0, "Seeds problem order, candidate sampling and the adapter's init.")
    eval_every: int = setting(1, "Evaluate every this many epochs (and always after the last one run).")
    eval_tasks: str | None = setting(
        None,
        "lm-eval tasks (comma-separated, e.g. arc_easy,gsm8k) run on the run's adapter at every evaluation, "
        "beside the task's own accuracy; needs `pip install 'eztinker[eval]'`. Recorded on the server too.",
    )
    eval_limit: float | None = setting(None, "--eval-tasks: examples per task (a fraction of the task below 1).")
    eval_include_path: Path | None = setting(None, "--eval-tasks: a folder of lm-eval task YAMLs (local data).")
    time_budget_minutes: float | None = setting(
        None,
        "Start no epoch that would end past this many minutes from the start, judged by the previous "
        "epoch's duration (the final evaluation still runs).",
    )
    checkpoint: bool = setting(False, "Save a checkpoint every epoch.")
    resume_from: str | None = setting(None, "Continue after '<run_id>/<an epoch checkpoint of this recipe>'.")
    output_dir: Path = setting(Path("data"), "Folder for the buffer, results and plot.")
    # default: the task's verifier (Math-Verify on the gold); a function has no flag
    reward_fn: RewardFn | None = field(default=None, repr=False, metadata={"cli": False})
