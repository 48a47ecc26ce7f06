"""Offline tests for eztinker.tasks (GSM8K loading and generated arithmetic)."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from collections import Counter

import pytest

from eztinker.tasks import TASK_NAMES, Problem, aqua, arithmetic, competition_math, get_task, gsm8k


def _write_gsm8k(tmp_path, rows_by_split):
    for split, rows in rows_by_split.items():
        with (tmp_path / f"{split}.jsonl").open("w") as f:
            for q, a in rows:
                f.write(json.dumps({"question": q, "answer": a}) + "\n")
    return tmp_path


@pytest.fixture
def no_gsm8k_env(monkeypatch):
    monkeypatch.delenv(gsm8k.ENV_VAR, raising=False)


# ---------------------------------------------------------------- registry


def test_get_task_returns_modules():
    assert set(TASK_NAMES) == {"gsm8k", "arithmetic", "math", "aqua"}
    assert get_task("gsm8k") is gsm8k
    assert get_task("arithmetic") is arithmetic
    for name in TASK_NAMES:
        mod = get_task(name)
        assert callable(mod.load_problems) and callable(mod.messages_for)
        assert isinstance(mod.ANSWER_MARKER, str) and mod.ANSWER_MARKER


def test_get_task_unknown_lists_valid_names():
    with pytest.raises(ValueError, match="gsm8k.*arithmetic"):
        get_task("mmlu")


def test_problem_is_frozen():
    p = Problem(id="x", question="q", gold="1")
    assert p.solution is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.gold = "2"  # type: ignore[misc]


# ---------------------------------------------------------------- GSM8K


def test_gsm8k_full_splits(gsm8k_dir, no_gsm8k_env):
    train = gsm8k.load_problems("train", data_dir=gsm8k_dir)
    test = gsm8k.load_problems("test", data_dir=gsm8k_dir)
    assert len(train) == 7473
    assert len(test) == 1319
    assert train[0].gold == "72"
    assert train[0].id == "gsm8k-train-0"
    assert test[5].id == "gsm8k-test-5"
    assert train[0].question.startswith("Natalia sold clips")
    assert train[0].solution.endswith("#### 72") and "<<" not in train[0].solution
    for p in train + test:
        assert p.gold and "," not in p.gold
        assert re.fullmatch(r"-?[\d.]+", p.gold), p


def test_gsm8k_subset_is_deterministic(gsm8k_dir, no_gsm8k_env):
    a = gsm8k.load_problems("train", limit=50, seed=1, data_dir=gsm8k_dir)
    b = gsm8k.load_problems("train", limit=50, seed=1, data_dir=gsm8k_dir)
    c = gsm8k.load_problems("train", limit=50, seed=2, data_dir=gsm8k_dir)
    assert len(a) == 50 and len({p.id for p in a}) == 50
    assert a == b
    assert {p.id for p in a} != {p.id for p in c}
    # a smaller limit is a prefix of a larger one for the same seed
    assert gsm8k.load_problems("train", limit=10, seed=1, data_dir=gsm8k_dir) == a[:10]
    assert gsm8k.load_problems("test", limit=0, data_dir=gsm8k_dir) == []


def test_gsm8k_env_var_source(gsm8k_dir, monkeypatch):
    monkeypatch.setenv(gsm8k.ENV_VAR, str(gsm8k_dir))
    test = gsm8k.load_problems("test")
    assert len(test) == 1319


def test_gsm8k_data_dir_parsing(tmp_path, no_gsm8k_env):
    _write_gsm8k(
        tmp_path,
        {
            "train": [("Q1?", "a <<1+1=2>>2\n#### 1,234"), ("Q2?", "b\n#### -5")],
            "test": [("T?", "c\n#### 7")],
        },
    )
    train = gsm8k.load_problems("train", data_dir=tmp_path)
    assert [p.gold for p in train] == ["1234", "-5"]
    assert train[0] == Problem(id="gsm8k-train-0", question="Q1?", gold="1234", solution="a 2\n#### 1,234")
    assert gsm8k.load_problems("test", data_dir=str(tmp_path))[0].gold == "7"


def test_gsm8k_explicit_dir_beats_env(tmp_path, monkeypatch):
    good = _write_gsm8k(tmp_path, {"test": [("T?", "c\n#### 7")]})
    monkeypatch.setenv(gsm8k.ENV_VAR, str(tmp_path / "does-not-exist"))
    assert len(gsm8k.load_problems("test", data_dir=good)) == 1


def _assert_fix_message(err: Exception) -> None:
    msg = str(err)
    assert "--gsm8k-dir" in msg
    assert "EZTINKER_GSM8K_DIR" in msg
    assert "train.jsonl" in msg and "test.jsonl" in msg
    assert "datasets" in msg


def test_gsm8k_missing_dir_clear_error(tmp_path, no_gsm8k_env):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError) as exc:
        gsm8k.load_problems("test", data_dir=missing)
    assert isinstance(exc.value, gsm8k.DatasetUnavailableError)
    assert isinstance(exc.value, RuntimeError)
    assert str(missing) in str(exc.value)
    _assert_fix_message(exc.value)


def test_gsm8k_missing_env_dir_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(gsm8k.ENV_VAR, str(tmp_path / "nope"))
    with pytest.raises(gsm8k.DatasetUnavailableError) as exc:
        gsm8k.load_problems("train")
    assert gsm8k.ENV_VAR in str(exc.value)
    _assert_fix_message(exc.value)


def test_gsm8k_no_source_clear_error(monkeypatch, no_gsm8k_env):
    # Make `import datasets` fail even if it is installed: the Hub is unavailable.
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(gsm8k.DatasetUnavailableError) as exc:
        gsm8k.load_problems("test")
    _assert_fix_message(exc.value)
    assert exc.value.__cause__ is None


def test_gsm8k_bad_split(tmp_path):
    with pytest.raises(ValueError, match="train.*test"):
        gsm8k.load_problems("validation", data_dir=tmp_path)


def test_gsm8k_messages():
    p = Problem(id="gsm8k-test-0", question="What is 2+2?", gold="4")
    msgs = gsm8k.messages_for(p)
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert gsm8k.ANSWER_MARKER == "####"
    assert "####" in msgs[0]["content"]
    assert msgs[1]["content"] == "What is 2+2?"


def test_find_shared_gsm8k_dir_shape():
    d = gsm8k.find_shared_gsm8k_dir()
    if d is not None:
        assert d.is_dir() and d.parts[-3:] == ("shared", "data", "gsm8k")


# ---------------------------------------------------------------- arithmetic

_EQ = re.compile(r"^(\d+) ([-+*]) (\d+) = (\d+)$")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def _equations(p: Problem) -> list[tuple[int, str, int, int]]:
    *lines, last = p.solution.split("\n")
    assert last == f"Answer: {p.gold}"
    eqs = []
    for line in lines:
        m = _EQ.match(line)
        assert m, (p, line)
        eqs.append((int(m[1]), m[2], int(m[3]), int(m[4])))
    return eqs


def _kind(p: Problem) -> str:
    eqs = _equations(p)
    if len(eqs) == 2:
        return "two_step"
    return {"+": "add", "-": "sub", "*": "mul"}[eqs[0][1]]


@pytest.mark.parametrize("difficulty", arithmetic.DIFFICULTIES)
def test_arith_deterministic_and_sizes(difficulty):
    a = arithmetic.load_problems("train", seed=3, difficulty=difficulty)
    b = arithmetic.load_problems("train", seed=3, difficulty=difficulty)
    c = arithmetic.load_problems("train", seed=4, difficulty=difficulty)
    assert a == b and a != c
    assert len(a) == 2000
    assert len(arithmetic.load_problems("test", difficulty=difficulty)) == 500
    assert arithmetic.load_problems("test", limit=10_000, difficulty=difficulty)[-1].id == "arith-test-499"
    # prefix-stable limits
    assert arithmetic.load_problems("train", limit=20, seed=3, difficulty=difficulty) == a[:20]
    assert arithmetic.load_problems("train", limit=3000, seed=3, difficulty=difficulty)[:2000] == a


@pytest.mark.parametrize("difficulty", arithmetic.DIFFICULTIES)
@pytest.mark.parametrize("seed", [0, 1])
def test_arith_train_test_disjoint(difficulty, seed):
    train = arithmetic.load_problems("train", limit=5000, seed=seed, difficulty=difficulty)
    test = arithmetic.load_problems("test", seed=seed, difficulty=difficulty)
    train_q = {p.question for p in train}
    test_q = {p.question for p in test}
    assert len(train_q) == len(train) and len(test_q) == len(test)
    assert not train_q & test_q
    assert [p.id for p in test[:2]] == ["arith-test-0", "arith-test-1"]
    assert train[17].id == "arith-train-17"


@pytest.mark.parametrize("difficulty", arithmetic.DIFFICULTIES)
def test_arith_gold_is_correct(difficulty):
    for p in arithmetic.load_problems("train", difficulty=difficulty):
        assert re.fullmatch(r"\d+", p.gold) and int(p.gold) >= 0, p
        eqs = _equations(p)
        # each equation is right, and chains into the next one
        for i, (x, op, y, r) in enumerate(eqs):
            assert _OPS[op](x, y) == r, p
            assert r >= 0
            if i:
                assert x == eqs[i - 1][3]
        assert eqs[-1][3] == int(p.gold)
        # the operands come from the question, in order
        leaves = [eqs[0][0], eqs[0][2]] + [e[2] for e in eqs[1:]]
        assert [int(n) for n in re.findall(r"\d+", p.question)] == leaves, p


def test_arith_templates_parsed_independently():
    """Re-derive the answer from the question text alone for known phrasings."""
    rules = [
        (r"has (\d+) [a-z ]+ and buys (\d+) more\.", lambda a, b: a + b),
        (r"has (\d+) [a-z ]+ and gives away (\d+)\.", lambda a, b: a - b),
        (r"There are (\d+) [a-z]+ with (\d+) [a-z ]+ in each [a-z]+\. How many", lambda a, b: a * b),
    ]
    problems = arithmetic.load_problems("train", seed=0, difficulty="medium")
    checked = Counter()
    for p in problems:
        for i, (pattern, fn) in enumerate(rules):
            m = re.search(pattern, p.question)
            if m:
                assert str(fn(int(m[1]), int(m[2]))) == p.gold, p
                checked[i] += 1
    assert all(checked[i] > 20 for i in range(len(rules))), checked
    m = None
    for p in arithmetic.load_problems("train", difficulty="hard"):
        m = re.search(r"has (\d+) [a-z ]+, buys (\d+) more, and then gives away (\d+)\.", p.question)
        if m:
            assert int(p.gold) == int(m[1]) + int(m[2]) - int(m[3])
            break
    assert m is not None


def test_arith_difficulty_operation_mix():
    mixes = {
        d: Counter(_kind(p) for p in arithmetic.load_problems("train", difficulty=d)) for d in arithmetic.DIFFICULTIES
    }
    assert set(mixes["easy"]) == {"add", "sub"}
    assert set(mixes["medium"]) == {"add", "sub", "mul"}
    assert set(mixes["hard"]) == {"add", "sub", "mul", "two_step"}
    for d, mix in mixes.items():
        share = 1 / len(mix)
        for _, n in mix.items():
            assert abs(n / 2000 - share) < 0.05, (d, mix)
    # numbers stay small
    for p in arithmetic.load_problems("train", difficulty="medium"):
        x, op, y, _ = _equations(p)[0]
        lo, hi = (2, 9) if op == "*" else (2, 20)
        assert lo <= x <= hi and lo <= y <= hi, p
        if op == "-":
            assert y < x


def test_arith_variety():
    problems = arithmetic.load_problems("train", difficulty="medium")
    names = {n for p in problems for n in arithmetic.NAMES if re.search(rf"\b{n}\b", p.question)}
    objects = {o for p in problems for o in arithmetic.OBJECTS if f" {o}" in p.question}
    assert len(names) >= 15 and len(objects) >= 15
    assert len(arithmetic.NAMES) >= 20 and len(arithmetic.OBJECTS) >= 20
    for templates in (arithmetic._ADD, arithmetic._SUB, arithmetic._MUL):
        assert len(templates) >= 3


def test_arith_bad_args():
    with pytest.raises(ValueError, match="train.*test"):
        arithmetic.load_problems("dev")
    with pytest.raises(ValueError, match="easy.*medium.*hard"):
        arithmetic.load_problems("train", difficulty="expert")
    with pytest.raises(ValueError):
        arithmetic.load_problems("train", limit=-1)


def test_arith_messages():
    p = arithmetic.load_problems("test", limit=1)[0]
    msgs = arithmetic.messages_for(p)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert arithmetic.ANSWER_MARKER == "Answer:"
    assert "Answer: <number>" in msgs[0]["content"]
    assert msgs[-1]["content"] == p.question
    # The worked example is in the required format and is not one of the problems.
    example_question, example_reply = msgs[1]["content"], msgs[2]["content"]
    assert example_reply.endswith("Answer: 11")
    generated = {q.question for split in ("train", "test") for q in arithmetic.load_problems(split)}
    assert example_question not in generated
    assert p.solution.endswith(f"Answer: {p.gold}")


# ---------------------------------------------------------------- MATH and AQuA-RAT fixtures
def _write_jsonl(directory, split, rows):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


MATH_ROWS = [
    {"problem": "Compute $\\frac{2}{4}$.", "solution": "We simplify: $\\boxed{\\frac{1}{2}}$.", "level": "Level 1"},
    {"problem": "What is $\\sqrt{16}$?", "solution": "It is $\\boxed{4}$."},
    {"problem": "Solve for $x$.", "solution": "...", "answer": "\\{1, 2\\}"},  # MATH-500 style: an answer field
]


def test_math_loads_local_jsonl_and_takes_the_last_boxed_answer(tmp_path):
    folder = _write_jsonl(tmp_path, "test", MATH_ROWS)
    problems = competition_math.load_problems("test", data_dir=folder)
    assert [p.gold for p in problems] == ["\\frac{1}{2}", "4", "\\{1, 2\\}"]
    assert problems[0].id == "math-test-0" and problems[0].question == MATH_ROWS[0]["problem"]
    assert competition_math.load_problems("test", limit=2, seed=1, data_dir=folder) == competition_math.load_problems(
        "test", limit=2, seed=1, data_dir=folder
    )
    messages = get_task("math").messages_for(problems[0])
    assert [m["role"] for m in messages] == ["system", "user"] and "\\boxed{}" in messages[0]["content"]


def test_math_grades_latex_by_equivalence_and_format(tmp_path):
    half = competition_math.load_problems("test", data_dir=_write_jsonl(tmp_path, "test", MATH_ROWS))[0]
    assert competition_math.is_correct("So the answer is $\\boxed{0.5}$.", half)  # Math-Verify: 1/2 = 0.5
    assert competition_math.is_correct("$\\boxed{\\dfrac{1}{2}}$", half)
    assert not competition_math.is_correct("$\\boxed{\\frac{1}{3}}$", half)
    assert competition_math.strict_correct("Thus \\boxed{\\frac12}", half)
    assert not competition_math.strict_correct("The answer is 0.5", half)  # right, but not boxed
    assert competition_math.lenient_correct("The answer is 0.5", half)
    assert competition_math.trim_reply("x = \\boxed{\\frac{1}{2}}.\nAlso, more words") == "x = \\boxed{\\frac{1}{2}}."


def test_math_without_a_source_says_how_to_fix_it(monkeypatch, tmp_path):
    monkeypatch.delenv(competition_math.ENV_VAR, raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(gsm8k.DatasetUnavailableError) as exc:
        competition_math.load_problems("train")
    assert "--math-dir" in str(exc.value) and competition_math.ENV_VAR in str(exc.value)
    assert "DigitalLearningGmbH/MATH-lighteval" in str(exc.value)
    _write_jsonl(tmp_path, "train", [{"problem": "p", "solution": "no box"}])
    with pytest.raises(ValueError, match="no \\\\boxed"):
        competition_math.load_problems("train", data_dir=tmp_path)


AQUA_ROWS = [
    {
        "question": "A train runs 60 km in 1.5 h. Its speed in km/h?",
        "options": ["A)30", "B)40", "C)45", "D)50", "E)90"],
        "rationale": "60 / 1.5 = 40",
        "correct": "B",
    },
    {
        "question": "2 + 2 = ?",
        "options": ["A) 3", "B) 4", "C) 5", "D) 6", "E) 7"],
        "rationale": "Easy.",
        "correct": "b",
    },
]


def test_aqua_loads_local_jsonl_with_the_options_in_the_question(tmp_path):
    folder = _write_jsonl(tmp_path, "validation", AQUA_ROWS)
    problems = aqua.load_problems("validation", data_dir=folder)
    assert [p.gold for p in problems] == ["B", "B"]
    assert problems[0].question.endswith("Options:\nA) 30\nB) 40\nC) 45\nD) 50\nE) 90")
    assert problems[0].solution == "60 / 1.5 = 40\nAnswer: B"
    assert get_task("aqua") is aqua and "Answer: <letter>" in aqua.messages_for(problems[0])[0]["content"]
    _write_jsonl(tmp_path, "test", [{**AQUA_ROWS[0], "correct": "F"}])
    with pytest.raises(ValueError, match="'correct' must be one of A-E"):
        aqua.load_problems("test", data_dir=tmp_path)
    with pytest.raises(ValueError, match="expected an object with"):
        _write_jsonl(tmp_path, "train", [{"question": "q"}])
        aqua.load_problems("train", data_dir=tmp_path)


def test_aqua_grades_the_option_letter(tmp_path):
    problem = aqua.load_problems("validation", data_dir=_write_jsonl(tmp_path, "validation", AQUA_ROWS))[0]
    assert aqua.is_correct("60/1.5 = 40, so the answer is (B).", problem)
    assert aqua.strict_correct("60/1.5 = 40\nAnswer: B", problem)
    assert not aqua.strict_correct("The answer is B", problem)  # right, not in the asked format
    assert aqua.lenient_correct("I think B", problem) and not aqua.is_correct("I think B", problem)
    assert not aqua.is_correct("Answer: C", problem)
    assert aqua.trim_reply("40 km/h\nAnswer: B\nBut maybe C") == "40 km/h\nAnswer: B"


@pytest.mark.parametrize("recipe", ["rejection_sft", "dpo"])
def test_the_recipes_load_math_and_aqua_from_their_folders(tmp_path, recipe):
    import importlib

    from eztinker.recipes._rollouts import load_problems

    config_cls = importlib.import_module(f"eztinker.recipes.{recipe}").Config
    math_dir, aqua_dir = tmp_path / "math", tmp_path / "aqua"
    for split in ("train", "test"):
        _write_jsonl(math_dir, split, MATH_ROWS)
        _write_jsonl(aqua_dir, split, AQUA_ROWS)
    train, test = load_problems(
        config_cls(task="math", math_dir=math_dir, max_samples=2, eval_size=1), get_task("math")
    )
    assert (len(train), len(test)) == (2, 1) and train[0].id.startswith("math-train-")
    train, test = load_problems(
        config_cls(task="aqua", aqua_dir=aqua_dir, max_samples=5, eval_size=2), get_task("aqua")
    )
    assert (len(train), len(test)) == (2, 2) and {p.gold for p in test} == {"B"}


def test_every_task_module_is_a_task():
    from eztinker.tasks import TASK_NAMES, Task, get_task

    wanted = {name for name in dir(Task) if not name.startswith("_")} | set(Task.__annotations__)
    for name in TASK_NAMES:
        task = get_task(name)
        assert all(callable(getattr(task, w)) or w == "ANSWER_MARKER" for w in wanted), name
        assert isinstance(task.ANSWER_MARKER, str) and task.ANSWER_MARKER
