"""Procedurally generated arithmetic word problems with exact integer answers.

Small enough for a ~135M-parameter model to learn in minutes: one-step
addition/subtraction with numbers 2-20, multiplication with factors 2-9, and
(at ``difficulty="hard"``) two-step problems.

Generation is deterministic given ``(seed, difficulty)``: one stream of unique
questions is drawn from a seeded RNG; its first ``N_TEST`` questions form the
test split and the following ones the train split, so the splits never share a
question text and a smaller ``limit`` is always a prefix of a larger one.

Every problem carries a short worked ``solution`` in the prompted format, e.g.
``"13 - 4 = 9\\nAnswer: 9"``, usable as a supervised fine-tuning target.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from eztinker.tasks._grading import NumericAnswers
from eztinker.tasks._problem import Problem

ANSWER_MARKER = "Answer:"
SPLITS: tuple[str, ...] = ("train", "test")
N_TEST = 500
DEFAULT_TRAIN_SIZE = 2000

SYSTEM_PROMPT = "Solve the problem. Think briefly, then give the final answer on its own line as `Answer: <number>`."

# One worked example before the question shows the answer format. A 135M model ignores the
# format asked for in the system prompt alone (0 of 100 replies followed it, measured) but copies
# a demonstrated one (a third of replies); rejection sampling then has well-formed candidates to
# reinforce. The wording matches no template below, so it never equals a generated problem.
DEMONSTRATION: tuple[dict[str, str], ...] = (
    {"role": "user", "content": "A shelf holds 7 cups. Someone adds 4 more cups. How many cups are on the shelf?"},
    {"role": "assistant", "content": f"7 + 4 = 11\n{ANSWER_MARKER} 11"},
)

OPERATIONS_BY_DIFFICULTY: dict[str, tuple[str, ...]] = {
    "easy": ("add", "sub"),
    "medium": ("add", "sub", "mul"),
    "hard": ("add", "sub", "mul", "two_step"),
}
DIFFICULTIES: tuple[str, ...] = tuple(OPERATIONS_BY_DIFFICULTY)

NAMES = (
    "Sara",
    "Tom",
    "Mia",
    "Ben",
    "Lena",
    "Omar",
    "Ana",
    "Leo",
    "Emma",
    "Raj",
    "Zoe",
    "Sam",
    "Nora",
    "Ivan",
    "Lucy",
    "Kai",
    "Maya",
    "Jack",
    "Ella",
    "Noah",
)
OBJECTS = (
    "apples",
    "stickers",
    "pens",
    "marbles",
    "cookies",
    "books",
    "balloons",
    "cards",
    "shells",
    "crayons",
    "toy cars",
    "oranges",
    "pencils",
    "stamps",
    "candies",
    "buttons",
    "beads",
    "flowers",
    "coins",
    "eggs",
)
# (singular, plural) containers for multiplication problems.
CONTAINERS = (
    ("box", "boxes"),
    ("bag", "bags"),
    ("basket", "baskets"),
    ("jar", "jars"),
    ("pack", "packs"),
    ("bowl", "bowls"),
    ("bucket", "buckets"),
    ("crate", "crates"),
)

# Templates. Numbers always appear in the question in operand order a, b[, c].
_ADD = (
    "{n} has {a} {o} and buys {b} more. How many {o} does {n} have now?",
    "{n} had {a} {o}. A friend gave {n} {b} more {o}. How many {o} does {n} have now?",
    "There are {a} {o} in a box. {n} puts {b} more {o} in the box. How many {o} are in the box now?",
    "{n} found {a} {o} in the morning and {b} {o} in the afternoon. How many {o} did {n} find in total?",
)
_SUB = (
    "{n} has {a} {o} and gives away {b}. How many {o} does {n} have now?",
    "{n} had {a} {o} and lost {b} of them. How many {o} does {n} have left?",
    "There are {a} {o} on the table. {n} takes {b} of them. How many {o} are left on the table?",
    "{n} had {a} {o}. {n} used {b} {o}. How many {o} does {n} have left?",
)
_MUL = (
    "There are {a} {cs} with {b} {o} in each {c}. How many {o} are there in total?",
    "{n} has {a} {cs}. Each {c} holds {b} {o}. How many {o} does {n} have in all?",
    "{n} fills {a} {cs} and puts {b} {o} in each {c}. How many {o} did {n} use altogether?",
)
# Two-step templates: (template, kind) where kind fixes the computation.
_TWO_STEP = (
    ("{n} has {a} {o}, buys {b} more, and then gives away {c}. How many {o} does {n} have now?", "add_sub"),
    ("{n} had {a} {o}, lost {b} of them, and then found {c} more. How many {o} does {n} have now?", "sub_add"),
    (
        "{n} has {a} {o}. {n} buys {b} more {o} and then gets {c} more from a friend. How many {o} does {n} have now?",
        "add_add",
    ),
    ("There are {a} {cs} with {b} {o} in each {c}. {n} takes {c_num} of the {o}. How many {o} are left?", "mul_sub"),
)


def _eq(x: int, op: str, y: int) -> tuple[int, str]:
    result = {"+": x + y, "-": x - y, "*": x * y}[op]
    return result, f"{x} {op} {y} = {result}"


def _gen_add(rng: random.Random, n: str, o: str) -> tuple[str, list[str], int]:
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    ans, line = _eq(a, "+", b)
    return rng.choice(_ADD).format(n=n, o=o, a=a, b=b), [line], ans


def _gen_sub(rng: random.Random, n: str, o: str) -> tuple[str, list[str], int]:
    a = rng.randint(3, 20)
    b = rng.randint(2, a - 1)  # answer >= 1, never negative
    ans, line = _eq(a, "-", b)
    return rng.choice(_SUB).format(n=n, o=o, a=a, b=b), [line], ans


def _gen_mul(rng: random.Random, n: str, o: str) -> tuple[str, list[str], int]:
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    c, cs = rng.choice(CONTAINERS)
    ans, line = _eq(a, "*", b)
    return rng.choice(_MUL).format(n=n, o=o, a=a, b=b, c=c, cs=cs), [line], ans


def _gen_two_step(rng: random.Random, n: str, o: str) -> tuple[str, list[str], int]:
    template, kind = rng.choice(_TWO_STEP)
    if kind == "add_sub":
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        mid, l1 = _eq(a, "+", b)
        c = rng.randint(2, min(20, mid - 1))
        ans, l2 = _eq(mid, "-", c)
        question = template.format(n=n, o=o, a=a, b=b, c=c)
    elif kind == "sub_add":
        a = rng.randint(3, 20)
        b = rng.randint(2, a - 1)
        mid, l1 = _eq(a, "-", b)
        c = rng.randint(2, 20)
        ans, l2 = _eq(mid, "+", c)
        question = template.format(n=n, o=o, a=a, b=b, c=c)
    elif kind == "add_add":
        a, b, c = rng.randint(2, 20), rng.randint(2, 20), rng.randint(2, 20)
        mid, l1 = _eq(a, "+", b)
        ans, l2 = _eq(mid, "+", c)
        question = template.format(n=n, o=o, a=a, b=b, c=c)
    else:  # mul_sub
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        mid, l1 = _eq(a, "*", b)
        c_num = rng.randint(2, min(20, mid - 1))
        ans, l2 = _eq(mid, "-", c_num)
        cont, conts = rng.choice(CONTAINERS)
        question = template.format(n=n, o=o, a=a, b=b, c=cont, cs=conts, c_num=c_num)
    return question, [l1, l2], ans


_GENERATORS: dict[str, Callable[[random.Random, str, str], tuple[str, list[str], int]]] = {
    "add": _gen_add,
    "sub": _gen_sub,
    "mul": _gen_mul,
    "two_step": _gen_two_step,
}


def _generate(count: int, seed: int, difficulty: str) -> list[tuple[str, str, int]]:
    """First ``count`` unique (question, solution, answer) triples of the stream."""
    rng = random.Random(f"eztinker-arithmetic:{difficulty}:{seed}")
    ops = OPERATIONS_BY_DIFFICULTY[difficulty]
    seen: set[str] = set()
    out: list[tuple[str, str, int]] = []
    attempts, max_attempts = 0, 100 * count + 1000
    while len(out) < count:
        attempts += 1
        if attempts > max_attempts:  # pragma: no cover - the space is far larger
            raise RuntimeError(f"could not generate {count} unique {difficulty} problems")
        op = rng.choice(ops)
        question, lines, answer = _GENERATORS[op](rng, rng.choice(NAMES), rng.choice(OBJECTS))
        if question in seen:
            continue
        seen.add(question)
        solution = "\n".join([*lines, f"{ANSWER_MARKER} {answer}"])
        out.append((question, solution, answer))
    return out


def load_problems(
    split: str,
    limit: int | None = None,
    seed: int = 0,
    difficulty: str = "medium",
) -> list[Problem]:
    """Generate arithmetic word problems.

    Args:
        split: "train" or "test" (disjoint by question text).
        limit: Number of problems; defaults to 2000 for train and 500 for
            test. The test split holds at most ``N_TEST`` (500) problems.
        seed: Generation seed; same (split, seed, difficulty) -> same problems.
        difficulty: "easy" (add/subtract), "medium" (add/subtract/multiply)
            or "hard" (also two-step problems).

    Raises:
        ValueError: unknown split or difficulty, or negative limit.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown arithmetic split {split!r}; allowed splits: {', '.join(SPLITS)}")
    if difficulty not in OPERATIONS_BY_DIFFICULTY:
        raise ValueError(f"unknown difficulty {difficulty!r}; allowed: {', '.join(DIFFICULTIES)}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if split == "test":
        n = N_TEST if limit is None else min(limit, N_TEST)
        items = _generate(n, seed, difficulty)
    else:
        n = DEFAULT_TRAIN_SIZE if limit is None else limit
        items = _generate(N_TEST + n, seed, difficulty)[N_TEST:]
    return [
        Problem(id=f"arith-{split}-{i}", question=q, gold=str(ans), solution=sol)
        for i, (q, sol, ans) in enumerate(items)
    ]


def messages_for(problem: Problem) -> list[dict[str, str]]:
    """Chat messages posing ``problem``: the system instruction, one worked example, the question."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        *DEMONSTRATION,
        {"role": "user", "content": problem.question},
    ]


_answers = NumericAnswers(ANSWER_MARKER)
is_correct = _answers.is_correct
strict_correct = _answers.strict_correct
lenient_correct = _answers.lenient_correct
trim_reply = _answers.trim_reply
