"""Tests for eztinker.verify: final-answer extraction, Math-Verify grading and its fallbacks."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from eztinker import verify
from eztinker.verify import (
    evaluate_answer,
    extract_final_answer,
    gsm8k_gold,
    last_boxed,
    last_number,
    last_option_letter,
    option_letter,
    strict_answer,
    strict_option,
)

REASONING = (
    "Natalia sold 48 clips in April.\n"
    "In May she sold half as many: 48 / 2 = 24.\n"
    "Altogether she sold 48 + 24 = 72 clips.\n"
    "#### 72"
)


@pytest.fixture(scope="module", autouse=True)
def _pool_lifecycle():
    yield
    verify.shutdown_verifier_pool()


# ------------------------------------------------------------------------------ acceptance
@pytest.mark.parametrize(
    ("response", "gold"),
    [
        ("The answer is 72.", "72"),
        ("\\boxed{72}", "72"),
        ("#### 72", "72"),
        ("72.0", "72"),
        ("Answer: 72", "72"),
        ("$1,000", "1000"),
        ("-3", "-3"),
        (REASONING, "72"),
        ("So we get \\boxed{\\frac{1}{2}}", "0.5"),  # only Math-Verify can see this one
    ],
)
def test_accepts_correct_answers(response, gold):
    result = evaluate_answer(response, gold, question="How many?")
    assert result["is_correct"] is True
    assert result["strategy"] == "math_verify"
    assert result["confidence"] == 1.0


@pytest.mark.parametrize(
    ("response", "gold"),
    [
        ("The answer is 71.", "72"),
        # 72 appears only mid-reasoning; the final answer given is 70.
        ("First 72 apples... so the answer is 70.", "72"),
        ("We find \\boxed{72} is wrong, so the result is \\boxed{70}", "72"),
    ],
)
def test_rejects_wrong_final_answers(response, gold):
    result = evaluate_answer(response, gold)
    assert result["is_correct"] is False
    assert result["strategy"] == "math_verify"


def test_no_number_is_no_answer():
    result = evaluate_answer("I don't know", "72")
    assert result == {
        "is_correct": False,
        "confidence": 0.0,
        "strategy": "no_answer",
        "extracted": None,
    }


# ------------------------------------------------------------------------------ fallbacks
def test_zero_timeout_falls_back_to_numeric_check():
    assert evaluate_answer("The answer is 72.", "72", timeout=0) == {
        "is_correct": True,
        "confidence": 0.9,
        "strategy": "numeric_fallback",
        "extracted": "72",
    }
    wrong = evaluate_answer("The answer is 71.", "72", timeout=0)
    assert (wrong["is_correct"], wrong["strategy"]) == (False, "numeric_fallback")


def test_hung_math_verify_is_cut_off_and_pool_recovers():
    evaluate_answer("#### 1", "1")  # make sure the pool is warm, so only the job is timed
    start = time.monotonic()
    # SymPy tries to evaluate this tower exactly and never returns.
    result = evaluate_answer("\\boxed{2^{2^{2^{2^{100}}}}}", "5", timeout=0.5)
    assert time.monotonic() - start < 3
    assert result["strategy"] != "math_verify" and result["is_correct"] is False
    # The stuck worker was killed; a fresh pool serves the next call.
    assert evaluate_answer("#### 72", "72")["strategy"] == "math_verify"


def test_pool_failure_falls_back_to_numeric_check(monkeypatch):
    class ExplodingPool:
        def submit(self, *args, **kwargs):
            raise RuntimeError("pool unavailable")

    monkeypatch.setattr(verify, "_get_pool", ExplodingPool)
    result = evaluate_answer("Total: $1,000 dollars. Answer: 1,000", "1000")
    assert (result["is_correct"], result["strategy"], result["confidence"]) == (
        True,
        "numeric_fallback",
        0.9,
    )
    assert evaluate_answer("#### 999", "1000")["is_correct"] is False
    assert evaluate_answer("\\boxed{72 apples}", "72")["is_correct"] is True
    assert evaluate_answer("\\boxed{72\\%}", "72%")["is_correct"] is True
    # Not plain numbers: the fallback must not read "5\\pi" as 5 or "1/2" as 1.
    assert evaluate_answer("\\boxed{5\\pi}", "5")["strategy"] == "no_answer"
    assert evaluate_answer("\\boxed{1/2}", "1")["is_correct"] is False


def test_broken_pool_is_recreated():
    assert evaluate_answer("#### 72", "72")["strategy"] == "math_verify"
    for process in list(verify._pool._processes.values()):  # simulate crashed workers
        process.kill()
        process.join()
    assert evaluate_answer("#### 72", "72")["is_correct"] is True  # via fallback if needed
    assert evaluate_answer("#### 72", "72")["strategy"] == "math_verify"


# ------------------------------------------------------------------------------ threads
def test_concurrent_calls_match_sequential():
    base = [
        ("The answer is 72.", "72"),
        ("\\boxed{72}", "72"),
        ("#### 72", "72"),
        ("72.0", "72"),
        ("Answer: 72", "72"),
        ("$1,000", "1000"),
        ("-3", "-3"),
        (REASONING, "72"),
        ("The answer is 71.", "72"),
        ("I don't know", "72"),
        ("First 72 apples... so the answer is 70.", "72"),
        ("\\boxed{\\frac{1}{2}}", "0.5"),
        ("It costs $12.50 each. Answer: 12.5", "12.5"),
    ]
    cases = [(f"Step {i}: thinking...\n{r}", g) for i, (r, g) in enumerate(base * 3)]
    cases.append(("#### 41", "41"))
    assert len(cases) == 40
    sequential = [evaluate_answer(response, gold) for response, gold in cases]
    with ThreadPoolExecutor(max_workers=8) as threads:
        concurrent = list(threads.map(lambda case: evaluate_answer(*case), cases))
    assert concurrent == sequential
    assert sum(result["is_correct"] for result in sequential) == 31


# ------------------------------------------------------------------------------ helpers
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\\boxed{\\frac{1}{2}} and later 7", "\\frac{1}{2}"),
        ("\\boxed{3} then \\boxed{{4}}", "{4}"),
        ("72 apples\n#### 1,000", "1000"),
        ("Answer: 5 ... the answer is 6 (not 7)", "6"),
        ("We get 3, then 4.5.", "4.5"),
        ("no digits here", None),
    ],
)
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


def test_gsm8k_gold():
    assert gsm8k_gold("Half of 2000 is 1000.\n#### 1,000") == "1000"
    assert gsm8k_gold("#### -3") == "-3"
    with pytest.raises(ValueError, match="####"):
        gsm8k_gold("The answer is 5")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("We had 1,234 apples and gave away 34.", 34.0),
        ("It cost $1,234.50", 1234.5),
        ("The temperature is -3 degrees.", -3.0),
        ("Pages 3-4", 4.0),
        ("nothing", None),
    ],
)
def test_last_number(text, expected):
    assert last_number(text) == expected


def test_strict_answer():
    assert strict_answer("Answer: 42") == "42"
    assert strict_answer("Answer: 1 then fixed it. Answer: $1,000.") == "1000"
    assert strict_answer("Answer: -3.5") == "-3.5"
    assert strict_answer("The answer is 42") is None
    assert strict_answer("Answer: unknown, maybe 42") is None
    assert strict_answer("Final: 7", marker="Final:") == "7"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so \\boxed{\\frac{\\sqrt{3}}{2}} is it", "\\frac{\\sqrt{3}}{2}"),  # nested braces
        ("\\boxed {7}", "7"),
        ("\\boxed{unclosed", None),
        ("no box", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize(
    ("text", "choice", "strict", "lenient"),
    [
        ("The answer is (C).", "C", None, "C"),
        ("Answer: **B**", "B", "B", "B"),
        ("so \\boxed{D}", "D", None, "D"),
        ("(A) is wrong, (E) fits", "E", None, "E"),
        ("Answer: option C", "C", None, "C"),
        ("The answer is: \\text{B}", "B", None, "B"),
        ("A shelf holds 7, so C", None, None, "C"),  # only the lenient reading takes a bare letter
        ("Answer: Apples", None, None, None),
    ],
)
def test_option_letters(text, choice, strict, lenient):
    assert option_letter(text) == choice
    assert strict_option(text) == strict
    assert last_option_letter(text) == lenient
