"""Answer checking for math word problems (GSM8K style): is a model's final answer right?

`evaluate_answer` is the main entry point. It picks the response's *final* answer (a number
that only appears mid-reasoning never counts), then asks Math-Verify whether it equals the
gold answer, and falls back to a plain float comparison if Math-Verify fails or is too slow.

Math-Verify enforces its own timeouts with `signal.alarm`, which only works in the main
thread. We disable those timeouts and instead run Math-Verify in a small process pool whose
futures we wait on with a deadline: that works from any thread, and a runaway SymPy
computation can be killed without harming the caller.

The smaller helpers (`last_number`, `strict_answer`, `gsm8k_gold`, `extract_final_answer`)
are shared with the rest of the package for lenient/strict format checks and logging.
"""

from __future__ import annotations

import atexit
import logging
import math
import multiprocessing
import os
import re
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool

__all__ = [
    "boxed_span",
    "evaluate_answer",
    "extract_final_answer",
    "gsm8k_gold",
    "last_boxed",
    "last_number",
    "last_option_letter",
    "option_letter",
    "shutdown_verifier_pool",
    "strict_answer",
    "strict_option",
]

# A number as written in prose: optional minus, optional thousands separators, optional
# decimals. The look-behind keeps "3-4" from reading as -4 and "1.5" from yielding "5".
_NUM = r"(?<![\d.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\d.])-?\.\d+"
_NUM_RE = re.compile(_NUM)
_ANSWER_MARKER_RE = re.compile(r"answer\s*(?:is\b|:)", re.IGNORECASE)
# Currency/percent signs, separators and LaTeX unit text that don't change the value.
_NOISE_RE = re.compile(r"\\(?:text|mathrm)\{[^{}]*\}|\\[$%!,; ]|[$%,]")
# After noise removal a usable answer is one number, optionally followed by unit words
# ("72 apples."). Anything else ("5\pi", "1/2", "2^{10}") is not a plain number.
_PLAIN_NUMBER_RE = re.compile(r"\s*(-?(?:\d+(?:\.\d+)?|\.\d+))(?:\s+[A-Za-z][A-Za-z\s]*)?\.?\s*")

_MAX_WORKERS = min(2, os.cpu_count() or 1)
_WARMUP_TIMEOUT = 120.0  # spawning a worker and importing SymPy can be slow on a busy box
_pool: ProcessPoolExecutor | None = None
_pool_lock = threading.Lock()


# ------------------------------------------------------------------------ answer extraction
def _clean(number: str) -> str:
    return number.replace(",", "")


def last_number(text: str) -> float | None:
    """The last number anywhere in `text` (the lenient check), or None."""
    numbers = _NUM_RE.findall(text)
    return float(_clean(numbers[-1])) if numbers else None


def strict_answer(text: str, marker: str = "Answer:") -> str | None:
    """The number directly after the LAST `marker` (the strict format check), or None."""
    start = text.rfind(marker)
    if start < 0:
        return None
    # Allow only whitespace, a currency sign or markdown bold between marker and number.
    match = re.compile(rf"[\s$*]*({_NUM})").match(text, start + len(marker))
    return _clean(match.group(1)) if match else None


def gsm8k_gold(answer_field: str) -> str:
    """The gold answer of a GSM8K `answer` field: the text after `####`, commas removed."""
    if "####" not in answer_field:
        raise ValueError(f"GSM8K answer field has no '####' final-answer line: {answer_field!r}")
    tail = answer_field.rsplit("####", 1)[1].strip()
    match = _NUM_RE.search(tail)
    return _clean(match.group(0)) if match else tail


