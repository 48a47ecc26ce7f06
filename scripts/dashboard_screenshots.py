"""Screenshots of the dashboard on a real data directory (docs/dashboard-*.png come from this).

    make demo   # or: eztinker demo --output-dir DIR
    .venv/bin/python scripts/dashboard_screenshots.py data/demo/server --model smollm2-135m --out docs

Starts `eztinker server` on the data directory, opens its newest run in headless Chromium (the
system's, as the tests use), and saves that run's page and the playground answering a question
with the run's newest checkpoint.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

from eztinker import ServiceClient
from eztinker.launcher import ServerProcess

QUESTION = "Tom has 12 apples and buys 7 more. How many apples does he have now?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    server = ServerProcess(
        model=args.model,
        data_dir=args.data_dir,
        log_file=args.out / ".screenshot-server.log",
        extra_args=["--device", "cpu"],
        startup_timeout=300,
    )
    try:
        runs = ServiceClient(server.url).list_runs()
        if not runs:
            raise SystemExit(f"no runs in {args.data_dir}: train one first (make demo)")
        run = max(runs, key=lambda r: r.step)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{server.url}/ui/#/runs/{run.id}")
            expect(page.locator("tr[data-step]")).to_have_count(
                len(ServiceClient(server.url).training_client(run.id).metrics().points)
            )
            page.screenshot(path=str(args.out / "dashboard-run.png"), full_page=True)
            if run.checkpoints:
                newest = run.checkpoints[-1]
                page.goto(f"{server.url}/ui/#/playground?model={run.id}/{newest.name}")
                page.fill("#playground-message", QUESTION)
                page.fill("#playground-temperature", "0")
                page.click("#playground-send")
                expect(page.locator("#playground-output")).to_have_attribute("data-done", "true", timeout=120_000)
                page.screenshot(path=str(args.out / "dashboard-playground.png"), full_page=True)
            browser.close()
    finally:
        server.stop()
    (args.out / ".screenshot-server.log").unlink(missing_ok=True)
    print(f"saved {args.out}/dashboard-run.png and dashboard-playground.png from run {run.id}")


if __name__ == "__main__":
    main()
