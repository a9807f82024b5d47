"""Test setup: 8 host CPU devices (set before jax is imported) so sharding code runs for real."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Float32 parity with PyTorch needs true float32 matmuls: on A100/H100 jax defaults to TF32 (and on TPU
# to bfloat16 passes). The variable reaches the subprocesses of CLI tests too. A GPU run of the suite:
# JAX_PLATFORMS=cuda python -m pytest
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


# ---------------------------------------------------------------------- tokenizer fixtures
import pytest  # noqa: E402


def _tokenizer_corpus() -> list[str]:
    """A few KB of varied text (English, punctuation, digits, whitespace runs, unicode, emoji) so a
    ~1000-token BPE has real merges, and every hard test text meets familiar and unfamiliar pieces."""
    sentences = [
        "The quick brown fox jumps over the lazy dog.",
        "In this task, you are given a question and you need to answer it with a single word.",
        "Definition: classify the sentiment of the given sentence as positive or negative.",
        "Input: What is the capital of France? Output: Paris",
        "Don't stop; it's what we'll do, they're sure, I'm certain, you've seen, he'd agree.",
        "Numbers like 12, 345, 6789 and 3.14159 appear in arithmetic word problems.",
        "    indented code block\n\tdef f(x):\n\t\treturn x * 2\n",
        "Line one\nLine two\n\nParagraph three   with   extra   spaces.",
        "Unicode text: café, naïve, Zürich, Ångström, façade, coöperate — “quoted” ‘text’ …",
        "日本語のテキストと中文文本，한국어 텍스트도 있습니다。",
        "Emoji: 😀 😂 🎉 👍🏽 ❤️ 🇫🇷 👨‍👩‍👧",
        "Русский текст и ελληνικά γράμματα, plus العربية and עברית.",
    ]
    words = (
        "answer question task input output example positive negative sentence word given "
        "return label category country capital city person entity poem subtract total "
        "Definition Instances classification generation extraction relation antonym trivia "
        "commonsense semantic sentiment Afghanistan Kabul Germany Berlin Japan Tokyo"
    ).split()
    # Deterministic filler so frequent pairs exist beyond the fixed sentences.
    filler = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)) + "." for i in range(120)]
    filler += [f"Item {i}: {i * 37 % 1000} apples, {i * 11 % 97} pears ({i % 7} left)." for i in range(200)]
    return sentences * 20 + filler


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A ~1000-token byte-level BPE with OPT's special ids, saved in the facebook/opt-* hub layout."""
    from optiml_jax.tokenizer import train_byte_level_bpe

    directory = tmp_path_factory.mktemp("opt_tokenizer")
    train_byte_level_bpe(_tokenizer_corpus(), vocab_size=1000).save_pretrained(directory)
    return directory


# ---------------------------------------------------------------------- fine-tuning fixtures
@pytest.fixture(scope="module")
def tiny_preset(tmp_path_factory):
    """A model preset file (2 layers, hidden 32, the demo tokenizer's 2048-entry vocabulary)."""
    import yaml
    from finetune_helpers import TINY_MODEL

    path = tmp_path_factory.mktemp("model") / "opt-test.yaml"
    path.write_text(yaml.safe_dump(TINY_MODEL))
    return str(path)