def boxed_span(text: str) -> tuple[str, int] | None:
    """The contents of the last `\\boxed{...}` (nested braces honoured) and the index just past
    its closing brace; None if there is none or it never closed (a truncated generation)."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = start + len("\\boxed")
    while i < len(text) and text[i].isspace():
        i += 1
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            content = text[i + 1 : j].strip()
            return (content, j + 1) if content else None
    return None


def last_boxed(text: str) -> str | None:
    """Contents of the last `\\boxed{...}`, honouring nested braces; None if absent/unclosed."""
    span = boxed_span(text)
    return span[0] if span else None


def _number_after(text: str, pos: int) -> str | None:
    match = _NUM_RE.search(text, pos)
    return _clean(match.group(0)) if match else None


def extract_final_answer(text: str) -> str | None:
    """The response's final answer, by priority: last `\\boxed{}`, number after the last
    `####`, number after the last `Answer:`/`answer is`, else the last number. Taking the
    *last* marker is what rejects answers that only appear mid-reasoning."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    hashes = text.rfind("####")
    if hashes >= 0 and (number := _number_after(text, hashes + 4)) is not None:
        return number
    markers = list(_ANSWER_MARKER_RE.finditer(text))
    if markers and (number := _number_after(text, markers[-1].end())) is not None:
        return number
    numbers = _NUM_RE.findall(text)
    return _clean(numbers[-1]) if numbers else None


# A multiple-choice answer: "(C)", "C)", "C." or a bare "C", possibly in bold or \text{}.
_LETTER = r"[\s*:]*(?:\\text\{)?\(?([A-E])(?![A-Za-z])"


def option_letter(text: str) -> str | None:
    """The chosen option (A-E) of a multiple-choice reply, by priority: the last `\\boxed{}`
    holding one, the letter after the last `Answer:`/`answer is`, else the last parenthesised
    "(C)" or "C)"."""
    boxed = last_boxed(text)
    if boxed is not None and (match := re.fullmatch(r"\(?(?:\\text\{)?([A-E])\}?\)?", boxed)):
        return match.group(1)
    for marker in reversed(list(_ANSWER_MARKER_RE.finditer(text))):
        if match := re.compile(rf"(?:\s*option)?{_LETTER}").match(text, marker.end()):
            return match.group(1)
    letters = re.findall(r"(?<![A-Za-z])\(?([A-E])\)", text)
    return letters[-1] if letters else None


def strict_option(text: str, marker: str = "Answer:") -> str | None:
    """The letter (A-E) directly after the LAST `marker` (the strict format check), or None."""
    start = text.rfind(marker)
    if start < 0:
        return None
    match = re.compile(_LETTER).match(text, start + len(marker))
    return match.group(1) if match else None


def last_option_letter(text: str) -> str | None:
    """The last standalone capital A-E anywhere in `text` (the lenient check), or None."""
    letters = re.findall(r"(?<![A-Za-z])([A-E])(?![A-Za-z])", text)
    return letters[-1] if letters else None


def _plain_number(answer: str) -> str | None:
    """The number in `answer` if it is one plain number (units, $, %, commas ignored)."""
    match = _PLAIN_NUMBER_RE.fullmatch(_NOISE_RE.sub("", answer))
    return match.group(1) if match else None


# --------------------------------------------------------------------- Math-Verify in a pool
def _init_worker() -> None:
    # Import up front so the first real job isn't charged for it, and silence the
    # "timeout is disabled" warning: the parent process enforces the deadline.
    import math_verify  # noqa: F401

    logging.getLogger("math_verify").setLevel(logging.ERROR)


def _noop() -> None:
    return None


