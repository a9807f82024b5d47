"""`python tools/benchmark.py loader`: the training loader's packed tokens/s per process, plain EPS vs
data.mixture (two levels, slices) with data.demonstrations on, on the same generated bench.

The data is generated into a temporary directory: a built-bench-like Parquet set (seven benchmarks,
`--tasks` tasks each of `--examples` rows, prompts of 40-400 words as the bench's are) plus a
reasoning JSONL and a pre-training `.txt` slice. Both loaders read it with the demo BPE tokenizer, one
process, `--batch-size` x `--seq-len` batches; tokens/s counts the row slots holding an example. The
two settings alternate over `--rounds` (this VM is shared: alternating keeps both in the same phases),
each timed as the best of `--repeats` passes of `--batches` batches after one warm-up batch.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_worker import write_figures  # noqa: E402

BENCHMARKS = {"promptsource": 45, "flan": 20, "sni": 25, "crossfit": 4, "exmix": 2, "t5": 2, "unifiedskg": 2}
WORDS = "the a of to and in is was for on that with as by it from at this be or are an which".split()


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python tools/benchmark.py loader", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--tasks", type=int, default=6, help="tasks per benchmark")
    parser.add_argument("--examples", type=int, default=800, help="rows per task")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batches", type=int, default=6, help="timed batches per pass")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the figures here")
    return parser.parse_args(argv)


def text(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(lo, hi)))


def generate(root: Path, args) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)
    (root / "train").mkdir()
    for benchmark in BENCHMARKS:
        for t in range(args.tasks):
            task = f"{benchmark}_task{t}"
            definition = f"Instructions: {text(rng, 20, 60)}\n\n" if benchmark == "sni" else ""
            rows = [
                {
                    "task": task,
                    "benchmark": benchmark,
                    "src": f"{definition}Input: {text(rng, 40, 400)}\nA:",
                    "tgt": text(rng, 1, 20),
                }
                for _ in range(args.examples)
            ]
            pq.write_table(pa.Table.from_pylist(rows), root / "train" / f"{task}.parquet", row_group_size=256)
    with open(root / "reasoning.jsonl", "w") as f:
        for _ in range(500):
            f.write(json.dumps({"src": text(rng, 40, 200), "tgt": text(rng, 20, 80)}) + "\n")
    with open(root / "pretraining.txt", "w") as f:
        for _ in range(500):
            f.write(text(rng, 200, 1500) + "\n")


def settings(root: Path) -> dict:
    from optiml_jax.data import DataConfig

    mixture = {
        "benchmarks": BENCHMARKS,
        "slices": [
            {"name": "reasoning", "path": str(root / "reasoning.jsonl"), "share": 0.01},
            {"name": "pretraining", "path": str(root / "pretraining.txt"), "share": 0.05, "loss": "all"},
        ],
    }
    demonstrations = {"distribution": "zipf", "a": 4, "max": 5}
    return {
        "eps_only": DataConfig(train=str(root / "train")),
        "mixture_and_demonstrations": DataConfig(
            train=str(root / "train"), mixture=mixture, demonstrations=demonstrations
        ),
    }


def tokens_per_second(data, tokenizer, args) -> float:
    from optiml_jax.data import build_train_loader

    def one_pass() -> float:
        loader = build_train_loader(
            data,
            tokenizer,
            seed=0,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            process_index=0,
            process_count=1,
        )
        next(loader)  # warm-up: file footers, first row groups
        start, tokens = time.perf_counter(), 0
        for _ in range(args.batches):
            tokens += int((next(loader)["segment_ids"] > 0).sum())
        return tokens / (time.perf_counter() - start)

    return max(one_pass() for _ in range(args.repeats))


def main(argv=None) -> int:
    from optiml_jax.tokenizer import OPTTokenizer

    args = parse_args(argv)
    tokenizer = OPTTokenizer.from_pretrained(os.path.join(ROOT, "optiml_jax", "assets", "demo_tokenizer"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate(root, args)
        configs = settings(root)
        rounds = []
        for index in range(args.rounds):
            names = list(configs) if index % 2 == 0 else list(configs)[::-1]
            rounds.append({name: tokens_per_second(configs[name], tokenizer, args) for name in names})
            print(f"round {index + 1}: " + ", ".join(f"{n} {v:,.0f} tok/s" for n, v in rounds[-1].items()))
    figures = {name: statistics.median(r[name] for r in rounds) for name in configs}
    figures["ratio"] = figures["mixture_and_demonstrations"] / figures["eps_only"]
    figures["settings"] = {k: v for k, v in vars(args).items() if k != "json"}
    print(
        f"packed tokens/s per process: EPS only {figures['eps_only']:,.0f}, two-level mixture + "
        f"demonstrations {figures['mixture_and_demonstrations']:,.0f} ({figures['ratio']:.2f}x)"
    )
    return write_figures(args.json, figures)


if __name__ == "__main__":
    sys.exit(main())
