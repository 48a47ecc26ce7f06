"""EZTinker against SkyRL's Tinker server: one workload through the official tinker SDK, run
against each server in turn, in one invocation, on the same model folder, threads and inputs.

    bench/peers/setup_skyrl.sh                        # once: SkyRL, uv, the client venv, the model
    $PEERS_DIR/client-venv/bin/python bench/peers/workload.py [--servers eztinker skyrl]

The client is tinker 0.25.0 for both servers (SkyRL 0.4.0 speaks SDK 0.25; SDK 0.38's sample()
asserts on the `sample_sequence_ids` SkyRL does not send). One server runs at a time; each gets
the same thread count (torch's OpenMP/MKL, XLA's Eigen pool). The workload (`drive`) runs in a
child process per server, so one server's SDK session cannot outlive it. Every call is timed
from submit to result; call 0 of each phase is its first call (JIT compilation, buffers), the
rest are steady. The server's CPU seconds (its whole process tree) are recorded beside the wall
time, since other jobs share this machine. Last, while the server still runs, a few steps of
tinker-cookbook's RL loop (cookbook_rl.py, in setup_skyrl.sh's cookbook-venv). Results:
bench/results/peers.json, docs/peers.png.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results" / "peers.json"
PLOT = ROOT / "docs" / "peers.png"
GSM8K = Path(os.environ.get("EZTINKER_SHARED_DIR", ROOT.parent / "shared")) / "data" / "gsm8k" / "train.jsonl"
LORA_RANK = 8
ADAM = dict(learning_rate=5e-4, beta1=0.9, beta2=0.95, eps=1e-8)
TEMPERATURE = 0.8
# Phases whose goal is 5x (small calls); every other steady phase has 2x.
SMALL_CALLS = ("optim_step", "round_trip_forward_1x8", "forward_backward_4x32")


# ------------------------------------------------------------------------------- servers
def thread_env(threads: int) -> dict:
    # The same thread counts for both servers (XLA's Eigen pool reads XLA_FLAGS, torch OMP/MKL).
    # No OMP_WAIT_POLICY=PASSIVE: on an idle machine it made EZTinker's small calls 1.5-2x slower
    # (a 1 x 8 forward 0.17-0.28 s against 0.11-0.13 s spinning; sampling 4 x 16 2.4-4.7 s
    # against 1.9-2.3 s), and XLA does not read it. (On a machine shared with other jobs the
    # opposite holds: there libgomp's spinning threads made torch 3x slower.)
    return {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "XLA_FLAGS": f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={threads}",
    }


def eztinker_command(args, run_dir: Path, port: int) -> tuple[list[str], dict]:
    command = [
        str(args.eztinker_python),
        "-m",
        "eztinker.cli",
        "server",
        "--model",
        str(args.model_dir),
        "--data-dir",
        str(run_dir / "data"),
        "--port",
        str(port),
        "--device",
        "cpu",
        "--log-level",
        "warning",
    ]
    return command, {"PYTHONPATH": str(ROOT / "src")}


def skyrl_command(args, run_dir: Path, port: int) -> tuple[list[str], dict]:
    # SkyRL refuses to start unless `uv run` launched it (it re-launches its engine the same way).
    # Adapter slots: the workload's 5 training clients and its sampler; rank 8. Its default
    # (32 slots of rank 32) ran the engine out of this machine's 24 GB at the first optim_step, and
    # micro-batches of 8 sequences took over 15 GB on the 32 GSM8K examples;
    # micro-batches of 4 sequences keep the 32-example batch's activations in memory (EZTinker
    # micro-batches by tokens on its own).
    command = [
        str(args.peers_dir / "uvtool" / "bin" / "uv"),
        "run",
        "--no-project",
        "--python",
        str(args.peers_dir / "skyrl-venv" / "bin" / "python"),
        "-m",
        "skyrl.tinker.api",
        "--base-model",
        str(args.model_dir),
        "--backend",
        "jax",
        "--backend-config",
        json.dumps({"max_lora_adapters": 8, "max_lora_rank": LORA_RANK, "train_micro_batch_size": 4}),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--database-url",
        f"sqlite:///{run_dir / 'tinker.db'}",
        "--checkpoints-base",
        str(run_dir / "checkpoints"),
    ]
    return command, {
        "PATH": f"{args.peers_dir / 'uvtool' / 'bin'}:{os.environ['PATH']}",
        "UV_CACHE_DIR": str(args.peers_dir / "uv-cache"),
    }


SERVERS = {"eztinker": eztinker_command, "skyrl": skyrl_command}


def process_tree(root: int) -> list[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    tree, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        tree += frontier
    return tree


def tree_stat(root: int) -> tuple[float, float]:
    """(CPU seconds, resident GB) of a process and its descendants."""
    cpu = rss = 0.0
    for pid in process_tree(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        cpu += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        rss += int(fields[21]) * os.sysconf("SC_PAGE_SIZE") / 1e9
    return cpu, rss


class Server:
    """One server as a process group of its own, watched for memory (SkyRL's engine has taken the
    whole machine's RAM before), stopped by its process group id."""

    def __init__(self, name: str, command: list[str], env: dict, log_file: Path, port: int, max_rss_gb: float):
        self.name, self.url, self.max_rss_gb, self.peak_rss_gb, self.killed = (
            name,
            f"http://127.0.0.1:{port}",
            max_rss_gb,
            0.0,
            "",
        )
        self.process = subprocess.Popen(
            command,
            env={**os.environ, **env},
            stdout=log_file.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._stop = threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self):
        while not self._stop.wait(2.0):
            rss = tree_stat(self.process.pid)[1]
            self.peak_rss_gb = max(self.peak_rss_gb, rss)
            if rss > self.max_rss_gb:
                self.killed = f"killed by the workload: {rss:.1f} GB resident > --max-rss-gb {self.max_rss_gb}"
                self.stop()

    def wait_ready(self, timeout: float = 600) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode} before it answered")
            try:
                with urllib.request.urlopen(f"{self.url}/api/v1/get_server_capabilities", timeout=5) as response:
                    return [m["model_name"] for m in json.load(response)["supported_models"]]
            except OSError:
                time.sleep(1)
        raise TimeoutError(f"{self.name} did not answer within {timeout:.0f} s")

    def stop(self):
        self._stop.set()
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


