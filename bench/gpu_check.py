"""The device check: one unattended run on one GPU (at most 8 minutes on an H100), results as JSON.

    python bench/gpu_check.py [--out bench/results/gpu_check.json] [--budget-seconds 450]
    python bench/gpu_check.py --smoke     # on the CPU, tiny shapes, under a minute (CI runs it)

Engine level only: the GPU machine has torch, transformers, peft, safetensors and accelerate but no
fastapi, uvicorn or pydantic, and no network. The engine's wire types need pydantic: where it is
not installed, the wheels `python bench/gpu_bundle.py` put under bench/.bundle/ are used (carry
that folder to the machine), and so is the Qwen2 tokenizer/config copied there beside them.
Sections (each timed; one that fails records its error and the rest still run):
  * environment: the device, versions, the measured bf16 matmul peak, the device placement;
  * engine_tests: tests/test_bf16.py, test_engine.py, test_plain_decoder.py with EZTINKER_TEST_DEVICE
    set to the device (skipped without pytest);
  * agreement: the sampler's logprobs against the trainer's (cookbook's kl_sample_train v1, v2) in
    bf16, prompts shared and copied, and activation checkpointing's gradients against none;
  * throughput: Qwen2-0.5B bf16 (random weights) sampling 64 rows x 256 tokens against transformers'
    generate, and a forward_backward of 8192 tokens against a plain peft training step, as a
    fraction of the measured peak;
  * memory: the peak of one training step and one sampling batch for Qwen2 0.5B / 1.5B / 7B.
docs/gpu.md says how to read the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bench" / ".bundle"
_SERVER_MODULES = ("fastapi", "uvicorn", "starlette")


def _bootstrap() -> str:
    """Make `eztinker` importable here: src/ on the path, pydantic (and pytest) from the bundle's
    wheels where pydantic is not installed."""
    sys.path.insert(0, str(ROOT / "src"))
    try:
        import pydantic  # noqa: F401

        return "installed"
    except ImportError:
        sys.path.insert(0, str(ROOT / "bench"))
        from gpu_bundle import WHEELS, unpack

        site = Path(tempfile.mkdtemp(prefix="eztinker-gpu-bundle-"))
        wheels = unpack(site) if WHEELS.is_dir() else []
        if not any(w.startswith("pydantic_core") for w in wheels):
            raise SystemExit(
                f"pydantic is not installed and {WHEELS} has none for this Python: run "
                "`python bench/gpu_bundle.py` on a machine with network access and carry bench/.bundle/"
            ) from None
        sys.path.insert(1, str(site))
        os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(site), os.environ.get("PYTHONPATH", "")])
        return f"bundle: {', '.join(wheels)}"


PYDANTIC_SOURCE = _bootstrap()

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from eztinker.chat import datum_from_tokens  # noqa: E402
from eztinker.device_placement import place_models  # noqa: E402
from eztinker.engine import Engine, SampleSpec, device_paths, memory, prompt_attention  # noqa: E402
from eztinker.engine.models import BaseModel, _pad_token_id, _stop_token_ids  # noqa: E402
from eztinker.types import AdamParams, LoraConfig, SamplingParams  # noqa: E402

SERVER_IMPORTED = sorted(m for m in _SERVER_MODULES if m in sys.modules)  # the engine must not pull these in
LORA = LoraConfig(rank=16, alpha=32)
QWEN2 = {  # the public Qwen2 configs (Hugging Face config.json), over the 0.5B's shared one
    "qwen2-0.5b": {},
    "qwen2-1.5b": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_window_layers=28,
        tie_word_embeddings=True,
    ),
    "qwen2-7b": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_window_layers=28,
        tie_word_embeddings=False,
        vocab_size=152064,
    ),
}
# --smoke times float32 on the CPU (no bf16 units there; the agreement section stays bf16).
DTYPE = {True: torch.float32, False: torch.bfloat16}
SMOKE_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_window_layers=2,
)


# ------------------------------------------------------------------------------- plumbing
class Check:
    """The report: sections run in order, each under the time left; errors recorded, not raised."""

    def __init__(self, args):
        self.args, self.start = args, time.perf_counter()
        self.report: dict = {"smoke": args.smoke, "sections": {}}

    def left(self) -> float:
        return self.args.budget_seconds - (time.perf_counter() - self.start)

    def section(self, name: str, needs_seconds: float, run) -> None:
        if self.left() < needs_seconds:
            self.report["sections"][name] = {
                "skipped": f"{self.left():.0f} s left of the budget, needs {needs_seconds:.0f}"
            }
            return
        print(f"[{time.perf_counter() - self.start:6.1f} s] {name} ...", flush=True)
        start = time.perf_counter()
        try:
            result = run()
        except Exception as exc:  # recorded: the other sections still run
            result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
        result["seconds"] = round(time.perf_counter() - start, 2)
        self.report["sections"][name] = result
        self.save()
        _free()

    def save(self) -> None:
        self.report["seconds"] = round(time.perf_counter() - self.start, 1)
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(self.report, indent=2, default=str) + "\n")


def _free() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn, repeats: int = 1) -> float:
    """The best of `repeats` timed calls (after the caller's warm-up)."""
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def config_dir() -> Path:
    """The Qwen2-0.5B-Instruct config and tokenizer: ../shared's, else the bundle's copy."""
    from eztinker.tiny import QWEN2_CONFIG, find_shared_dir

    shared = find_shared_dir()
    for candidate in ([shared / QWEN2_CONFIG] if shared else []) + [BUNDLE / "qwen2-0.5b-instruct-config"]:
        if (candidate / "config.json").exists():
            return candidate
    raise FileNotFoundError(
        "no Qwen2 config: ../shared/models/qwen2-0.5b-instruct-config or bench/.bundle/ "
        "(python bench/gpu_bundle.py copies it there)"
    )


def random_base(name: str, overrides: dict, device: torch.device, dtype: torch.dtype, scale: float = 1.0) -> BaseModel:
    """A random-weight model of the Qwen2 config with `overrides`, built on `device` (no files)."""
    folder = config_dir()
    raw = json.loads((folder / "config.json").read_text())
    raw.pop("torch_dtype", None)
    raw.update(overrides)
    config = AutoConfig.for_model(**raw)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.device(device):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if scale != 1.0:  # peaked distributions (a random 0.02-init model's are nearly flat)
        with torch.no_grad():
            for param in model.parameters():
                if param.dim() == 2:
                    param.mul_(scale)
    model.eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return BaseModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        stop_token_ids=_stop_token_ids(model, tokenizer),
        pad_token_id=_pad_token_id(tokenizer),
        source=str(folder),
    )


