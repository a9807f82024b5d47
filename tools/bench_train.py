"""`python tools/benchmark.py train`: training tokens/s and MFU, ours vs Hugging Face PyTorch, same run.

Both sides take the same step on the same batch shape: forward, backward, global-norm clipping at 1.0
and an AdamW update (betas 0.9/0.95, eps 1e-8), float32, dropout 0.1, on a random-init model of the
125m shape (OPTConfig.from_preset("125m")), batch 4 x 512 of fully packed rows, with either
  --data lm           random tokens, loss on every position (language modelling), or
  --data instruction  rows packed from the Super-NaturalInstructions sample in data/sni exactly as
                      fine-tuning packs them (zero-shot prompts, demo tokenizer), loss on the target
                      tokens only: about 3% of positions. HF gets the same tokens with labels -100
                      elsewhere (its usual way to mask a loss) and attends across the packed examples
                      (it has no segment ids): the same FLOPs as our segment-masked attention. The
                      last position of each row carries no loss on either side (HF's labels cannot
                      give it a target).

MFU = tokens/s x FLOPs per token / peak, with FLOPs per token = 6 N_nonembedding + 6 d V + 12 L S d
(the last term is attention) and the peak the best float32 FLOP/s of a large square matmul measured
here, with JAX and with PyTorch (the better one), in the same run. Each side, and each peak, runs in
a fresh process of its own, one after the other.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_worker import one_device_train_step, report, run_in_fresh_process  # noqa: E402


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python tools/benchmark.py train", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--preset", default="125m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per side (after 2 warm-up steps)")
    parser.add_argument(
        "--variants",
        default="scan",
        help="comma-separated JAX variants: scan or unscanned, optionally +remat=<policy> and "
        "+head=all (the LM head at every position, not only where there is loss)",
    )
    parser.add_argument("--data", default="lm", choices=("lm", "instruction"))
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure every side this many times, alternating (HF, ours, HF, ours...); the table "
        "gives the median step and the median of each round's ratio to HF",
    )
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one measurement (see main)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    return args


def matmul_peak_torch(size=2048, repeats=5) -> float:
    import torch

    a = torch.randn(size, size)
    a @ a
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def make_batch(kind, vocab_size, batch, seq_len) -> dict:
    """The benchmark batch as numpy arrays in our layout (see optiml_jax/data/packing.py)."""
    import numpy as np

    if kind == "instruction":
        from types import SimpleNamespace

        from optiml_jax.data import DataConfig, build_train_loader
        from optiml_jax.tokenizer import OPTTokenizer

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        cfg = SimpleNamespace(
            data=DataConfig(train=os.path.join(root, "optiml_jax", "assets", "data", "sni")),
            seed=0,
            train=SimpleNamespace(batch_size=batch, seq_len=seq_len),
        )
        tokenizer = OPTTokenizer.from_pretrained(os.path.join(root, "optiml_jax", "assets", "demo_tokenizer"))
        out = dict(next(build_train_loader(cfg, tokenizer, process_index=0, process_count=1)))
    else:
        ids = np.random.default_rng(0).integers(4, vocab_size, size=(batch, seq_len + 1)).astype(np.int32)
        out = {
            "input_ids": ids[:, :-1],
            "targets": ids[:, 1:],
            "loss_mask": np.ones((batch, seq_len), np.float32),
            "segment_ids": np.ones((batch, seq_len), np.int32),
            "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy(),
        }
    out["loss_mask"] = out["loss_mask"].copy()
    out["loss_mask"][:, -1] = 0.0  # see the module doc
    return out


def bench_jax(config, data, steps, scan_layers=True, remat="none", head_positions="weighted") -> dict:
    import jax
    import numpy as np

    from optiml_jax.train import global_batch

    batch, seq_len = data["input_ids"].shape
    step_fn, state, mesh, _ = one_device_train_step(
        config,
        batch,
        seq_len,
        {"lr": 5e-5, "weight_decay": 0.0, "clip_norm": 1.0},
        compute_dtype="float32",
        scan_layers=scan_layers,
        remat_policy=remat,
        dropout=0.1,
        attention_dropout=0.0,
        head_positions=head_positions,
    )
    data = global_batch(data, mesh, batch)
    start = time.perf_counter()
    state, metrics = step_fn(state, data)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    state, metrics = step_fn(state, data)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step_fn(state, data)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return {"step_s": float(np.median(times)), "first_step_s": compile_s, "loss": float(metrics["loss"])}


def bench_hf(config, data, steps) -> dict:
    import numpy as np
    import torch
    import transformers

    torch.manual_seed(0)
    hf_config = transformers.OPTConfig(**{**config.to_dict(), "dropout": 0.1, "attention_dropout": 0.0})
    model = transformers.OPTForCausalLM(hf_config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    ids = torch.as_tensor(data["input_ids"], dtype=torch.long)
    # HF predicts labels[:, t + 1] at position t: our targets, shifted, with -100 where there is no loss.
    labels = torch.full_like(ids, -100)
    labels[:, 1:] = torch.where(
        torch.as_tensor(data["loss_mask"][:, :-1] > 0),
        torch.as_tensor(data["targets"][:, :-1], dtype=torch.long),
        -100,
    )

    def step():
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
    return {
        "step_s": float(np.median(times)),
        "first_step_s": first,
        "loss": loss,
        "attn_implementation": model.config._attn_implementation,
        "threads": torch.get_num_threads(),
    }


def _variant_options(variant: str) -> dict:
    parts = variant.split("+")
    remat = next((p.split("=", 1)[1] for p in parts if p.startswith("remat=")), "none")
    return dict(
        scan_layers="unscanned" not in parts,
        remat=remat,
        head_positions="all" if "head=all" in parts else "weighted",
    )


def run_worker(args) -> dict:
    """One measurement, in this (fresh) process: see main()."""
    from optiml_jax.config import OPTConfig

    if args.worker == "peak-jax":
        import jax

        from optiml_jax.train import measure_matmul_peak

        return {
            "flops": measure_matmul_peak(size=2048),
            "version": jax.__version__,
            "platform": jax.devices()[0].platform,
        }
    if args.worker == "peak-torch":
        import torch

        return {
            "flops": matmul_peak_torch(),
            "version": torch.__version__,
            "threads": torch.get_num_threads(),
        }
    config = OPTConfig.from_preset(args.preset)
    data = make_batch(args.data, config.vocab_size, args.batch, args.seq_len)
    result = {
        "positions_with_loss": int(data["loss_mask"].sum()),
        "most_in_a_row": int(data["loss_mask"].sum(1).max()),
    }
    if args.worker == "hf-pytorch":
        return {**result, **bench_hf(config, data, args.steps)}
    return {**result, **bench_jax(config, data, args.steps, **_variant_options(args.worker[len("jax-") :]))}


def _in_fresh_process(args, worker: str) -> dict:
    return run_in_fresh_process(
        __file__,
        worker,
        [
            "--preset",
            args.preset,
            "--batch",
            str(args.batch),
            "--seq-len",
            str(args.seq_len),
            "--steps",
            str(args.steps),
            "--data",
            args.data,
        ],
    )


def main(argv=None) -> int:
    args = parse_args(argv if argv is not None else sys.argv[1:])
    if args.worker:
        return report(run_worker(args))
    from optiml_jax.config import OPTConfig
    from optiml_jax.train import flops_per_token

    config = OPTConfig.from_preset(args.preset)
    flops = flops_per_token(config, args.seq_len)
    tokens = args.batch * args.seq_len
    peak_jax, peak_torch = (_in_fresh_process(args, name) for name in ("peak-jax", "peak-torch"))
    peak = max(peak_jax["flops"], peak_torch["flops"])
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; jax "
        f"{peak_jax['version']} "
        f"({peak_jax['platform']}), torch {peak_torch['version']} ({peak_torch['threads']} threads); "
        "each side and "
        f"each peak measured in a fresh process, one after the other"
    )
    # docs/benchmarks.md: on CPU, glibc returning and re-faulting large buffers every step costs each side
    # 10-20%.
    print(f"malloc: GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES') or '(unset: glibc defaults)'}")
    print(
        f"model {args.preset}: batch {args.batch} x {args.seq_len}; FLOPs/token {flops['total'] / 1e6:.1f} M "
        f"= 6N {flops['dense'] / 1e6:.1f} M + 6dV {flops['lm_head'] / 1e6:.1f} M + attention 12LSd "
        f"{flops['attention'] / 1e6:.1f} M"
    )
    print(
        f"float32 matmul peak (2048^2): jax {peak_jax['flops'] / 1e9:.1f} GFLOP/s, torch "
        f"{peak_torch['flops'] / 1e9:.1f} GFLOP/s; MFU is against {peak / 1e9:.1f}"
    )
    workers = ([] if args.skip_hf else ["hf-pytorch"]) + [f"jax-{v}" for v in args.variants.split(",")]
    # This VM's speed drifts by 20-40% within an hour, so one run of each side can land in different
    # phases. Alternating rounds, each side's ratio taken against HF of the same round, drift less.
    rounds = []
    for round_index in range(args.rounds):
        rounds.append({})
        for worker in workers:
            rounds[-1][worker] = _in_fresh_process(args, worker)
            print(f"round {round_index + 1}: {worker}: {rounds[-1][worker]['step_s']:.2f} s/step", flush=True)
    results = {}
    for worker in workers:
        runs = [r[worker] for r in rounds]
        results[worker] = {
            **runs[-1],
            "step_s": statistics.median(r["step_s"] for r in runs),
            "step_s_per_round": [r["step_s"] for r in runs],
        }
        if "hf-pytorch" in workers:
            results[worker]["ratio_per_round"] = [
                r["hf-pytorch"]["step_s"] / r[worker]["step_s"] for r in rounds
            ]
    first = next(iter(results.values()))
    print(
        f"data: {args.data}; loss on {first['positions_with_loss']} of {tokens} positions (at most "
        f"{first['most_in_a_row']} in a row); {len(rounds)} round(s)"
    )
    print(
        "\n| implementation | step (s) | tokens/s | MFU | vs HF PyTorch | per round | first step (s) | loss |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        tps = tokens / r["step_s"]
        r.update(tokens_per_s=tps, mfu=tps * flops["total"] / peak)
        ratios = r.get("ratio_per_round")
        ratio = f"{statistics.median(ratios):.2f}x" if ratios else "-"
        per_round = [f"{s:.2f} s" for s in r["step_s_per_round"]]
        if ratios:
            per_round = [f"{s} ({q:.2f}x)" for s, q in zip(per_round, ratios)]
        per_round = ", ".join(per_round)
        print(
            f"| {name} | {r['step_s']:.2f} | {tps:.1f} | {100 * r['mfu']:.1f}% | {ratio} | {per_round} | "
            f"{r['first_step_s']:.1f} | {r['loss']:.3f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"peak_flops": peak, "flops_per_token": flops, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
