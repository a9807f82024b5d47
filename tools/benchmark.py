"""Side-by-side benchmarks against Hugging Face PyTorch on the same machine, in the same run.

    python tools/benchmark.py generate [options]   decode tokens/s, batch 1 and 8, 125m shape
    python tools/benchmark.py convert  [options]   converter peak RSS on a generated ~1 GB checkpoint
    python tools/benchmark.py train    [options]   training tokens/s and MFU, 125m shape, 4 x 512
    python tools/benchmark.py evaluate [options]   evaluation instances/s, 125m shape, 64 SNI prompts
    python tools/benchmark.py score    [options]   rank-classification requests/s vs lm_eval's hf
    python tools/benchmark.py bench    [options]   OPT-IML Bench build examples/s, overlap pass, peak RSS
    python tools/benchmark.py loader   [options]   training loader tokens/s: EPS vs data.mixture + demos
    python tools/benchmark.py suite    [options]   a 20-task, 2-template, 0/5-shot suite: one process vs one
                                                   optiml-evaluate call per entry (tools/bench_suite.py)
    python tools/benchmark.py device   [--dry-run] on a GPU/TPU: matmul and copy ceilings, 1.3B training MFU,
                                                   decode bandwidth, load time (tools/bench_device.py)

Figures go into docs/benchmarks.md. Each subcommand lives in tools/bench_<name>.py.
"""

import importlib
import os
import sys

COMMANDS = ("generate", "convert", "train", "evaluate", "score", "bench", "loader", "suite", "device")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    module = importlib.import_module(f"bench_{argv[0]}")
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