# ----------------------------------------------------------------------------- workload
def gsm8k_problems(n: int) -> list[dict]:
    with GSM8K.open() as f:
        return [json.loads(next(f)) for _ in range(n)]


def build_inputs(tokenizer) -> dict:
    """Token ids both servers get, built once from the model folder's tokenizer and GSM8K."""
    problems = gsm8k_problems(64)
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p["question"]}], tokenize=False, add_generation_prompt=True
        )
        for p in problems
    ]
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    stream = [t for p in problems for t in tokenizer(p["question"] + "\n" + p["answer"] + "\n\n")["input_ids"]]

    def windows(count: int, length: int, offset: int = 0) -> list[dict]:
        """`count` datums of `length` tokens cut from the GSM8K text, every position weighted."""
        out = []
        for i in range(count):
            ids = stream[offset + i * (length + 1) : offset + (i + 1) * (length + 1)]
            out.append({"tokens": ids[:-1], "targets": ids[1:], "weights": [1.0] * length})
        return out

    examples = []  # question -> reference solution, the prompt weighted 0 (as supervised fine-tuning)
    for p, ids in zip(problems[:32], prompt_ids):
        reply = tokenizer(p["answer"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        full = ids + reply
        examples.append(
            {"tokens": full[:-1], "targets": full[1:], "weights": [0.0] * (len(ids) - 1) + [1.0] * len(reply)}
        )
    return {
        "round_trip_1x8": windows(1, 8),
        "4x32": windows(4, 32),
        "8x128": windows(8, 128),
        "gsm8k32": examples,
        "clients_8x128": [windows(8, 128, offset=2000 + 1100 * c) for c in range(4)],
        "prompts": prompt_ids[:16],
    }


class Phases:
    """Per phase: each call's wall seconds and the server's CPU seconds, and the load before."""

    def __init__(self, server_pid: int):
        self.server_pid, self.data = server_pid, {}

    def time(self, name: str, fn, **extra):
        entry = self.data.setdefault(
            name, {"seconds": [], "server_cpu_seconds": [], "load_1min_before": os.getloadavg()[0]}
        )
        cpu0, start = tree_stat(self.server_pid)[0], time.perf_counter()
        out = fn()
        entry["seconds"].append(time.perf_counter() - start)
        entry["server_cpu_seconds"].append(tree_stat(self.server_pid)[0] - cpu0)
        for key, value in extra.items():
            entry.setdefault(key, []).append(value(out) if callable(value) else value)
        print(f"    {name}: {entry['seconds'][-1]:.3f} s", flush=True)
        return out


def drive(url: str, model: str, server_pid: int, out: Path, repeats: int) -> None:
    """The workload against one server (run in a child process)."""
    os.environ.setdefault("TINKER_TELEMETRY", "0")
    import tinker
    from tinker import types
    from transformers import AutoTokenizer

    inputs = build_inputs(AutoTokenizer.from_pretrained(model))
    service = tinker.ServiceClient(base_url=url, api_key="tml-peers-bench")
    phases = Phases(server_pid)
    adam = types.AdamParams(**ADAM)

    def datums(rows):
        return [
            types.Datum(
                model_input=types.ModelInput.from_ints(r["tokens"]),
                loss_fn_inputs={"target_tokens": r["targets"], "weights": r["weights"]},
            )
            for r in rows
        ]

    def mean_nll(result, rows) -> float:
        """-sum(weight * logprob) / sum(weight) from the returned logprobs: the same formula for
        both servers (SkyRL reports no loss:sum metric)."""
        total = sum(
            -w * lp for r, o in zip(rows, result.loss_fn_outputs) for w, lp in zip(r["weights"], o["logprobs"].tolist())
        )
        return total / sum(sum(r["weights"]) for r in rows)

    client = phases.time(
        "create_training_client", lambda: service.create_lora_training_client(base_model=model, rank=LORA_RANK, seed=0)
    )
    trip = datums(inputs["round_trip_1x8"])
    for _ in range(1 + repeats):
        phases.time("round_trip_forward_1x8", lambda: client.forward(trip, "cross_entropy").result())
    losses = {}
    for shape, steps in (("4x32", repeats + 1), ("8x128", repeats + 1), ("gsm8k32", max(2, repeats // 2) + 1)):
        rows = inputs[shape]
        batch = datums(rows)
        for _ in range(steps):
            result = phases.time(
                f"forward_backward_{shape}",
                lambda batch=batch: client.forward_backward(batch, "cross_entropy").result(),
            )
            losses.setdefault(shape, []).append(mean_nll(result, rows))
            phases.time("optim_step", lambda: client.optim_step(adam).result())
    paths = [
        phases.time(
            "save_weights_for_sampler", lambda i=i: client.save_weights_for_sampler(name=f"peers{i}").result().path
        )
        for i in range(1 + max(1, repeats // 2))
    ]
    sampler = service.create_sampling_client(model_path=paths[-1])

    def tokens(results) -> int:
        return sum(len(s.tokens) for r in results for s in r.sequences)

    prompt0 = types.ModelInput.from_ints(inputs["prompts"][0])
    for i in range(1 + repeats):
        phases.time(
            "sample_4x16",
            lambda i=i: [
                sampler.sample(
                    prompt0, 4, types.SamplingParams(max_tokens=16, temperature=TEMPERATURE, seed=i)
                ).result()
            ],
            tokens=tokens,
        )
    prompts = [types.ModelInput.from_ints(p) for p in inputs["prompts"]]
    for i in range(1 + max(1, repeats // 2)):

        def candidates(i=i):  # all 16 requests in flight at once, as a rejection-sampling round sends them
            futures = [
                sampler.sample(p, 8, types.SamplingParams(max_tokens=128, temperature=TEMPERATURE, seed=100 * i + j))
                for j, p in enumerate(prompts)
            ]
            return [f.result() for f in futures]

        phases.time("sample_16x8x128", candidates, tokens=tokens)

    clients = [
        phases.time(
            "create_training_client",
            lambda c=c: service.create_lora_training_client(base_model=model, rank=LORA_RANK, seed=1 + c),
        )
        for c in range(4)
    ]
    client_batches = [datums(rows) for rows in inputs["clients_8x128"]]
    for _ in range(1 + max(1, repeats // 2)):

        def interleaved():  # every client's forward_backward + optim_step submitted before any wait
            futures = [
                (c.forward_backward(b, "cross_entropy"), c.optim_step(adam)) for c, b in zip(clients, client_batches)
            ]
            return [(fb.result(), step.result()) for fb, step in futures]

        phases.time("four_clients_fb_optim_8x128", interleaved)
    out.write_text(
        json.dumps(
            {
                "phases": phases.data,
                "losses": losses,
                "sdk": tinker.__version__ if hasattr(tinker, "__version__") else None,
            }
        )
    )


def run_client(server: Server, command: list[str], run_dir: Path) -> None:
    """Runs a client process against `server` to its end; stops it if the server dies first (the
    SDK retries against a dead server for ever)."""
    client = subprocess.Popen(command)
    while client.poll() is None:
        if server.process.poll() is not None:
            client.kill()
            raise RuntimeError(
                f"{server.name} exited ({server.killed or server.process.returncode}); log {run_dir / 'server.log'}"
            )
        time.sleep(1)
    if client.returncode:
        raise RuntimeError(f"{Path(command[1]).name} against {server.name} failed ({client.returncode})")


def cookbook_rl(python: Path, server: Server, model: str, run_dir: Path) -> dict:
    """A few steps of tinker-cookbook's RL loop (cookbook_rl.py, in its own venv) against `server`,
    as a phase entry like `Phases`' own: the cookbook times its steps inside its process, so each
    step's server CPU is the loop's mean (its start and final checkpoint included)."""
    out = run_dir / "cookbook_rl.json"
    load, cpu = os.getloadavg()[0], tree_stat(server.process.pid)[0]
    run_client(
        server,
        [
            str(python),
            str(Path(__file__).with_name("cookbook_rl.py")),
            "--base-url",
            server.url,
            "--model",
            model,
            "--out",
            str(out),
        ],
        run_dir,
    )
    cpu = tree_stat(server.process.pid)[0] - cpu
    rl = json.loads(out.read_text())
    steps = len(rl["step_seconds"])
    for seconds, reward in zip(rl["step_seconds"], rl["reward"]):
        print(f"    cookbook_rl_step: {seconds:.3f} s (reward {reward:.2f})", flush=True)
    return {
        "seconds": rl["step_seconds"],
        "server_cpu_seconds": [cpu / steps] * steps,
        "load_1min_before": load,
        "reward": rl["reward"],
        "kl_sample_train": rl["kl_sample_train"],
        "config": rl["config"],
    }


# ------------------------------------------------------------------------------ reports
def summarise(phases: dict) -> dict:
    out = {}
    for name, entry in phases.items():
        steady = entry["seconds"][1:] or entry["seconds"]
        row = {
            "first_seconds": entry["seconds"][0],
            "steady_median_seconds": statistics.median(steady),
            "steady_seconds": steady,
            "server_cpu_median_seconds": statistics.median(
                entry["server_cpu_seconds"][1:] or entry["server_cpu_seconds"]
            ),
            "load_1min_before": entry["load_1min_before"],
        }
        if "tokens" in entry:
            row["tokens_per_call"] = statistics.median(entry["tokens"][1:] or entry["tokens"])
            row["steady_tokens_per_second"] = row["tokens_per_call"] / row["steady_median_seconds"]
        out[name] = row
    return out


def ratios(results: dict) -> dict:
    ours, theirs = results["eztinker"]["summary"], results["skyrl"]["summary"]
    out = {}
    for name in ours:
        if name in theirs:
            steady = theirs[name]["steady_median_seconds"] / ours[name]["steady_median_seconds"]
            if "steady_tokens_per_second" in ours[name]:  # equal work is equal tokens only if both stopped alike
                steady = ours[name]["steady_tokens_per_second"] / theirs[name]["steady_tokens_per_second"]
            goal = 5.0 if name in SMALL_CALLS else 2.0
            out[name] = {
                "steady": steady,
                "first_call": theirs[name]["first_seconds"] / ours[name]["first_seconds"],
                "server_cpu": theirs[name]["server_cpu_median_seconds"]
                / max(ours[name]["server_cpu_median_seconds"], 1e-3),
                "goal": goal,
                "met": steady >= goal,
            }
    return out


def plot(results: dict, table: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [table[n]["steady"] for n in names], 0.4, label="steady median")
    ax.bar([x + 0.2 for x in xs], [table[n]["first_call"] for n in names], 0.4, label="first call")
    for x, n in zip(xs, names):
        ax.hlines(table[n]["goal"], x - 0.4, x + 0.4, colors="k", linestyles="dashed")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks(list(xs), [n.replace("_", "\n") for n in names], fontsize=7)  # a line a word: no overlap
    ax.set_ylabel("SkyRL time / EZTinker time (x, log)")
    ax.set_title(
        f"EZTinker vs SkyRL 0.4.0 (JAX) through tinker {results['sdk']}, {results['model_name']}: dashed = goal"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)


def report(results: dict) -> str:
    """The recorded results as a Markdown table (docs/performance.md's)."""
    ours, theirs, table = results["eztinker"]["summary"], results["skyrl"]["summary"], results["ratios"]
    lines = [
        "| phase | EZTinker first / steady | SkyRL first / steady | steady ratio | goal | first-call ratio | "
        "server CPU ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in table.items():

        def cell(s):
            rate = f" ({s['steady_tokens_per_second']:.0f} tok/s)" if "steady_tokens_per_second" in s else ""
            return f"{s['first_seconds']:.2f} / {s['steady_median_seconds']:.3f} s{rate}"

        lines.append(
            f"| {name} | {cell(ours[name])} | {cell(theirs[name])} | **{row['steady']:.2f}x** | {row['goal']:.0f}x, "
            f"{'met' if row['met'] else '**missed**'} | {row['first_call']:.2f}x | {row['server_cpu']:.2f}x |"
        )
    return "\n".join(lines)


def machine(threads: int) -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in lscpu.splitlines() if ":" in line)}
    return {
        "cpu": fields.get("Model name"),
        "cpus": os.cpu_count(),
        "threads_per_server": threads,
        "simd": [f for f in ("avx2", "avx512f", "amx_tile") if f in fields.get("Flags", "").split()],
        "mem_gb": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    child = sub.add_parser("drive", help="(internal) run the workload against one running server")
    for flag in ("--url", "--model", "--out"):
        child.add_argument(flag, required=True)
    child.add_argument("--server-pid", type=int, required=True)
    child.add_argument("--repeats", type=int, required=True)
    peers_dir = Path(os.environ.get("PEERS_DIR", "/work/scratch/peers"))
    parser.add_argument("--peers-dir", type=Path, default=peers_dir, help="where setup_skyrl.sh installed the peers")
    parser.add_argument("--model-dir", type=Path, default=peers_dir / "models" / "smollm2-135m-instruct")
    parser.add_argument("--eztinker-python", type=Path, default=ROOT / ".venv" / "bin" / "python")
    parser.add_argument(
        "--cookbook-python",
        type=Path,
        default=peers_dir / "cookbook-venv" / "bin" / "python",
        help="tinker-cookbook 0.4.3's venv (setup_skyrl.sh), for the RL loop's phase",
    )
    parser.add_argument("--servers", nargs="+", choices=list(SERVERS), default=list(SERVERS))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=4, help="steady calls per small phase (large ones get half)")
    parser.add_argument("--max-rss-gb", type=float, default=14.0)
    parser.add_argument("--work-dir", type=Path, default=peers_dir / "runs")
    parser.add_argument("--report", action="store_true", help="print the recorded results as Markdown")
    args = parser.parse_args()
    if args.report:
        return print(report(json.loads(RESULTS.read_text())))
    if args.command == "drive":
        return drive(args.url, args.model, args.server_pid, Path(args.out), args.repeats)

    import tinker

    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results.update(
        machine=machine(args.threads),
        sdk=getattr(tinker, "__version__", "0.25.0"),
        model_dir=str(args.model_dir),
        model_name=args.model_dir.name,
        lora_rank=LORA_RANK,
        command=" ".join([Path(sys.executable).name, *sys.argv]),
    )
    for name in args.servers:
        run_dir = args.work_dir / f"{name}-{time.strftime('%H%M%S')}"
        run_dir.mkdir(parents=True)
        port = 8390 + list(SERVERS).index(name)
        command, env = SERVERS[name](args, run_dir, port)
        print(
            f"[{time.strftime('%H:%M:%S')}] {name}: starting (load {os.getloadavg()[0]:.1f}); log "
            f"{run_dir / 'server.log'}",
            flush=True,
        )
        server = Server(
            name,
            command,
            {**env, **thread_env(args.threads), "HF_HUB_OFFLINE": "1"},
            run_dir / "server.log",
            port,
            args.max_rss_gb,
        )
        try:
            start = time.perf_counter()
            models = server.wait_ready()
            ready = time.perf_counter() - start
            out = run_dir / "workload.json"
            run_client(
                server,
                [
                    sys.executable,
                    __file__,
                    "drive",
                    "--url",
                    server.url,
                    "--model",
                    models[0],
                    "--out",
                    str(out),
                    "--server-pid",
                    str(server.process.pid),
                    "--repeats",
                    str(args.repeats),
                ],
                run_dir,
            )
            raw = json.loads(out.read_text())
            if args.cookbook_python.exists():
                try:
                    raw["phases"]["cookbook_rl_step"] = cookbook_rl(args.cookbook_python, server, models[0], run_dir)
                except RuntimeError as error:  # the SDK phases' results stand without it
                    print(f"    the cookbook's RL loop failed: {error}", flush=True)
            else:
                print(
                    f"    no {args.cookbook_python}: the cookbook's RL loop is skipped (setup_skyrl.sh installs it)",
                    flush=True,
                )
        finally:
            server.stop()
        if server.killed:
            raise RuntimeError(f"{name}: {server.killed}")
        results[name] = {
            "ready_seconds": ready,
            "peak_rss_gb": server.peak_rss_gb,
            "losses": raw["losses"],
            "loss_falls": all(v[-1] < v[0] for v in raw["losses"].values()),
            "raw": raw["phases"],
            "summary": summarise(raw["phases"]),
            "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }
        for phase, row in results[name]["summary"].items():
            print(
                f"  {phase:32s} first {row['first_seconds']:8.2f} s  steady {row['steady_median_seconds']:8.3f} s  "
                f"load {row['load_1min_before']:.1f}",
                flush=True,
            )
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    if "eztinker" in results and "skyrl" in results:
        results["ratios"] = ratios(results)
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
        for phase, row in results["ratios"].items():
            print(
                f"  {phase:32s} {row['steady']:6.2f}x steady (goal {row['goal']:.0f}x)  "
                f"{row['first_call']:6.2f}x first call  "
                f"{row['server_cpu']:6.2f}x server CPU",
                flush=True,
            )
        plot(results, results["ratios"])


if __name__ == "__main__":
    main()
