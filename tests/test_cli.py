"""The CLI's recipe flags are generated from the recipe's Config: same names, defaults, help."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from eztinker import cli
from eztinker.launcher import offline_env
from eztinker.recipes import rejection_sft
from eztinker.recipes.rejection_sft import Config
from eztinker.server.settings import ServerSettings

# The flags `eztinker rsft` had when they were written by hand: scripts and the README use them.
FLAGS_BEFORE = [
    "--task",
    "--server-url",
    "--api-key",
    "--gsm8k-dir",
    "--difficulty",
    "--max-samples",
    "--num-candidates",
    "--epochs",
    "--learning-rate",
    "--lr-decay",
    "--temperature",
    "--max-tokens",
    "--eval-size",
    "--batch-size",
    "--lora-rank",
    "--lora-alpha",
    "--seed",
    "--checkpoint",
    "--resume-from",
    "--output-dir",
]


def _options() -> dict:
    return {p.name: p for p in cli.rsft.params}


def test_every_config_field_but_reward_fn_is_a_flag_with_the_fields_default():
    fields = {f.name: f for f in dataclasses.fields(Config)}
    options = _options()
    assert set(options) == set(fields) - {"reward_fn"}
    for name, option in options.items():
        assert option.default == fields[name].default, name
        assert option.help and option.help == fields[name].metadata["help"], name
    assert set(FLAGS_BEFORE) <= {f for p in options.values() for f in p.opts}
    assert options["checkpoint"].secondary_opts == ["--no-checkpoint"]
    assert list(options["task"].type.choices) == ["gsm8k", "arithmetic", "math", "aqua"]
    assert list(options["difficulty"].type.choices) == ["easy", "medium", "hard"]
    assert (options["api_key"].envvar, options["gsm8k_dir"].envvar) == ("EZTINKER_API_KEY", "EZTINKER_GSM8K_DIR")


def test_rsft_help_lists_the_flags_with_their_defaults():
    result = CliRunner().invoke(cli.app, ["rsft", "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for flag in FLAGS_BEFORE:
        assert flag in result.output
    assert "Problem set.  [default: gsm8k]" in result.output
    assert "--checkpoint / --no-checkpoint" in result.output


@pytest.fixture()
def ran(monkeypatch) -> list[Config]:
    """The Configs the recipe's `main` was called with (it is not run)."""
    configs: list[Config] = []
    monkeypatch.setattr(rejection_sft, "main", lambda config: configs.append(config) or {})
    return configs


def test_rsft_flags_and_environment_variables_reach_the_config(ran, tmp_path):
    args = [
        "rsft",
        "--task",
        "arithmetic",
        "--epochs",
        "2",
        "--learning-rate",
        "1e-3",
        "--checkpoint",
        "--output-dir",
        str(tmp_path),
    ]
    env = {"EZTINKER_API_KEY": "secret", "EZTINKER_GSM8K_DIR": str(tmp_path / "gsm8k")}
    result = CliRunner().invoke(cli.app, args, env=env)
    assert result.exit_code == 0, result.output
    assert ran == [
        Config(
            task="arithmetic",
            epochs=2,
            learning_rate=1e-3,
            checkpoint=True,
            output_dir=tmp_path,
            api_key="secret",
            gsm8k_dir=tmp_path / "gsm8k",
        )
    ]


def test_rsft_rejects_a_value_outside_the_choices():
    result = CliRunner().invoke(cli.app, ["rsft", "--difficulty", "expert"])
    assert result.exit_code == 2 and "'expert' is not one of 'easy', 'medium', 'hard'" in result.output


class _FakeServer:
    url = "http://127.0.0.1:1"

    def __init__(self, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def test_demo_runs_the_preset_over_the_configs_defaults(ran, monkeypatch, tmp_path):
    import eztinker.launcher

    monkeypatch.setattr(eztinker.launcher, "ServerProcess", _FakeServer)
    args = ["demo", "--output-dir", str(tmp_path), "--epochs", "1"]
    result = CliRunner().invoke(cli.app, args, env={"EZTINKER_GSM8K_DIR": None})
    assert result.exit_code == 0, result.output
    # What the demo passed explicitly before its Config came from the preset and the defaults.
    assert ran == [
        Config(
            task="arithmetic",
            server_url=_FakeServer.url,
            api_key=None,
            gsm8k_dir=None,
            difficulty="medium",
            max_samples=64,
            num_candidates=4,
            epochs=1,
            learning_rate=1e-3,
            lr_decay=0.7,
            temperature=0.8,
            max_tokens=64,
            eval_size=200,
            batch_size=8,
            micro_batch_size=4,
            prompts_per_sample_call=32,
            lora_rank=1,
            lora_alpha=16.0,
            seed=0,
            checkpoint=True,
            resume_from=None,
            output_dir=tmp_path,
        )
    ]


@pytest.fixture()
def no_model_load(monkeypatch):
    """`eztinker server` fails the test if it gets as far as loading a model."""
    import eztinker.launcher

    def build_service(settings, bases=None):
        raise AssertionError("a model was loaded before the settings were checked")

    monkeypatch.setattr(eztinker.launcher, "build_service", build_service)


def test_server_reports_a_bad_setting_at_once_in_one_line(no_model_load, tmp_path):
    empty, missing = tmp_path / "empty.json", tmp_path / "missing.json"
    empty.write_text("{}")
    for args, message in [
        (["--api-keys-file", str(missing)], f"error: API keys file {missing}: No such file or directory"),
        (["--api-keys-file", str(empty)], f"error: API keys file {empty} holds no keys"),
        (["--api-key", " "], "error: --api-key: the API key is empty or blank"),
        (["--host", "0.0.0.0"], "error: binding to 0.0.0.0 exposes the server beyond this machine"),
    ]:
        start = time.monotonic()
        result = CliRunner().invoke(
            cli.app,
            ["server", "--model", "smollm2-135m", "--data-dir", str(tmp_path), *args],
            env={f"EZTINKER_{name.upper()}": None for name in ServerSettings.model_fields},
        )
        assert time.monotonic() - start < 1, args
        assert result.exit_code == 2, result.output
        assert result.output.startswith(message) and result.output.count("\n") == 1, result.output


def test_a_missing_keys_file_stops_eztinker_server_at_once(tmp_path):
    missing = tmp_path / "keys.json"
    command = [
        sys.executable,
        "-m",
        "eztinker.cli",
        "server",
        "--model",
        "smollm2-135m",
        "--data-dir",
        str(tmp_path),
        "--api-keys-file",
        str(missing),
    ]
    start = time.monotonic()
    done = subprocess.run(command, env=offline_env(), capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - start
    assert done.returncode == 2 and done.stdout == "", (done.stdout, done.stderr)
    assert done.stderr == f"error: API keys file {missing}: No such file or directory\n"
    assert elapsed < 5  # the interpreter and the CLI's imports (~0.5 s idle), not a model load (8 s)
