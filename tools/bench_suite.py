"""`python tools/benchmark.py suite`: a suite run as one `optiml-evaluate --suite` call against the same
entries evaluated one `optiml-evaluate` call at a time (issue 23, item 7).

The suite: `--tasks` (20) generated tasks of 2 templates each (instance-level prompts, half ranked over
two options, half generated up to `--new-tokens` tokens), `--instances` per template, 0 and 5 shots,
on random float32 weights of the `--preset` (125m) shape with the demo tokenizer (its 2048-entry
vocabulary). One suite: a fresh process evaluating every entry (programs shared across entries, full
batches across them). Per entry: a fresh process per entry, each with a one-entry suite file, as a user
scripting `optiml-evaluate` over a task list would. Both write the same predictions; wall-clock
seconds of the processes are compared, with the load average before and after (the CPU is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TOKENIZER = ROOT / "optiml_jax" / "assets" / "demo_tokenizer"


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python tools/benchmark.py suite", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--preset", default="125m")
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--instances", type=int, default=4, help="instances per task and template")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--json", default=None, help="also write the figures here")
    return parser.parse_args(argv)


def write_model(directory: Path, preset: str) -> None:
    """Random weights of the preset's shape, the demo tokenizer's vocabulary, as a converted model."""
    import jax

    from optiml_jax.checkpoints.model_format import save_model
    from optiml_jax.config import OPTConfig
    from optiml_jax.model import OPTForCausalLM
    from optiml_jax.sharding import MeshConfig, init_params_sharded, make_mesh
    from optiml_jax.tokenizer import OPTTokenizer

    config = OPTConfig.from_preset(preset, dropout=0.0, vocab_size=2048)
    params, _ = init_params_sharded(OPTForCausalLM(config), jax.random.PRNGKey(0), make_mesh(MeshConfig()))
    save_model(directory, config, params, OPTTokenizer.from_pretrained(TOKENIZER))


def write_suite_data(root: Path, tasks: int, instances: int) -> list[dict]:
    """The suite's entries (one JSONL file per task, two templates each)."""
    entries = []
    for t in range(tasks):
        ranked = t % 2 == 0
        path = root / f"task{t}.jsonl"
        with path.open("w") as f:
            for template in ("a", "b"):
                for i in range(instances + 6):  # the extra ones are demonstrations only
                    words = " ".join(f"w{(i * 7 + j) % 97}" for j in range(10 + i % 5))
                    record = {"task": f"task{t}", "template": template, "src": f"[{template}{t}] {words}?"}
                    record.update({"options": ["yes", "no"], "label": i % 2} if ranked else {"tgt": f"a{i}"})
                    f.write(json.dumps(record) + "\n")
        entries.append(
            dict(
                task=f"task{t}",
                data=str(path),
                benchmark="bench",
                category=f"category{t % 4}",
                level=("fully_held_out", "partially_supervised", "fully_supervised")[t % 3],
                metric="accuracy" if ranked else "rougeL",
                mode="rank" if ranked else "generate",
                shots=[0, 5],
            )
        )
    return entries


def run_cli(model: Path, suite: Path, output: Path, new_tokens: int) -> float:
    """Wall-clock seconds of one `python -m optiml_jax.evaluate --suite` process."""
    command = [sys.executable, "-m", "optiml_jax.evaluate", "--model", str(model), "--suite", str(suite)]
    command += ["--output", str(output), "--max-new-tokens", str(new_tokens), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.stderr.write(done.stderr[-3000:])
        raise SystemExit(f"optiml-evaluate failed (exit status {done.returncode})")
    return seconds


def main(argv=None) -> int:
    import yaml

    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_model(root / "model", args.preset)
        entries = write_suite_data(root, args.tasks, args.instances)
        (root / "suite.yaml").write_text(
            yaml.safe_dump({"max_instances": args.instances, "entries": entries})
        )
        load_before = os.getloadavg()
        suite_seconds = run_cli(root / "model", root / "suite.yaml", root / "out_suite", args.new_tokens)
        metrics = json.loads((root / "out_suite" / "metrics.json").read_text())
        per_entry = []
        for index, entry in enumerate(entries):
            path = root / f"suite{index}.yaml"
            path.write_text(yaml.safe_dump({"max_instances": args.instances, "entries": [entry]}))
            per_entry.append(run_cli(root / "model", path, root / f"out{index}", args.new_tokens))
        compilations = sum(
            json.loads((root / f"out{i}" / "metrics.json").read_text())["run"]["compilations"]
            for i in range(len(entries))
        )
        figures = {
            "preset": args.preset,
            "tasks": args.tasks,
            "templates": 2,
            "shots": [0, 5],
            "instances_per_template": args.instances,
            "new_tokens": args.new_tokens,
            "one_suite_seconds": round(suite_seconds, 2),
            "one_call_per_entry_seconds": round(sum(per_entry), 2),
            "speedup": round(sum(per_entry) / suite_seconds, 2),
            "one_suite_compilations": metrics["run"]["compilations"],
            "one_call_per_entry_compilations": compilations,
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "cpus": os.cpu_count(),
        }
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
