"""`python tools/benchmark.py convert`: peak memory of tools/convert_weights.py on a ~1 GB checkpoint.

Generates a random-weight OPT checkpoint of about `--size-gb` split into `--files` files (metaseq
model-parallel parts, or Hugging Face sharded safetensors with an index), converts it in a child
process and reports that process's peak RSS (VmHWM) against the largest input file, plus the RSS
after imports (jax, orbax, tensorstore: the fixed cost of any run), honestly.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from bench_worker import write_figures

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, sys, time
def status():
    out = {}
    for line in open('/proc/self/status'):
        if line.startswith(('VmRSS', 'VmHWM')):
            out[line.split(':')[0]] = int(line.split()[1]) * 1024
    return out
sys.path.insert(0, sys.argv[1])
import jax, orbax.checkpoint, tensorstore
from optiml_jax.checkpoints import convert
jax.devices()  # the backend is initialised during a save anyway; count it in the baseline
baseline = status()['VmRSS']
start = time.perf_counter()
summary = convert.convert(sys.argv[2], sys.argv[3], dtype=sys.argv[4], fmt=sys.argv[5], progress=False)
print(json.dumps({'baseline_rss': baseline, 'peak_rss': status()['VmHWM'],
                  'seconds': time.perf_counter() - start, 'num_params': summary.num_params,
                  'output_bytes': summary.bytes}))
"""


def bench_config(size_gb: float, vocab: int = 50272, hidden: int = 1024):
    from optiml_jax.config import OPTConfig

    per_layer = 12 * hidden * hidden + 13 * hidden
    embeddings = vocab * hidden + 2050 * hidden
    layers = max(1, round((size_gb * 1e9 / 2 - embeddings) / per_layer))
    return OPTConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        ffn_dim=4 * hidden,
        num_attention_heads=hidden // 64,
        max_position_embeddings=2048,
    )


def _random(rng, shape):
    return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)


