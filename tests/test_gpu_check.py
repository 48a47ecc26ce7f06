"""bench/gpu_check.py, the device check, runs: its --smoke mode on the CPU (tiny shapes, the GPU's
code path), and its engine-level imports pull in none of the server's packages, which the GPU
machine does not have."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HIDE_SERVER = """
import importlib.machinery, runpy, sys
class Hide:  # as on the GPU machine: no fastapi, uvicorn, starlette or httpx
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("fastapi", "uvicorn", "starlette", "httpx"):
            raise ImportError(name + " is not installed here")
sys.meta_path.insert(0, Hide())
sys.path.insert(0, "bench")
import gpu_check
print(sorted(m for m in ("fastapi", "uvicorn", "starlette", "httpx") if m in sys.modules))
"""


def test_the_check_imports_the_engine_without_the_server_packages():
    done = subprocess.run([sys.executable, "-c", HIDE_SERVER], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_the_smoke_mode_runs_every_section_and_writes_its_json(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    # The check lists what was imported when it loaded: in this test process, whatever earlier tests
    # imported too (a fresh process, as on the GPU machine, is the test above).
    loaded_before = {m for m in ("fastapi", "uvicorn", "starlette", "httpx") if m in sys.modules}
    import gpu_check

    out = tmp_path / "check.json"
    report = gpu_check.main(["--smoke", "--out", str(out), "--budget-seconds", "600"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report, default=str))
    sections = report["sections"]
    assert set(sections) == {"environment", "agreement", "sampling_throughput", "training_throughput", "peak_memory"}
    errors = {name: s["error"] for name, s in sections.items() if "error" in s}
    assert not errors
    assert set(sections["environment"]["server_modules_imported_by_engine"]) <= loaded_before
    agreement = sections["agreement"]
    for layout in ("shared_prompts", "copied_prompts"):
        assert agreement[f"tiny-peaked/{layout}"]["tokens"] > 0
        assert agreement[f"tiny-peaked/{layout}"]["kl_sample_train_v2"] < 1e-3
    assert agreement["tiny-peaked/checkpointing_grad_rel_diff"] < 1e-2
    assert not agreement["tiny-peaked/copied_prompts"]["shared_prompt_cache_used"]
    sampling = sections["sampling_throughput"]
    assert sampling["tokens_made"] > 0 and sampling["ours_tokens_per_s"] > 0 and sampling["generate_tokens_per_s"] > 0
    training = sections["training_throughput"]
    assert all(training[k] > 0 for k in ("ours_seconds", "ours_checkpointed_seconds", "peft_seconds"))
    assert sections["peak_memory"]["qwen2-0.5b"]["microbatch_tokens"] == 8192  # the CPU's fixed budget
    from eztinker.engine import device_paths

    assert device_paths.cpu_kernels("cpu")  # the check's portable-kernels switch is off again
