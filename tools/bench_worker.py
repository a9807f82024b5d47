"""One side of a benchmark in a fresh process of its own.

Run in one process, whichever side went second was 10-30% slower (the other library's thread pool
and heap were still there), HF PyTorch included. So a benchmark script re-runs itself with
`--worker NAME ...`; the worker prints one `BENCH_RESULT {json}` line, which is what comes back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

RESULT_PREFIX = "BENCH_RESULT "

# The checkout these tools live in: its package is the one benchmarked, not an installed copy.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def report(result: dict) -> int:
    """What a worker prints as its last line; its exit status."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


def run_in_fresh_process(script: str, worker: str, argv: list[str]) -> dict:
    """`python script --worker worker *argv` in a new process; its reported result."""
    proc = subprocess.run(
        [sys.executable, os.path.abspath(script), "--worker", worker, *argv], capture_output=True, text=True
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"benchmark worker {worker!r} failed (exit status {proc.returncode})")
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def side_by_side_args(
    argv,
    name: str,
    description: str,
    sizes: dict[str, int],
    *,
    helps: dict[str, str] | None = None,
    repeats: int = 1,
):
    """The parsed arguments of a side-by-side benchmark: those every one takes, and its own integer
    options `sizes` (flag: default; `helps`: flag: help text)."""
    import argparse

    parser = argparse.ArgumentParser(prog=f"python tools/benchmark.py {name}", description=description)
    parser.add_argument("--preset", default="125m")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed passes per process (best kept)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure every side this many times, alternating; figures are medians over rounds",
    )
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one side, in this process
    for flag, default in sizes.items():
        parser.add_argument(flag, type=int, default=default, help=(helps or {}).get(flag))
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.repeats < 1:
        parser.error(f"--rounds and --repeats must be at least 1, got {args.rounds} and {args.repeats}")
    return args


def random_hf_model(config):
    """The benchmarks' reference: a random-init float32 transformers OPTForCausalLM of `config`
    (seed 0, so every process builds the same weights)."""
    import torch
    import transformers

    torch.manual_seed(0)
    return transformers.OPTForCausalLM(transformers.OPTConfig(**config.to_dict())).eval().float()


def random_params(config, scan_layers: bool):
    """`random_hf_model(config)`'s weights as our parameter tree: both sides compute with the same ones."""
    # deferred like torch's above: a worker loads only the side it measures
    import jax
    import jax.numpy as jnp

    from optiml_jax.checkpoints.mapping import hf_to_params

    state = {k: v.detach().numpy() for k, v in random_hf_model(config).state_dict().items()}
    return jax.tree_util.tree_map(jnp.asarray, hf_to_params(state, config, scan_layers=scan_layers))


def one_device_train_step(config, rows: int, seq_len: int, optim: dict, **train):
    """The training benchmarks' set-up: the train step of `config` on the first device, for batches of
    `rows` x `seq_len`, with `train` (TrainSection fields) and `optim` (OptimSection fields) over a
    1000-step run without warm-up or embedding dropout (HF has none). Returns (the jitted step, the
    initial state, the mesh, the seconds creating the state took)."""
    # deferred like the others here: the parent process of a benchmark never starts JAX
    import time

    import jax

    from optiml_jax.run_config import OptimSection, TrainSection
    from optiml_jax.sharding import MeshConfig, make_mesh
    from optiml_jax.train import build_model, create_train_state, make_optimizer, make_train_step

    train_section = TrainSection(
        max_steps=1000, batch_size=rows, seq_len=seq_len, embed_dropout=False, **train
    )
    optim_section = OptimSection(warmup_steps=0, **optim)
    mesh = make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    model = build_model(config, train_section)
    tx = make_optimizer(optim_section, train_section.max_steps)
    start = time.perf_counter()
    state, shardings = create_train_state(model, tx, mesh, seed=0)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - start
    step = make_train_step(model, tx, train_section, optim_section, mesh, shardings)
    return step, state, mesh, init_s


def side_by_side_rounds(script: str, args, reference: str, forwarded) -> tuple[list[str], list[dict]]:
    """(the workers, their `args.rounds` alternating measurements): ours ("jax") and, unless --skip-hf,
    the `reference` side, each in a fresh process of `script` given the options `forwarded` (argparse
    destinations) as the parent was: what it was asked for is what each side measures."""
    workers = ["jax"] + ([] if args.skip_hf else [reference])
    argv = [item for name in forwarded for item in ("--" + name.replace("_", "-"), str(getattr(args, name)))]
    return workers, alternating_rounds(script, workers, argv, args.rounds)


def best_of(fn, repeats: int, warm_up=None):
    """(best seconds of `repeats` calls of fn, seconds of the warm-up call (default: fn), fn's result)."""
    import time

    start = time.perf_counter()
    result = (warm_up or fn)()
    first = time.perf_counter() - start
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, first, result


def alternating_rounds(script: str, workers: list, worker_argv: list, rounds: int) -> list[dict]:
    """`rounds` measurements of every worker, each in a fresh process, the order reversed every other
    round (this VM drifts by 20-40% within an hour: alternating keeps the sides in the same phases)."""
    out = []
    for index in range(rounds):
        order = workers if index % 2 == 0 else workers[::-1]
        out.append({w: run_in_fresh_process(script, w, worker_argv) for w in order})
        print(
            f"round {index + 1}: " + ", ".join(f"{w} {r['seconds']:.2f} s" for w, r in out[-1].items()),
            flush=True,
        )
    return out


def write_figures(path, figures: dict) -> int:
    """`--json FILE`: the figures as JSON (nothing without a path); the benchmark's exit status."""
    if path:
        with open(path, "w") as f:
            json.dump(figures, f, indent=2)
    return 0