def random_tokens(count: int, length: int, seed: int) -> list[list[int]]:
    rng = torch.Generator().manual_seed(seed)
    return torch.randint(100, 20000, (count, length), generator=rng).tolist()


def training_data(count: int, length: int, seed: int):
    return [datum_from_tokens(t[: length // 2], t[length // 2 :] + [t[0]]) for t in random_tokens(count, length, seed)]


# ------------------------------------------------------------------------------- sections
def environment(device: torch.device) -> dict:
    import peft
    import transformers

    info = {
        "device": str(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "pydantic": PYDANTIC_SOURCE,
        "server_modules_imported_by_engine": SERVER_IMPORTED,
    }
    gpus = torch.cuda.device_count()
    info["visible_gpus"] = gpus
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    info["placement_of_three_models"] = place_models(["a", "b", "c"], [], gpus)
    info["bf16_matmul_peak_tflops"] = round(matmul_peak(device, torch.bfloat16) / 1e12, 4)
    return info


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """Measured matmul FLOP/s in `dtype`: the best of a few large square products."""
    sizes = (8192,) if device.type == "cuda" else (512,)
    best = 0.0
    for n in sizes:
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        a @ b
        best = max(best, 2 * n**3 / _timed(device, lambda a=a, b=b: a @ b, repeats=5))
    return best


def engine_tests(device: torch.device) -> dict:
    try:
        import pytest  # noqa: F401
    except ImportError:  # the bundle's pytest, for the test process
        sys.path.insert(0, str(ROOT / "bench"))
        from gpu_bundle import WHEELS, unpack

        site = Path(tempfile.mkdtemp(prefix="eztinker-gpu-pytest-"))
        if not WHEELS.is_dir() or not any(w.startswith("pytest-") for w in unpack(site)):
            return {"skipped": "pytest is not installed and bench/.bundle/ has none (python bench/gpu_bundle.py)"}
        os.environ["PYTHONPATH"] = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    files = ["tests/test_bf16.py", "tests/test_engine.py", "tests/test_plain_decoder.py"]
    env = dict(os.environ, EZTINKER_TEST_DEVICE=str(device), HF_HUB_OFFLINE="1")
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        completed = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *files],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        failures = []
        if junit.exists():
            import xml.etree.ElementTree as ET

            for case in ET.parse(junit).iter("testcase"):
                for kind in ("failure", "error"):
                    problem = case.find(kind)
                    if problem is not None:
                        failures.append(
                            {
                                "test": f"{case.get('classname')}::{case.get('name')}",
                                "message": (problem.get("message") or "")[:400],
                            }
                        )
    summary = completed.stdout.strip().splitlines()[-1:] if completed.stdout else []
    return {
        "device": str(device),
        "files": files,
        "returncode": completed.returncode,
        "summary": summary,
        "failures": failures,
        "stderr_tail": completed.stderr[-1500:],
    }


def agreement(device: torch.device, smoke: bool) -> dict:
    """kl_sample_train in bf16 with prompts shared (two-part attention) and copied, on a peaked
    tiny model and on Qwen2-0.5B's shape; checkpointed gradients against plain ones."""
    results = {}
    shapes = (
        {"tiny-peaked": (SMOKE_SHAPE, 10.0)} if smoke else {"tiny-peaked": (SMOKE_SHAPE, 10.0), "qwen2-0.5b": ({}, 1.0)}
    )
    for name, (shape, scale) in shapes.items():
        base = random_base(name, shape, device, torch.bfloat16, scale=scale)
        engine = Engine(base)
        engine.warm_up()  # as the backend does: weights packed before any timed call
        engine.create_run("r", LORA, seed=1)
        engine.forward_backward("r", training_data(2, 24, seed=2))
        engine.optim_step("r", AdamParams(learning_rate=5e-2))
        for layout, (prompts, samples, tokens) in {
            "shared_prompts": (random_tokens(1, 40 if smoke else 200, 3) * 2, 16, 16),
            "copied_prompts": (random_tokens(4, 24, 4), 2, 16),
        }.items():
            if smoke:
                prompts, samples, tokens = prompts[:2], min(samples, 4), 6
            prompts = [p + [i + 7] * (i + 1) for i, p in enumerate(prompts)]  # distinct prompts
            shared_steps = []
            with _counting(prompt_attention.SharedPromptCache, "attend", shared_steps):
                [sampled] = engine.sample(
                    [SampleSpec("r", prompts, samples, SamplingParams(max_tokens=tokens, seed=5))]
                )
            diffs = []
            for prompt, candidates in zip(prompts, sampled):
                data = [datum_from_tokens(prompt, c.tokens) for c in candidates]
                for c, row in zip(candidates, engine.forward_backward("r", data, forward_only=True).logprobs):
                    diffs += [s - t for s, t in zip(c.logprobs, row[len(prompt) - 1 :])]
            d = torch.tensor(diffs, dtype=torch.float64)
            results[f"{name}/{layout}"] = {
                "tokens": len(diffs),
                "shared_prompt_cache_used": bool(shared_steps),
                "kl_sample_train_v1": float(d.mean()),
                "kl_sample_train_v2": float(0.5 * (d**2).mean()),
                "max_abs_diff": float(d.abs().max()),
                "ok": bool(abs(d.mean()) < 1e-3 and 0.5 * (d**2).mean() < 1e-3),
            }
        grads = {}
        for checkpoint in (False, True):
            engine.activation_checkpointing = checkpoint
            engine.forward_backward("r", training_data(4, 64, seed=6))
            grads[checkpoint] = torch.cat([p.grad.flatten().float() for p in engine._runs["r"].params])
            engine._runs["r"].optimizer.zero_grad(set_to_none=True)
        rel = float((grads[True] - grads[False]).norm() / grads[False].norm().clamp_min(1e-30))
        results[f"{name}/checkpointing_grad_rel_diff"] = rel
        engine.close()
        del engine, base
        _free()
    return results


@contextlib.contextmanager
def _counting(cls, method: str, calls: list):
    """Within: each call of cls.method appends to `calls` (which path the sampler took)."""
    original = getattr(cls, method)
    setattr(cls, method, lambda self, *args: calls.append(1) or original(self, *args))
    try:
        yield
    finally:
        setattr(cls, method, original)


def sampling_throughput(device: torch.device, smoke: bool) -> dict:
    rows, tokens, prompts_n = (4, 4, 2) if smoke else (64, 256, 8)
    base = random_base("qwen2-0.5b", SMOKE_SHAPE if smoke else {}, device, DTYPE[smoke])
    engine = Engine(base)
    engine.warm_up()  # as the backend does: weights packed before any timed call
    engine.create_run("r", LORA, seed=1)
    prompts = random_tokens(prompts_n, 64, seed=7)
    never_stop = SamplingParams(max_tokens=tokens, seed=1)

    def ours(max_tokens: int) -> int:
        params = never_stop.model_copy(update={"max_tokens": max_tokens})
        [out] = engine.sample([SampleSpec("r", prompts, rows // prompts_n, params)])
        return sum(len(c.tokens) for candidates in out for c in candidates)

    ours(4)  # warm-up
    seconds_ours = _timed(device, lambda: ours(tokens))
    seconds_one = _timed(device, lambda: ours(1))
    made = ours(tokens)
    model = engine.adapters.peft.base_model.model if engine.adapters.peft is not None else base.model
    input_ids = torch.tensor([p for p in prompts for _ in range(rows // prompts_n)], device=device)

    def generate(new: int):
        with engine.adapters.through("r"), torch.no_grad():
            return model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=True,
                max_new_tokens=new,
                min_new_tokens=new,
                top_k=0,
                top_p=1.0,
                temperature=1.0,
                pad_token_id=base.pad_token_id,
            )

    generate(4)
    seconds_theirs = _timed(device, lambda: generate(tokens))
    result = {
        "rows": rows,
        "tokens_per_row": tokens,
        "tokens_made": made,
        "ours_seconds": round(seconds_ours, 3),
        "generate_seconds": round(seconds_theirs, 3),
        "ours_tokens_per_s": round(made / seconds_ours, 1),
        "generate_tokens_per_s": round(rows * tokens / seconds_theirs, 1),
        "speedup_vs_generate": round(seconds_theirs / seconds_ours, 2),
        "decode_step_ms": round(1000 * (seconds_ours - seconds_one) / max(1, tokens - 1), 2),
        "goal": ">= 5x generate, decode step of 64 rows < 10 ms",
    }
    engine.close()
    return result


def training_throughput(device: torch.device, smoke: bool, peak: float) -> dict:
    count, length = (4, 32) if smoke else (16, 512)
    shape = SMOKE_SHAPE if smoke else {}
    base = random_base("qwen2-0.5b", shape, device, DTYPE[smoke])
    data = training_data(count, length, seed=8)
    flops = 2 * forward_flops(base.model.config, count, length)  # forward + the inputs' gradients (frozen base)
    results = {"tokens": count * length, "model_flops_per_step": flops, "work": "2 x forward FLOPs (frozen base)"}
    # The engine lives only inside this call, so its memory is free before the peft comparison.
    results.update(_engine_step_results(base, data, device, smoke, flops, peak))
    _free()
    results["peft_seconds"] = round(peft_step_seconds(base, data, device, repeats=1 if smoke else 2), 3)
    results["peft_fraction_of_peak"] = round(flops / results["peft_seconds"] / peak, 3)
    results["speedup_vs_peft"] = round(results["peft_seconds"] / results["ours_seconds"], 2)
    results["goal"] = ">= 25% of the bf16 peak"
    return results


def _engine_step_results(base: BaseModel, data, device: torch.device, smoke: bool, flops: float, peak: float) -> dict:
    """Our engine's training step, with and without activation checkpointing."""
    results = {}
    engine = Engine(base)
    engine.warm_up()  # as the backend does: weights packed before any timed call
    engine.create_run("r", LORA, seed=1)
    for checkpoint in (True, False):
        engine.activation_checkpointing = checkpoint

        def step():
            engine.forward_backward("r", data)
            engine.optim_step("r", AdamParams(learning_rate=1e-4))

        if not smoke:
            step()
        seconds = _timed(device, step, repeats=1 if smoke else 2)
        key = "ours_checkpointed" if checkpoint else "ours"
        results[f"{key}_seconds"] = round(seconds, 3)
        results[f"{key}_fraction_of_peak"] = round(flops / seconds / peak, 3)
    engine.close()
    return results


def peft_step_seconds(base: BaseModel, data, device: torch.device, repeats: int) -> float:
    """A plain peft training step: LoRA on every linear layer, one padded batch, the model's loss."""
    import peft

    model = peft.get_peft_model(
        base.model, peft.LoraConfig(r=LORA.rank, lora_alpha=LORA.alpha, target_modules="all-linear")
    )
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    input_ids = torch.tensor([d.model_input.tokens for d in data], device=device)
    labels = torch.tensor([d.loss_fn_inputs.target_tokens for d in data], device=device)

    def step():
        logits = model(input_ids=input_ids).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    seconds = _timed(device, step, repeats=repeats)
    model.unload()
    return seconds


def forward_flops(config, count: int, length: int) -> float:
    """Matmul FLOPs of a forward over count x length tokens: the projections, the head, causal attention."""
    d, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * d // config.num_attention_heads
    per_token = layers * (2 * d * (2 * d + 2 * kv) + 2 * 3 * d * inter) + 2 * d * config.vocab_size
    attention = layers * 2 * 2 * d * length * length / 2 * count  # QK^T and PV, causal half
    return per_token * count * length + attention


def peak_memory(device: torch.device, smoke: bool) -> dict:
    results = {}
    for name, overrides in list(QWEN2.items())[:1] if smoke else QWEN2.items():
        if smoke:
            overrides = {**overrides, **SMOKE_SHAPE}
        base = random_base(name, overrides, device, DTYPE[smoke])
        engine = Engine(base)
        engine.warm_up()  # as the backend does: weights packed before any timed call
        weights = _allocated(device)
        engine.create_run("r", LORA, seed=1)
        count, length = (4, 32) if smoke else (16, 512)
        shape = memory.DecoderShape.of(base.model.config)
        estimate = memory.training_bytes_per_token(shape, DTYPE[smoke], engine.activation_checkpointing)
        _reset_peak(device)
        engine.forward_backward("r", training_data(count, length, seed=9))
        engine.optim_step("r", AdamParams(learning_rate=1e-4))
        train_peak = _peak(device)
        _reset_peak(device)
        rows, tokens = (8, 4) if smoke else (64, 128)
        engine.sample(
            [SampleSpec("r", random_tokens(8, 64, seed=10), rows // 8, SamplingParams(max_tokens=tokens, seed=2))]
        )
        sample_peak = _peak(device)
        results[name] = {
            "weights_gib": _gib(weights),
            "training_step_peak_gib": _gib(train_peak),
            "sampling_batch_peak_gib": _gib(sample_peak),
            "training_tokens": count * length,
            "microbatch_tokens": engine.microbatch_tokens,
            "activation_checkpointing": engine.activation_checkpointing,
            "estimated_activation_gib": _gib(estimate * min(count * length, engine.microbatch_tokens)),
            "sampling_rows_x_tokens": f"{rows} x {tokens} (prompts of 64)",
        }
        engine.close()
        del engine, base
        _free()
    return results


def _allocated(device: torch.device) -> int | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _gib(n: int | None) -> float | None:
    return None if n is None else round(n / 2**30, 3)


# ------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="The CPU, tiny shapes: that the check itself runs.")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_check.json"))
    parser.add_argument("--budget-seconds", type=float, default=450.0, help="Sections that would overrun are skipped.")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    check = Check(args)
    # On the CPU the GPU's code path: the CPU-only kernels off, as on the device.
    portable = device_paths.portable_kernels() if device.type == "cpu" else contextlib.nullcontext()
    with portable:
        environment_info: dict = {}
        check.section("environment", 0, lambda: environment_info.update(environment(device)) or environment_info)
        peak = environment_info.get("bf16_matmul_peak_tflops", 1.0) * 1e12 or 1.0
        if not args.smoke:
            check.section("engine_tests", 250, lambda: engine_tests(device))
        check.section("agreement", 20, lambda: agreement(device, args.smoke))
        check.section("sampling_throughput", 40, lambda: sampling_throughput(device, args.smoke))
        check.section("training_throughput", 30, lambda: training_throughput(device, args.smoke, peak))
        check.section("peak_memory", 60, lambda: peak_memory(device, args.smoke))
    check.save()
    print(f"wrote {args.out} in {check.report['seconds']} s", flush=True)
    return check.report


if __name__ == "__main__":
    main()
