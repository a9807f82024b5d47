"""`python tools/benchmark.py generate`: decode tokens/s of our JAX generation against HF PyTorch `generate`.

Both run the 125m shape (OPTConfig.from_preset("125m")) with the same random float32 weights, greedy,
the same random prompt, and `min_new_tokens` = `max_new_tokens` so neither stops early at EOS.

Decode throughput excludes the prompt pass: each side is timed generating N tokens and generating 1
token (the prefill plus the first token), and decode tokens/s = batch * (N - 1) / (T(N) - T(1)).
Compilation is excluded (every program is run once before timing); the best of `--repeats` is kept.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np
from bench_worker import write_figures


def _best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python tools/benchmark.py generate", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--preset", default="125m")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scan-layers", action="store_true", help="stacked layers under nn.scan")
    parser.add_argument("--skip-hf", action="store_true", help="time ours only")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp
    import torch
    import transformers

    from optiml_jax.checkpoints.mapping import hf_to_params
    from optiml_jax.config import OPTConfig
    from optiml_jax.generate import generate
    from optiml_jax.model import OPTForCausalLM

    config = OPTConfig.from_preset(args.preset, dropout=0.0)
    torch.manual_seed(0)
    hf_model = transformers.OPTForCausalLM(transformers.OPTConfig(**config.to_dict())).eval().float()
    state = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    params = jax.tree_util.tree_map(jnp.asarray, hf_to_params(state, config, scan_layers=args.scan_layers))
    model = OPTForCausalLM(config, scan_layers=args.scan_layers)

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), jax {jax.__version__}; "
        f"load average before: {_load_average()}"
    )
    print(
        f"model: OPT-{args.preset} shape, random float32 weights; prompt {args.prompt_len} tokens, "
        f"{args.new_tokens} new tokens, greedy; decode tokens/s exclude prefill and compile"
    )
    rows = []
    for batch in args.batch_sizes:
        prompt = np.random.default_rng(batch).integers(4, 50000, size=(batch, args.prompt_len))

        def ours(n):
            return generate(model, params, prompt, max_new_tokens=n, min_new_tokens=n)

        def hf(n):
            with torch.no_grad():
                return hf_model.generate(
                    torch.as_tensor(prompt),
                    attention_mask=torch.ones(prompt.shape, dtype=torch.long),
                    do_sample=False,
                    max_new_tokens=n,
                    min_new_tokens=n,
                    pad_token_id=1,
                    eos_token_id=config.eos_token_id,
                )

        n = args.new_tokens
        start = time.perf_counter()
        ours(n)  # compiles; the N=1 program below is a second compile (a smaller budget bucket)
        first_call = time.perf_counter() - start
        ours(1)
        ours_full, ours_prefill = (
            _best_time(lambda: ours(n), args.repeats),
            _best_time(lambda: ours(1), args.repeats),
        )
        ours_tps = batch * (n - 1) / (ours_full - ours_prefill)
        hf_tps = hf_full = None
        if not args.skip_hf:
            hf(2)  # warm-up
            hf_full, hf_prefill = (
                _best_time(lambda: hf(n), args.repeats),
                _best_time(lambda: hf(1), args.repeats),
            )
            hf_tps = batch * (n - 1) / (hf_full - hf_prefill)
        rows.append(
            (batch, ours_tps, batch * n / ours_full, hf_tps, None if hf_full is None else batch * n / hf_full)
        )
        print(
            f"batch {batch}: ours {ours_tps:.1f} tok/s decode ({batch * n / ours_full:.1f} incl. prefill; "
            f"first call with compile {first_call:.1f} s)"
            + (
                ""
                if hf_tps is None
                else f"; HF {hf_tps:.1f} ({batch * n / hf_full:.1f}); ratio {ours_tps / hf_tps:.2f}x"
            ),
            flush=True,
        )
    print(f"load average after: {_load_average()}")
    print(
        "\n| batch | ours decode tok/s | HF PyTorch decode tok/s | ratio | ours incl. prefill | HF incl. "
        "prefill |"
    )
    print("|---|---|---|---|---|---|")
    for batch, ours_tps, ours_e2e, hf_tps, hf_e2e in rows:
        fmt = lambda x: "-" if x is None else f"{x:.1f}"
        ratio = "-" if hf_tps is None else f"{ours_tps / hf_tps:.2f}x"
        print(f"| {batch} | {ours_tps:.1f} | {fmt(hf_tps)} | {ratio} | {ours_e2e:.1f} | {fmt(hf_e2e)} |")
    keys = (
        "batch",
        "ours_decode_tok_s",
        "ours_incl_prefill_tok_s",
        "hf_decode_tok_s",
        "hf_incl_prefill_tok_s",
    )
    settings = {k: getattr(args, k) for k in ("preset", "prompt_len", "new_tokens", "repeats", "scan_layers")}
    return write_figures(args.json, {"settings": settings, "rows": [dict(zip(keys, row)) for row in rows]})


if __name__ == "__main__":
    sys.exit(main())
