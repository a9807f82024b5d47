"""`python tools/benchmark.py evaluate`: instances/s of generation evaluation, ours vs HF PyTorch `generate`.

Both sides answer the same 64 SNI prompts (8 per task of data/sni, zero-shot optiml template, demo
tokenizer ids: 40 to 320 tokens) with the same random float32 weights of the 125m shape, greedy, up to
32 new tokens, stopping at </s>. Ours is the evaluation path itself (`eval.generation.
generate_completions`: length-sorted batches in bucketed shapes, decoded and cut). HF gets what a
careful HF evaluation does: the same length-sorted batches, left-padded, one `generate` call each, then
`batch_decode`. Compilation (ours) and a warm-up (HF) are excluded and reported; the best of
`--repeats` timed passes is kept. Each side runs in a fresh process of its own.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys

import bench_worker


def parse_args(argv):
    sizes = {"--prompts": 64, "--new-tokens": 32, "--batch-size": 16}
    return bench_worker.side_by_side_args(argv, "evaluate", __doc__.split("\n")[0], sizes, repeats=2)


def benchmark_prompts(count: int):
    """(demo tokenizer, token ids of `count` SNI prompts), the same on both sides."""
    from optiml_jax.eval import build_prompt, load_eval_tasks
    from optiml_jax.tokenizer import OPTTokenizer

    tokenizer = OPTTokenizer.from_pretrained(
        os.path.join(bench_worker.ROOT, "optiml_jax", "assets", "demo_tokenizer")
    )
    tasks = load_eval_tasks(
        os.path.join(bench_worker.ROOT, "optiml_jax", "assets", "data", "sni"), max_instances=-(-count // 8)
    )
    texts = [
        build_prompt(task, inst)
        for inst_index in range(-(-count // 8))
        for task in tasks
        for inst in task.instances[inst_index : inst_index + 1]
    ][:count]
    return tokenizer, tokenizer.encode_batch(texts, add_bos=False)


def bench_ours(config, tokenizer, prompts, args) -> dict:

    from optiml_jax.eval.generation import generate_completions
    from optiml_jax.model import OPTForCausalLM

    params = bench_worker.random_params(config, scan_layers=False)
    model = OPTForCausalLM(config, scan_layers=False)

    def run():
        return generate_completions(
            model, params, tokenizer, prompts, max_new_tokens=args.new_tokens, batch_size=args.batch_size
        )

    seconds, first, (_, _, stats) = bench_worker.best_of(run, args.repeats)
    return {
        "seconds": seconds,
        "first_call_s": first,
        "new_tokens": stats.new_tokens,
        "programs": stats.programs,
        "batches": stats.batches,
    }


def bench_hf(config, tokenizer, prompts, args) -> dict:
    import torch

    model = bench_worker.random_hf_model(config)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    batches = [order[s : s + args.batch_size] for s in range(0, len(order), args.batch_size)]

    def run():
        new_tokens = 0
        for rows in batches:
            length = max(len(prompts[i]) for i in rows)
            ids = torch.full((len(rows), length), 1, dtype=torch.long)
            mask = torch.zeros((len(rows), length), dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, length - len(prompts[i]) :] = torch.tensor(prompts[i])
                mask[r, length - len(prompts[i]) :] = 1
            with torch.no_grad():
                out = model.generate(
                    ids,
                    attention_mask=mask,
                    do_sample=False,
                    max_new_tokens=args.new_tokens,
                    eos_token_id=2,
                    pad_token_id=1,
                )
            new = out[:, length:]
            new_tokens += int(((new != 1).cumsum(1) > 0).sum())
            tokenizer.decode_batch([[t for t in row if t < tokenizer.vocab_size] for row in new.tolist()])
        return new_tokens

    seconds, first, new_tokens = bench_worker.best_of(run, args.repeats)
    return {
        "seconds": seconds,
        "first_call_s": first,
        "new_tokens": new_tokens,
        "threads": torch.get_num_threads(),
        "attn_implementation": model.config._attn_implementation,
    }


def run_worker(args) -> dict:
    from optiml_jax.config import OPTConfig

    config = OPTConfig.from_preset(args.preset, dropout=0.0)
    tokenizer, prompts = benchmark_prompts(args.prompts)
    result = {"prompt_tokens": [min(map(len, prompts)), max(map(len, prompts))]}
    if args.worker == "hf-pytorch":
        return {**result, **bench_hf(config, tokenizer, prompts, args)}
    import jax

    return {**result, **bench_ours(config, tokenizer, prompts, args), "jax": jax.__version__}


def main(argv=None) -> int:
    args = parse_args(argv if argv is not None else sys.argv[1:])
    if args.worker:
        return bench_worker.report(run_worker(args))
    forwarded = ("preset", "prompts", "new_tokens", "batch_size", "repeats")
    workers, rounds = bench_worker.side_by_side_rounds(__file__, args, "hf-pytorch", forwarded)
    ours = {**rounds[-1]["jax"], "seconds": statistics.median(r["jax"]["seconds"] for r in rounds)}
    figures = {
        "preset": args.preset,
        "prompts": args.prompts,
        "new_tokens_max": args.new_tokens,
        "batch_size": args.batch_size,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "ours": {**ours, "instances_per_s": args.prompts / ours["seconds"]},
    }
    print(f"machine: {figures['machine']}; jax {ours['jax']}; each side in a fresh process")
    print(
        f"{args.prompts} SNI prompts of {ours['prompt_tokens'][0]}-{ours['prompt_tokens'][1]} tokens, up to "
        f"{args.new_tokens} new tokens, greedy, batch {args.batch_size}, {args.preset} shape, float32"
    )
    print(
        "\n| side | seconds | instances/s | new tokens | first call (s) | vs HF |\n|---|---|---|---|---|---|"
    )
    if not args.skip_hf:
        hf = {
            **rounds[-1]["hf-pytorch"],
            "seconds": statistics.median(r["hf-pytorch"]["seconds"] for r in rounds),
        }
        figures["hf"] = {**hf, "instances_per_s": args.prompts / hf["seconds"]}
        figures["speedup_vs_hf"] = statistics.median(
            r["hf-pytorch"]["seconds"] / r["jax"]["seconds"] for r in rounds
        )
        print(
            f"| HF PyTorch generate ({hf['threads']} threads, {hf['attn_implementation']}) | "
            f"{hf['seconds']:.2f} | "
            f"{figures['hf']['instances_per_s']:.2f} | {hf['new_tokens']} | {hf['first_call_s']:.2f} | "
            "1.00x |"
        )
    speedup = f"{figures['speedup_vs_hf']:.2f}x" if "speedup_vs_hf" in figures else "-"
    print(
        f"| optiml_jax evaluation ({ours['programs']} programs, {ours['batches']} batches) | "
        f"{ours['seconds']:.2f} | "
        f"{figures['ours']['instances_per_s']:.2f} | {ours['new_tokens']} | {ours['first_call_s']:.2f} | "
        f"{speedup} |"
    )
    return bench_worker.write_figures(args.json, figures)


if __name__ == "__main__":
    sys.exit(main())
