"""OPT-IML Bench from the public collections (issue #26; rules: docs/bench.md): `build_bench` reads the
collections (collections/), consolidates them (consolidate.py), splits them by the split file
(splits.py), removes shared sources and measures 13-gram overlap (overlap.py), prompts (prompts.py) and
writes train/dev/test Parquet, manifest.json, overlap.json and report.md (output.py, report.py)."""

from optiml_jax.bench.build import BenchSettings, BuildResult, build_bench
from optiml_jax.bench.tasks import BENCHMARKS, BenchError

__all__ = ["BENCHMARKS", "BenchError", "BenchSettings", "BuildResult", "build_bench"]