def _math_verify_worker(gold: str, prediction: str) -> bool | None:
    """Runs in a pool process. None means Math-Verify could not parse one of the sides."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    # no_fallback: an unparsable side yields [] (-> numeric check), not a raw-string match.
    gold_parsed = parse(gold, config, fallback_mode="no_fallback", parsing_timeout=None)
    pred_parsed = parse(prediction, config, fallback_mode="no_fallback", parsing_timeout=None)
    if not gold_parsed or not pred_parsed:
        return None
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def _get_pool() -> ProcessPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            # spawn: forking a process that runs threads (and maybe CUDA) is unsafe.
            pool = ProcessPoolExecutor(
                max_workers=_MAX_WORKERS,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
            )
            try:
                # Absorb start-up here, so per-call deadlines measure verification only;
                # otherwise a cold start could time out and get the pool killed, forever.
                pool.submit(_noop).result(timeout=_WARMUP_TIMEOUT)
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
            _pool = pool
        return _pool


def _discard_pool(pool: ProcessPoolExecutor, *, kill: bool) -> None:
    """Stop handing out `pool`; the next call builds a fresh one."""
    global _pool
    with _pool_lock:
        if _pool is pool:
            _pool = None
    if kill:
        # A job past its deadline may be stuck in SymPy for good, and a process can only be
        # stopped from outside by killing it. Other jobs in flight then fail over to the
        # numeric check. (Private attribute: the public terminate_workers() is 3.14+.)
        try:
            for process in list((getattr(pool, "_processes", None) or {}).values()):
                process.kill()
        except (RuntimeError, OSError):
            pass  # workers already exiting
    pool.shutdown(wait=False, cancel_futures=True)


def _math_verify(gold: str, prediction: str, timeout: float) -> bool | None:
    """Math-Verify's verdict, or None if it failed, could not parse, or ran out of time."""
    pool = None
    try:
        pool = _get_pool()
        future = pool.submit(_math_verify_worker, gold, prediction)
        try:
            return future.result(timeout=timeout)
        except FutureTimeout:
            if not future.cancel():  # already handed to a worker: it may never return
                _discard_pool(pool, kill=True)
            return None
    except BrokenProcessPool:
        if pool is not None:
            _discard_pool(pool, kill=False)
        return None
    except Exception:  # noqa: BLE001 - any Math-Verify/pool failure means "use the fallback"
        return None


def shutdown_verifier_pool() -> None:
    """Shut the Math-Verify worker pool down; it is recreated on the next call if needed."""
    global _pool
    with _pool_lock:
        pool, _pool = _pool, None
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)


atexit.register(shutdown_verifier_pool)


# ------------------------------------------------------------------------------ public check
def _as_boxed(answer: str) -> str:
    # A bare "72" is not found by Math-Verify's LaTeX extractor; inside \boxed{} it always is.
    if "\\boxed" in answer or "$" in answer:
        return answer
    return f"\\boxed{{{answer}}}"


def evaluate_answer(
    model_response: str,
    ground_truth: str,
    question: str | None = None,
    *,
    timeout: float = 5.0,
) -> dict:
    """Grade `model_response` against `ground_truth`.

    Returns {"is_correct", "confidence", "strategy", "extracted"} where strategy is
    "math_verify" (confidence 1.0), "numeric_fallback" (0.9) or "no_answer" (0.0).
    Math-Verify gets `timeout` seconds (<= 0 skips it); on timeout or error the numeric
    check decides. `question` is accepted for reward-function signatures but not needed
    for grading. Safe to call from many threads at once. The worker processes are spawned,
    so a script calling this must keep its top-level code under `if __name__ == "__main__":`.
    """
    del question
    extracted = extract_final_answer(model_response)
    if extracted is None:
        return _verdict(False, 0.0, "no_answer", None)

    gold_number = _plain_number(ground_truth)  # "$1,000" -> "1000"; LaTeX golds pass as-is
    gold = _as_boxed(gold_number if gold_number is not None else ground_truth)
    # Only the final answer goes to Math-Verify, so numbers from the reasoning can't match.
    # A zero budget means "don't try": a race against 0 s would make the strategy random.
    verdict = _math_verify(gold, _as_boxed(extracted), timeout) if timeout > 0 else None
    if verdict is not None:
        return _verdict(verdict, 1.0, "math_verify", extracted)

    predicted = _plain_number(extracted)
    if predicted is None:
        return _verdict(False, 0.0, "no_answer", extracted)
    correct = gold_number is not None and math.isclose(float(predicted), float(gold_number), rel_tol=1e-6, abs_tol=1e-9)
    return _verdict(correct, 0.9, "numeric_fallback", extracted)


def _verdict(is_correct: bool, confidence: float, strategy: str, extracted: str | None) -> dict:
    return {
        "is_correct": is_correct,
        "confidence": confidence,
        "strategy": strategy,
        "extracted": extracted,
    }
