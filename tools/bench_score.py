"""`python tools/benchmark.py score`: rank-classification requests/s, ours vs lm_eval's `hf` model, same run.

Both sides score the same 256 requests with the same random float32 weights of the 125m shape: a
200-token context and 4 options of 1 to 8 tokens each (token ids, so no tokenizer differs), 1,024
(context, option) pairs in all. Ours is `optiml_jax.eval.scoring.Scorer` (each context computed once,
its options packed after it as branches, several requests per row). The reference is lm_eval's own
`HFLM._loglikelihood_tokens` (lm_eval's `hf` model on the same weights): one forward pass per
context + option, batched, log-softmax over every position, as `lm_eval --model hf` runs it. A
warm-up (our whole pass, compiles included; one batch for HF) is excluded and reported; the best of
`--repeats` timed passes; each side in a fresh
process; "vs HF" is the median of the per-round ratios (`speedup_vs_hf` in `--json`).
"""

from __future__ import annotations

import os
import platform
import statistics
import sys

import bench_worker


def parse_args(argv):
    sizes = {"--requests": 256, "--context": 200, "--options": 4, "--batch-size": 16}
    helps = {"--batch-size": "sequences per forward pass on each side"}
    return bench_worker.side_by_side_args(argv, "score", __doc__.split("\n")[0], sizes, helps=helps)


def make_requests(args):
    """[(context ids, [option ids, ...])], the same on both sides."""
    import numpy as np

    rng = np.random.default_rng(0)
    return [
        (
            rng.integers(4, 2048, args.context).tolist(),
            [rng.integers(4, 2048, int(rng.integers(1, 9))).tolist() for _ in range(args.options)],
        )
        for _ in range(args.requests)
    ]


def bench_ours(config, requests, args) -> dict:
    import jax

    from optiml_jax.eval.scoring import Scorer
    from optiml_jax.model import OPTForCausalLM

    params = bench_worker.random_params(config, scan_layers=True)
    # rows of 512 tokens hold two requests here: batch_size / 2 rows see as many requests as HF's batch
    scorer = Scorer(OPTForCausalLM(config, scan_layers=True), params, batch_size=max(1, args.batch_size // 2))
    seconds, first, scores = bench_worker.best_of(lambda: scorer.score_groups(requests), args.repeats)
    return {
        "seconds": seconds,
        "first_call_s": first,
        "programs": len(scorer.shapes),
        "jax": jax.__version__,
        "logprob_sum": sum(s.logprob for group in scores for s in group),
    }


def bench_hf(config, requests, args) -> dict:
    import torch
    import transformers
    from lm_eval.models.huggingface import HFLM

    tokenizer = transformers.AutoTokenizer.from_pretrained(
        os.path.join(bench_worker.ROOT, "optiml_jax", "assets", "demo_tokenizer")
    )
    lm = HFLM(
        pretrained=bench_worker.random_hf_model(config),
        tokenizer=tokenizer,
        batch_size=args.batch_size,
        device="cpu",
    )
    flat = [(("", ""), context, option) for context, options in requests for option in options]
    # warm-up: one batch (PyTorch has nothing to compile; a whole extra pass would only cost minutes)
    seconds, first, scores = bench_worker.best_of(
        lambda: lm._loglikelihood_tokens(flat, disable_tqdm=True),
        args.repeats,
        warm_up=lambda: lm._loglikelihood_tokens(flat[: args.batch_size], disable_tqdm=True),
    )
    return {
        "seconds": seconds,
        "first_call_s": first,
        "threads": torch.get_num_threads(),
        "logprob_sum": sum(logprob for logprob, _ in scores),
    }


def run_worker(args) -> dict:
    from optiml_jax.config import OPTConfig

    config = OPTConfig.from_preset(args.preset, dropout=0.0)
    requests = make_requests(args)
    return (
        bench_hf(config, requests, args)
        if args.worker == "hf-lm-eval"
        else bench_ours(config, requests, args)
    )


def main(argv=None) -> int:
    args = parse_args(argv if argv is not None else sys.argv[1:])
    if args.worker:
        return bench_worker.report(run_worker(args))
    forwarded = ("preset", "requests", "context", "options", "batch_size", "repeats")
    workers, rounds = bench_worker.side_by_side_rounds(__file__, args, "hf-lm-eval", forwarded)
    figures = {
        "preset": args.preset,
        "requests": args.requests,
        "context_tokens": args.context,
        "options": args.options,
        "batch_size": args.batch_size,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
    }
    for worker in workers:
        runs = [r[worker] for r in rounds]
        figures[worker] = {**runs[-1], "seconds": statistics.median(r["seconds"] for r in runs)}
        figures[worker]["requests_per_s"] = args.requests / figures[worker]["seconds"]
    if not args.skip_hf:
        figures["speedup_vs_hf"] = statistics.median(
            r["hf-lm-eval"]["seconds"] / r["jax"]["seconds"] for r in rounds
        )
        difference = abs(figures["jax"]["logprob_sum"] - figures["hf-lm-eval"]["logprob_sum"])
        figures["logprob_sum_difference"] = difference
    print(f"machine: {figures['machine']}; jax {figures['jax']['jax']}; each side in a fresh process")
    print(
        f"{args.requests} requests: {args.context}-token context, {args.options} options of 1-8 tokens; "
        f"{args.preset} shape, float32"
    )
    print("\n| side | seconds | requests/s | first pass (s) | vs HF |\n|---|---|---|---|---|")
    if not args.skip_hf:
        hf = figures["hf-lm-eval"]
        print(
            f"| lm_eval hf model ({hf['threads']} threads, batch {args.batch_size}) | {hf['seconds']:.2f} | "
            f"{hf['requests_per_s']:.2f} | {hf['first_call_s']:.2f} | 1.00x |"
        )
    ours = figures["jax"]
    speedup = f"{figures['speedup_vs_hf']:.2f}x" if "speedup_vs_hf" in figures else "-"
    print(
        f"| optiml_jax Scorer ({ours['programs']} programs) | {ours['seconds']:.2f} | "
        f"{ours['requests_per_s']:.2f} | "
        f"{ours['first_call_s']:.2f} | {speedup} |"
    )
    if "logprob_sum_difference" in figures:
        print(
            f"sum of the 1,024 log-likelihoods differs by {figures['logprob_sum_difference']:.2e} "
            "between the sides"
        )
    return bench_worker.write_figures(args.json, figures)


if __name__ == "__main__":
    sys.exit(main())