def write_metaseq_parts(directory: Path, config, parts: int, seed: int = 0) -> list:
    """Model-parallel parts (fused qkv, fp16, with cfg) written one part at a time."""
    import torch

    h, f, v = config.hidden_size, config.ffn_dim, config.vocab_size
    paths = []
    for k in range(parts):
        rng = np.random.default_rng(seed + k)
        model = {
            "decoder.version": np.array([3.0], np.float32),
            "decoder.embed_tokens.weight": _random(rng, (v // parts, h)),
            "decoder.embed_positions.weight": _random(rng, (config.num_positions, h)),
            "decoder.layer_norm.weight": np.ones(h, np.float16),
            "decoder.layer_norm.bias": np.zeros(h, np.float16),
        }
        for i in range(config.num_hidden_layers):
            p = f"decoder.layers.{i}."
            model.update(
                {
                    p + "self_attn.qkv_proj.weight": _random(rng, (3 * h // parts, h)),
                    p + "self_attn.qkv_proj.bias": _random(rng, (3 * h // parts,)),
                    p + "self_attn.out_proj.weight": _random(rng, (h, h // parts)),
                    p + "self_attn.out_proj.bias": _random(rng, (h,)),
                    p + "self_attn_layer_norm.weight": np.ones(h, np.float16),
                    p + "self_attn_layer_norm.bias": np.zeros(h, np.float16),
                    p + "fc1.weight": _random(rng, (f // parts, h)),
                    p + "fc1.bias": _random(rng, (f // parts,)),
                    p + "fc2.weight": _random(rng, (h, f // parts)),
                    p + "fc2.bias": _random(rng, (h,)),
                    p + "final_layer_norm.weight": np.ones(h, np.float16),
                    p + "final_layer_norm.bias": np.zeros(h, np.float16),
                }
            )
        cfg = {
            "model": {
                "decoder_attention_heads": config.num_attention_heads,
                "decoder_normalize_before": True,
                "activation_fn": "relu",
                "dropout": 0.1,
                "attention_dropout": 0.0,
            }
        }
        path = directory / f"checkpoint_last-model_part-{k}.pt"
        torch.save({"model": {key: torch.from_numpy(a) for key, a in model.items()}, "cfg": cfg}, path)
        paths.append(path)
        del model
    return paths


def write_hf_shards(directory: Path, config, shards: int, seed: int = 0) -> list:
    """Sharded model.safetensors with its index, in HF names, fp16."""
    from safetensors.numpy import save_file

    from optiml_jax.checkpoints.mapping import tensor_specs

    specs = tensor_specs(config)
    total = sum(math.prod(s.hf_shape) * 2 for s in specs)
    per_shard = math.ceil(total / shards)
    rng = np.random.default_rng(seed)
    groups, current, size = [], [], 0
    for spec in specs:
        nbytes = math.prod(spec.hf_shape) * 2
        if current and size + nbytes > per_shard and len(groups) < shards - 1:
            groups.append(current)
            current, size = [], 0
        current.append(spec)
        size += nbytes
    groups.append(current)
    weight_map, paths = {}, []
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({"model." + s.hf_key: _random(rng, s.hf_shape) for s in group}, str(directory / name))
        weight_map.update({"model." + s.hf_key: name for s in group})
        paths.append(directory / name)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config.to_json_file(directory / "config.json")
    return paths


def run_case(fmt: str, config, files: int, workdir: Path, dtype: str) -> dict:
    src, out = workdir / f"input_{fmt}", workdir / f"output_{fmt}_{dtype}"
    shutil.rmtree(out, ignore_errors=True)
    if not src.exists():
        src.mkdir(parents=True)
        (write_metaseq_parts if fmt == "metaseq" else write_hf_shards)(src, config, files)
    inputs = sorted(p for p in src.iterdir() if p.suffix in (".pt", ".safetensors"))
    largest = max(p.stat().st_size for p in inputs)
    total = sum(p.stat().st_size for p in inputs)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(ROOT), str(src), str(out), dtype, fmt],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode:
        raise RuntimeError(f"conversion failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(
        format=fmt,
        dtype=dtype,
        files=len(inputs),
        input_bytes=total,
        largest_file=largest,
        ratio=result["peak_rss"] / largest,
        ratio_above_baseline=(result["peak_rss"] - result["baseline_rss"]) / largest,
    )
    shutil.rmtree(out, ignore_errors=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="benchmark.py convert", description=__doc__)
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--formats", default="metaseq,hf")
    parser.add_argument("--dtypes", default="float16,float32")
    parser.add_argument("--workdir", default=None, help="where to generate (default: a temp dir, removed)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    config = bench_config(args.size_gb)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_convert_"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"python {platform.python_version()}"
    )
    print(
        f"model: {config.num_hidden_layers} layers, hidden {config.hidden_size}, vocab {config.vocab_size}, "
        f"{config.num_params():,} params, fp16 input in {args.files} files"
    )
    print(
        "| input | output dtype | files | largest file | baseline RSS (after imports) | peak RSS | "
        "peak / largest file | (peak - baseline) / largest | time |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    ok, cases = True, []
    try:
        for fmt in args.formats.split(","):
            for dtype in args.dtypes.split(","):
                r = run_case(fmt, config, args.files, workdir, dtype)
                cases.append({"input": fmt, "output_dtype": dtype, **r})
                mib = lambda b: f"{b / 2**20:,.0f} MiB"
                print(
                    f"| {fmt} | {dtype} | {r['files']} | {mib(r['largest_file'])} | "
                    f"{mib(r['baseline_rss'])} | "
                    f"{mib(r['peak_rss'])} | {r['ratio']:.2f}x | {r['ratio_above_baseline']:.2f}x | "
                    f"{r['seconds']:.1f} s |",
                    flush=True,
                )
                ok &= r["ratio"] < 1.5
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print("peak RSS under 1.5x the largest input file: " + ("yes" if ok else "NO"))
    write_figures(args.json, {"cases": cases, "peak_under_1.5x_largest_file": ok})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
