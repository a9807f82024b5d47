"""Builds the shipped demo tokenizer: a small byte-level BPE trained on the repo's SNI task files.

The real OPT vocabulary (50265 GPT-2 tokens) cannot be shipped or downloaded here, so tests and demos
use this stand-in. It has OPT's special ids (`<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3) and OPT's hub
layout, so every code path is the one the real tokenizer takes.

    python tools/build_demo_tokenizer.py                      # reads optiml_jax/assets/data/sni/*.json
    python tools/build_demo_tokenizer.py --sni-dir /work/shared/data/sni

Texts: each task's Definition, and each instance's input and outputs. Files are read in sorted name
order, so the same files give the same vocabulary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing the package

from optiml_jax.tokenizer import train_byte_level_bpe  # noqa: E402

DEFAULT_SNI_DIR = REPO / "optiml_jax" / "assets" / "data" / "sni"
DEFAULT_OUT = REPO / "optiml_jax" / "assets" / "demo_tokenizer"


def sni_texts(sni_dir: Path):
    """Yields the Definition, inputs and outputs of every `*.json` task file in `sni_dir`."""
    files = sorted(sni_dir.glob("*.json"))
    if not files:
        raise FileNotFoundError(f"no SNI task files (*.json) in {sni_dir}; pass --sni-dir")
    for path in files:
        try:
            task = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from e
        if not isinstance(task, dict) or "Definition" not in task or "Instances" not in task:
            raise ValueError(f"{path}: not an SNI task file (needs 'Definition' and 'Instances' keys)")
        # Definition is a list of strings in SNI v2; accept a bare string too.
        definition = task["Definition"]
        yield from ([definition] if isinstance(definition, str) else definition)
        for i, instance in enumerate(task["Instances"]):
            if "input" not in instance or "output" not in instance:
                raise ValueError(f"{path}: Instances[{i}] lacks 'input' or 'output'")
            yield instance["input"]
            outputs = instance["output"]
            yield from ([outputs] if isinstance(outputs, str) else outputs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sni-dir",
        type=Path,
        default=DEFAULT_SNI_DIR,
        help=f"folder of SNI task *.json files (default: {DEFAULT_SNI_DIR.relative_to(REPO)})",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"output folder (default: {DEFAULT_OUT.relative_to(REPO)})",
    )
    parser.add_argument("--vocab-size", type=int, default=2048)
    args = parser.parse_args(argv)

    texts = list(sni_texts(args.sni_dir))
    tokenizer = train_byte_level_bpe(texts, vocab_size=args.vocab_size)
    out = tokenizer.save_pretrained(args.out)
    size_kb = sum(p.stat().st_size for p in out.iterdir()) / 1024
    n_tokens = sum(len(ids) for ids in tokenizer.encode_batch(texts, add_bos=False))
    print(
        f"trained on {len(texts)} texts from {args.sni_dir}: vocab_size={tokenizer.vocab_size}, "
        f"{n_tokens} tokens ({sum(map(len, texts)) / n_tokens:.2f} chars/token); wrote {out} "
        f"({size_kb:.0f} KB)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
