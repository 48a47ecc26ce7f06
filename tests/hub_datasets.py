"""Local copies of the Hugging Face dataset repositories that tinker-cookbook's recipes load by name.

`datasets.load_dataset("openai/gsm8k", "main")` reads a folder of that relative path, when one exists,
exactly as it reads the Hub repository: its README's `configs:` section names each config's data files
per split. A recipe run from a directory holding these folders therefore loads local data with no
change to its code or its defaults, as it would for a user with a local mirror of the Hub.

The rows are small and made up (or, for GSM8K, taken from ../shared), in each dataset's own fields.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path


def _write_repo(root: Path, repo: str, splits: dict[str, Iterable[dict]], config: str = "default") -> None:
    folder = root / repo
    lines = ["---", "configs:", f"- config_name: {config}", "  data_files:"]
    for split, rows in splits.items():
        path = folder / config / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        lines += [f"  - split: {split}", f"    path: {config}/{split}.jsonl"]
    (folder / "README.md").write_text("\n".join([*lines, "---", ""]))


def _sums(count: int, offset: int = 0) -> list[tuple[str, str]]:
    return [
        (f"What is {a} + {b}?", str(a + b))
        for a, b in ((2 + (i + offset) % 17, 3 + (i * 7 + offset) % 13) for i in range(count))
    ]


def _chat(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": f"The answer is {answer}."}]


def write_hub_mirror(root: Path, gsm8k_dir: Path | None = None, rows: int = 300) -> Path:
    """Write local copies of the datasets the tested recipes load; returns `root`."""
    train, test = _sums(rows), _sums(24, offset=5)
    # chat_sl's default (no_robots) and tulu3, and sl_loop's default: conversations in `messages`.
    _write_repo(
        root,
        "HuggingFaceH4/no_robots",
        {
            "train": (
                {"prompt": q, "prompt_id": str(i), "messages": _chat(q, a), "category": "Math"}
                for i, (q, a) in enumerate(train)
            ),
            "test": (
                {"prompt": q, "prompt_id": str(i), "messages": _chat(q, a), "category": "Math"}
                for i, (q, a) in enumerate(test)
            ),
        },
    )
    _write_repo(
        root,
        "allenai/tulu-3-sft-mixture",
        {"train": ({"id": str(i), "messages": _chat(q, a), "source": "local"} for i, (q, a) in enumerate(train))},
    )

    # DPO's default (hhh): Anthropic's transcript format, chosen and rejected sharing the prompt.
    def hh(q: str, a: str) -> dict:
        prompt = f"\n\nHuman: {q}\n\nAssistant:"
        return {"chosen": f"{prompt} The answer is {a}.", "rejected": f"{prompt} I do not know."}

    _write_repo(root, "Anthropic/hh-rlhf", {"train": (hh(q, a) for q, a in train), "test": (hh(q, a) for q, a in test)})
    # Distillation's and math_rl's prompts: DeepMath's fields.
    _write_repo(
        root,
        "zwhe99/DeepMath-103K",
        {
            "train": (
                {
                    "question": q,
                    "final_answer": a,
                    "difficulty": 1.0,
                    "topic": "arithmetic",
                    "r1_solution_1": "",
                    "r1_solution_2": "",
                    "r1_solution_3": "",
                }
                for q, a in train
            )
        },
    )
    if gsm8k_dir is not None:  # rl_loop's and math_rl's GSM8K: the real problems from ../shared

        def read(split: str, count: int) -> list[dict]:
            with open(gsm8k_dir / f"{split}.jsonl") as f:
                return [json.loads(line) for _, line in zip(range(count), f)]

        _write_repo(root, "openai/gsm8k", {"train": read("train", rows), "test": read("test", 24)}, config="main")
    return root


FILLER = (
    "the of and in to was a is for on with by as at from his that it were which an are this had its be "
    "also first new two year city river village church team game album song war film state school"
).split()


def write_wikitext(root: Path, words: Sequence[str], chars: int, rate: float, seed: int = 0) -> Path:
    """A made-up stand-in for WikiText-103 train (`Salesforce/wikitext`, config
    `wikitext-103-raw-v1`, rows of `text`, headings and paragraphs as in the original, with its
    ` @-@ ` escapes) of about `chars` characters: filler words, and each of `words` at `rate` per word."""
    rng = random.Random(seed)
    lines: list[str] = []
    total = 0
    while total < chars:
        lines.append(f" = Article {len(lines)} = \n")
        paragraph = [rng.choice(words) if rng.random() < rate * len(words) else rng.choice(FILLER) for _ in range(150)]
        paragraph[7] = "1 @-@ 2"
        lines.append(" " + " ".join(paragraph) + " . \n")
        total += len(lines[-2]) + len(lines[-1])
    _write_repo(root, "Salesforce/wikitext", {"train": ({"text": line} for line in lines)}, "wikitext-103-raw-v1")
    return root


def write_prophet_arena(path: Path, train_outcomes: Sequence[int], validation_outcomes: Sequence[int]) -> Path:
    """A made-up Prophet Arena CSV (the columns of `subset_data_1200.csv`, which the forecasting recipes
    take as `data_path`): one single-market event per outcome, the training ones opened and closed in
    September 2025 and the validation ones opened in November, either side of the recipes' default
    split date (2025-10-20)."""
    fields = ["submission_id", "event_ticker", "title", "snapshot_time", "close_time"]
    fields += ["market_outcome", "category", "markets", "sources"]
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, fieldnames=fields)
        writer.writeheader()
        for i, (outcome, month) in enumerate([(o, 9) for o in train_outcomes] + [(o, 11) for o in validation_outcomes]):
            market = f"Team {i} wins"
            writer.writerow(
                {
                    "submission_id": f"sub-{i}",
                    "event_ticker": f"EVENT-{i}",
                    "title": f"Will team {i} win its next match?",
                    "snapshot_time": f"2025-{month:02d}-{1 + i:02d}T12:00:00Z",
                    "close_time": f"2025-{month:02d}-{2 + i:02d}T12:00:00Z",
                    "market_outcome": json.dumps({market: outcome}),
                    "category": "Sports",
                    "markets": json.dumps([market]),
                    "sources": json.dumps([{"title": f"Team {i} preview", "summary": "Form is mixed.", "ranking": 1}]),
                }
            )
    return path
