"""The web dashboard in a real browser: Debian's Chromium driven by Playwright against a real
`eztinker server` process with API keys, its runs trained through the SDK.

Screenshots go to the test's tmp dir; set EZTINKER_SCREENSHOTS=<dir> to keep them (docs/ has two).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect, sync_playwright
from support import EXAMPLE, FAST, slow_batch, train

from eztinker import ServiceClient
from eztinker.launcher import ServerProcess, offline_env

STEPS = 6


def chromium_executable() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("no system Chromium: install Debian's `chromium` (scripts/setup.sh does)", pytrace=False)
    return path


# One browser and one server for the module: each test trains its own runs and looks at them only.
@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        browser = playwright.chromium.launch(executable_path=chromium_executable(), args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("dashboard")
    keys = root / "keys.json"
    keys.write_text(json.dumps({"key-alice": "alice", "key-bob": "bob"}))
    with ServerProcess(
        model=str(tiny_model_dir),
        data_dir=root / "data",
        log_file=root / "server.log",
        extra_args=["--device", "cpu", "--api-keys-file", str(keys)],
        env=offline_env(),
        startup_timeout=120,
        poll_interval=0.05,
    ) as running:
        yield running


def screenshots_dir(tmp_path: Path) -> Path:
    return Path(os.environ.get("EZTINKER_SCREENSHOTS") or tmp_path)


def test_dashboard_lists_runs_plots_steps_downloads_checkpoints_and_samples(server, browser, tmp_path):
    alice = ServiceClient(server.url, api_key="key-alice")
    run = alice.create_training_run(lora_rank=4, seed=1)
    train(run, STEPS)
    run.save_state("after-6").result(timeout=60)
    bob_run = ServiceClient(server.url, api_key="key-bob").create_training_run(lora_rank=2)

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(server.url + "/")
    # No data without a key: the sign-in form, not the runs.
    expect(page.locator("#login-form")).to_be_visible()
    page.fill("#login-key", "wrong")
    page.click("#login-form button")
    expect(page.locator("#login-error")).to_have_text("That key was refused.")
    page.fill("#login-key", "key-alice")
    page.click("#login-form button")

    row = page.locator(f"tr[data-run='{run.run_id}']")
    expect(row).to_be_visible()
    expect(row).to_contain_text("4")  # rank
    expect(row.locator("td").nth(3)).to_have_text(str(STEPS))
    expect(row).to_contain_text("idle")
    assert page.locator(f"tr[data-run='{bob_run.run_id}']").count() == 0  # another user's run is not shown

    page.click(f"a[href='#/runs/{run.run_id}']")
    expect(page.locator("tr[data-step]")).to_have_count(STEPS)
    points = page.evaluate("window.eztinker.charts.loss_per_token.data")
    recorded = run.metrics().points
    assert points[0] == list(range(1, STEPS + 1)) == [p.step for p in recorded]
    assert points[1] == pytest.approx([p.loss_per_token for p in recorded])
    assert points[1][-1] < points[1][0]  # the curve shows the loss falling
    grad = page.evaluate("window.eztinker.charts.grad_norm.data")
    assert grad[1] == pytest.approx([p.grad_norm for p in recorded]) and all(g > 0 for g in grad[1])

    page.screenshot(path=str(screenshots_dir(tmp_path) / "dashboard-run.png"), full_page=True)

    # Jobs update live: a slow forward_backward shows as running (or queued), then completed.
    future = run.forward_backward(slow_batch(2000, examples=4))
    job_row = page.locator(f"tr[data-job='{future.job_id}']")
    expect(job_row).to_have_attribute("data-status", re.compile("pending|running"), timeout=10_000)
    expect(page.locator(".facts")).to_contain_text("working")
    future.result(timeout=60)
    expect(job_row).to_have_attribute("data-status", "completed", timeout=10_000)
    run.optim_step(FAST).result(timeout=60)
    expect(page.locator(".facts dd").nth(2)).to_have_text(str(STEPS + 1), timeout=10_000)
    expect(page.locator("tr[data-step]")).to_have_count(STEPS + 1)

    with page.expect_download() as download_info:
        page.click(f"[data-download='{run.run_id}/after-6']")
    download = download_info.value
    assert download.suggested_filename.endswith("after-6.tar")
    with tarfile.open(fileobj=io.BytesIO(Path(download.path()).read_bytes())) as tar:
        assert sorted(tar.getnames()) == ["adapter_config.json", "adapter_model.safetensors", "checkpoint_complete"]

    page.click("tr[data-checkpoint='after-6'] a")  # into the playground, on that checkpoint
    expect(page.locator("#playground-model")).to_have_value(f"{run.run_id}/after-6")
    page.fill("#playground-message", "Say something.")
    page.fill("#playground-max-tokens", "8")
    page.click("#playground-send")
    expect(page.locator("#playground-output")).to_have_attribute("data-done", "true", timeout=30_000)
    reply = page.locator("#playground-output .turn.assistant").inner_text()
    assert reply.startswith("Model: ") and len(reply) > len("Model: ")
    expect(page.locator("#playground-usage")).to_contain_text("8 completion tokens")
    page.screenshot(path=str(screenshots_dir(tmp_path) / "dashboard-playground.png"), full_page=True)


def test_run_metrics_follow_steps_and_loads(server):
    """The REST view the curves come from: one point per step, gradient accumulation summed, and
    a load rewinding the curve to its checkpoint."""
    client = ServiceClient(server.url, api_key="key-alice")
    run = client.create_training_run(lora_rank=4)
    first = run.forward_backward([EXAMPLE]).result(timeout=60)
    second = run.forward_backward([EXAMPLE, EXAMPLE]).result(timeout=60)
    partial = run.metrics().points
    assert [p.step for p in partial] == [1] and partial[0].grad_norm is None  # the step is under way
    assert partial[0].loss == pytest.approx(first.loss + second.loss)
    assert partial[0].num_tokens == first.num_tokens + second.num_tokens
    result = run.optim_step(FAST).result(timeout=60)
    run.save_state("one").result(timeout=60)
    train(run, 2)
    points = run.metrics().points
    assert [p.step for p in points] == [1, 2, 3]
    assert points[0].grad_norm == pytest.approx(result.grad_norm)
    assert points[0].loss_per_token == pytest.approx(points[0].loss / points[0].num_tokens)
    info = run.info()
    assert info.last_loss == pytest.approx(points[-1].loss_per_token) and info.status == "idle"
    assert info.updated_at is not None

    run.load_state("one").result(timeout=60)
    assert [p.step for p in run.metrics().points] == [1]
    train(run, 1)
    assert [p.step for p in run.metrics().points] == [1, 2]


def reply_datum(prompt: list[int], reply: list[int], weight: float):
    """prompt + reply; the reply's positions weigh `weight`, the prompt's nothing."""
    from eztinker import Datum, LossFnInputs, ModelInput

    tokens = prompt + reply
    return Datum(
        model_input=ModelInput(tokens=tokens[:-1]),
        loss_fn_inputs=LossFnInputs(
            target_tokens=tokens[1:], weights=[0.0] * (len(prompt) - 1) + [weight] * len(reply)
        ),
    )


def mean_nll(run, data) -> float:
    """By hand: minus the mean logprob of the reply tokens (every weighted position), from forward."""
    logprobs = run.forward(data).result(timeout=60).logprobs
    picked = [lp for datum, row in zip(data, logprobs) for w, lp in zip(datum.loss_fn_inputs.weights, row) if w]
    return -sum(picked) / len(picked)


def test_run_page_plots_mean_nll_and_lists_evaluations(server, browser, tmp_path):
    """The loss curve is the mean NLL per token for weights of ones and for weights normalised to
    sum to 1 alike; the run's recorded evaluations are listed."""
    alice = ServiceClient(server.url, api_key="key-alice")
    run = alice.create_training_run(lora_rank=4, seed=2)
    ones = [reply_datum([11, 12, 13], [21, 22, 23, 24], 1.0), reply_datum([14, 15], [25, 26], 1.0)]
    expected = [mean_nll(run, ones)]
    run.forward_backward(ones).result(timeout=60)
    run.optim_step(FAST).result(timeout=60)
    normalised = [reply_datum([11, 12, 13], [21, 22, 23, 24], 1 / 6), reply_datum([14, 15], [25, 26], 1 / 6)]
    expected.append(mean_nll(run, normalised))
    run.forward_backward(normalised).result(timeout=60)
    run.optim_step(FAST).result(timeout=60)
    run.save_state("two").result(timeout=60)
    report = {
        "checkpoint": "two",
        "harness": "lm-eval 0.4.13",
        "tasks": ["arc_easy"],
        "scores": {"arc_easy": {"acc,none": 0.25, "acc_stderr,none": 0.1, "acc_norm,none": 0.5}},
        "config": {"limit": 4},
    }
    recorded = httpx.post(
        f"{server.url}/v1/runs/{run.run_id}/evaluations", json=report, headers={"Authorization": "Bearer key-alice"}
    )
    assert recorded.status_code == 200, recorded.text
    refused = httpx.post(
        f"{server.url}/v1/runs/{run.run_id}/evaluations", json=report, headers={"Authorization": "Bearer key-bob"}
    )
    assert refused.status_code == 404  # another user's run is not there to record on

    page = browser.new_page(viewport={"width": 1280, "height": 1100})
    page.goto(server.url + "/")
    page.fill("#login-key", "key-alice")
    page.click("#login-form button")
    page.goto(f"{server.url}/#/runs/{run.run_id}")
    expect(page.locator("tr[data-step]")).to_have_count(2)
    points = page.evaluate("window.eztinker.charts.loss_per_token.data")
    assert points[0] == [1, 2]
    assert points[1] == pytest.approx(expected, rel=1e-4)  # not 6x too small on the normalised step
    expect(page.locator("tr[data-step='2'] td").nth(3)).to_have_text("1")  # the weight sum
    row = page.locator(f"tr[data-evaluation='{recorded.json()['id']}']")
    expect(row).to_contain_text("two")
    expect(row).to_contain_text("arc_easy")
    expect(row).to_contain_text("acc 0.25 · acc_norm 0.5")
    page.locator("details").first.evaluate("node => node.open = true")
    page.screenshot(path=str(screenshots_dir(tmp_path) / "dashboard-evaluations.png"), full_page=True)
