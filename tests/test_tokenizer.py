"""OPTTokenizer: ids equal to transformers' OPT tokenizer and to GPT-2's reference BPE; files; errors.

The real 50k OPT vocabulary is not available offline, so a BPE trained on a small corpus (conftest's
`tokenizer_dir`, saved in the facebook/opt-* hub layout) and the shipped demo tokenizer stand in.
"""

import json
import os
import shutil
from functools import lru_cache

import pytest

from optiml_jax.tokenizer import DEMO_TOKENIZER_DIR, OPTTokenizer, train_byte_level_bpe

transformers = pytest.importorskip("transformers")

HARD_TEXTS = [
    "Hello world",
    " leading space",
    "  two leading spaces",
    "multiple     spaces   inside",
    "trailing spaces   ",
    "line one\nline two\n\nline four\n",
    "\ttab\tseparated\t\tvalues\t",
    "windows\r\nnewline",
    "",
    " ",
    "\n",
    "   \n\t  ",
    "unicode: café naïve Zürich — “quotes” ½ ∑ ß",
    "CJK 日本語のテキスト 한국어",
    "emoji 😀🎉👍🏽 👨‍👩‍👧 flags 🇫🇷",
    "decomposed e\u0301 and composed é; nbsp\u00a0here; zero\u200bwidth",
    "contractions: don't it's we'll they're I'm you've he'd",
    "numbers 1234567 3.14159 -42 1e-9",
    # Special-token strings in text: the OPT hub config makes "</s>" and "<pad>" special (ids 2, 1);
    # "<s>" and "<unk>" are ordinary text.
    "special </s> in text",
    "</s>",
    "<pad>",
    "<s>",
    "<unk>",
    "a</s>b<pad>c<s>d<unk>e",
    "</s></s> <pad><pad>",
    " </s> ",
    "<|endoftext|>",
]
SPECIAL_STRINGS = ("</s>", "<pad>")


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return OPTTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def hf_tok(tokenizer_dir):
    return transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))


# ---------------------------------------------------------------------- an independent reference
@lru_cache()
def _bytes_to_unicode():
    # GPT-2's byte -> printable character table (openai/gpt-2 encoder.py).
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class ReferenceGPT2BPE:
    """GPT-2's original pure-Python BPE (what transformers 4's slow GPT2Tokenizer ran), with the
    special strings split out first. transformers 5 has no slow tokenizer, and both our class and
    its GPT2Tokenizer run the `tokenizers` library, so this is the only check that does not."""

    def __init__(self, directory, special_strings=SPECIAL_STRINGS):
        regex = pytest.importorskip("regex")
        self.vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
        lines = (directory / "merges.txt").read_text(encoding="utf-8").split("\n")[1:]
        self.ranks = {tuple(line.split(" ")): i for i, line in enumerate(merge for merge in lines if merge)}
        self.pat = regex.compile(
            r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
        )
        self.special = regex.compile("(" + "|".join(regex.escape(s) for s in special_strings) + ")")
        self.special_strings = set(special_strings)

    def bpe(self, word):
        word = tuple(word)
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return word

    def encode(self, text):
        ids = []
        for piece in self.special.split(text):
            if piece in self.special_strings:
                ids.append(self.vocab[piece])
                continue
            for match in self.pat.findall(piece):
                chars = "".join(_bytes_to_unicode()[b] for b in match.encode("utf-8"))
                ids.extend(self.vocab[t] for t in self.bpe(chars))
        return ids


# ---------------------------------------------------------------------- ids
def test_special_ids_and_sizes(tok, hf_tok, tokenizer_dir):
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (2, 2, 1, 3)
    assert [tok.id_to_token(i) for i in range(4)] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert tok.vocab_size == len(hf_tok) == len(json.loads((tokenizer_dir / "vocab.json").read_text()))
    assert 900 <= tok.vocab_size <= 1000
    # transformers' view of the same files: BOS = EOS = "</s>", and unk is "</s>" too (hub config).
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id, hf_tok.unk_token_id) == (
        2,
        2,
        1,
        2,
    )


def test_transformers_5_uses_one_tokenizers_backed_class(tokenizer_dir):
    # transformers 5 dropped the slow (pure-Python) GPT2Tokenizer: use_fast=False is ignored and both
    # requests give the `tokenizers`-backed GPT2Tokenizer. The slow algorithm is covered by
    # ReferenceGPT2BPE below instead.
    fast = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    slow = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir), use_fast=False)
    assert type(fast).__name__ in ("GPT2Tokenizer", "GPT2TokenizerFast")
    if int(transformers.__version__.split(".")[0]) >= 5:
        assert type(slow) is type(fast)


@pytest.mark.parametrize("use_fast", [True, False], ids=["fast", "slow-request"])
@pytest.mark.parametrize("text", HARD_TEXTS)
def test_ids_match_transformers(tok, tokenizer_dir, text, use_fast):
    hf = _hf(tokenizer_dir, use_fast)
    assert tok.encode(text) == hf(text)["input_ids"]  # HF prepends "</s>"
    assert tok.encode(text, add_bos=False) == hf(text, add_special_tokens=False)["input_ids"]


@lru_cache()
def _hf(directory, use_fast):
    return transformers.AutoTokenizer.from_pretrained(str(directory), use_fast=use_fast)


@pytest.mark.parametrize("text", HARD_TEXTS)
def test_ids_match_reference_gpt2_bpe(tok, tokenizer_dir, text):
    assert tok.encode(text, add_bos=False) == ReferenceGPT2BPE(tokenizer_dir).encode(text)


def test_special_strings_in_text(tok):
    assert tok.encode("</s>", add_bos=False) == [2]
    assert tok.encode("<pad>", add_bos=False) == [1]
    assert tok.encode("x</s>", add_bos=False)[-1] == 2
    # Not special for the OPT hub tokenizer: split into ordinary pieces, never ids 0 / 3.
    for text in ("<s>", "<unk>"):
        ids = tok.encode(text, add_bos=False)
        assert len(ids) > 1 and not {0, 3} & set(ids)
    assert tok.encode("", add_bos=True) == [2]
    assert tok.encode("", add_bos=False) == []


def test_batch_equals_single(tok):
    for add_bos in (True, False):
        assert tok.encode_batch(HARD_TEXTS, add_bos=add_bos) == [
            tok.encode(t, add_bos=add_bos) for t in HARD_TEXTS
        ]
    assert tok.encode_batch([]) == []
    with pytest.raises(TypeError, match="list of strings"):
        tok.encode_batch("one string")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        tok.encode_batch(["ok", 3])


# ---------------------------------------------------------------------- decode
@pytest.mark.parametrize("text", HARD_TEXTS)
def test_decode_round_trip(tok, hf_tok, text):
    ids = tok.encode(text, add_bos=False)
    assert tok.decode(ids, skip_special_tokens=False) == text
    if not any(s in text for s in SPECIAL_STRINGS):
        assert tok.decode(ids) == text
    for skip in (True, False):
        with_bos = tok.encode(text)
        assert tok.decode(with_bos, skip_special_tokens=skip) == hf_tok.decode(
            with_bos, skip_special_tokens=skip, clean_up_tokenization_spaces=False
        )


def test_decode_skips_all_four_specials_and_rejects_unknown_ids(tok):
    body = tok.encode("hi there", add_bos=False)
    assert tok.decode([0, 1, 2, 3] + body + [2, 1, 1]) == "hi there"
    assert tok.decode([2] + body, skip_special_tokens=False) == "</s>hi there"
    assert tok.decode_batch([[2] + body, body + [2, 1]]) == ["hi there", "hi there"]
    import numpy as np

    assert tok.decode(np.array([2] + body)) == "hi there"
    with pytest.raises(ValueError, match=f"token id {tok.vocab_size} is outside"):
        tok.decode(body + [tok.vocab_size])
    with pytest.raises(ValueError, match="token id -1"):
        tok.decode([-1])


def test_decode_of_a_cut_character_is_replacement_char(tok):
    ids = tok.encode("😀", add_bos=False)
    assert len(ids) > 1  # a 4-byte emoji is several byte tokens in a small vocabulary
    assert "\ufffd" in tok.decode(ids[:1])


# ---------------------------------------------------------------------- files
def test_save_pretrained_round_trip(tok, tmp_path):
    out = tok.save_pretrained(tmp_path / "saved")
    assert sorted(os.listdir(out)) == [
        "merges.txt",
        "special_tokens_map.json",
        "tokenizer_config.json",
        "vocab.json",
    ]
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "GPT2Tokenizer" and config["add_bos_token"] is True
    assert json.loads((out / "special_tokens_map.json").read_text())["bos_token"]["content"] == "</s>"
    assert (out / "merges.txt").read_text().startswith("#version: 0.2\n")
    ours, hf = OPTTokenizer.from_pretrained(out), transformers.AutoTokenizer.from_pretrained(str(out))
    for text in HARD_TEXTS:
        assert ours.encode(text) == tok.encode(text) == hf(text)["input_ids"]
    # Saving over an existing save is fine and leaves no temporary files.
    ours.save_pretrained(out)
    assert sorted(os.listdir(out)) == [
        "merges.txt",
        "special_tokens_map.json",
        "tokenizer_config.json",
        "vocab.json",
    ]


def test_load_from_tokenizer_json_only(tok, hf_tok, tmp_path):
    # transformers 5's save_pretrained writes tokenizer.json + tokenizer_config.json, no vocab/merges.
    hf_dir = tmp_path / "hf_saved"
    hf_tok.save_pretrained(str(hf_dir))
    assert (hf_dir / "tokenizer.json").is_file() and not (hf_dir / "vocab.json").exists()
    from_json = OPTTokenizer.from_pretrained(hf_dir)
    hf_again = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    for text in HARD_TEXTS:
        assert from_json.encode(text) == tok.encode(text) == hf_again(text)["input_ids"]
    # A bare tokenizer.json, no config at all: the OPT hub special tokens are assumed.
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(hf_dir / "tokenizer.json", bare / "tokenizer.json")
    assert [OPTTokenizer.from_pretrained(bare).encode(t) for t in HARD_TEXTS] == [
        tok.encode(t) for t in HARD_TEXTS
    ]


def test_tokenizer_json_wins_over_vocab_and_merges(tok, hf_tok, tmp_path):
    hf_tok.save_pretrained(str(tmp_path))
    (tmp_path / "vocab.json").write_text("{broken")
    (tmp_path / "merges.txt").write_text("")
    assert OPTTokenizer.from_pretrained(tmp_path).encode("Hello world") == tok.encode("Hello world")


# ---------------------------------------------------------------------- errors
def test_missing_directory_error_names_the_path(tmp_path):
    missing = tmp_path / "no" / "such"
    with pytest.raises(FileNotFoundError) as e:
        OPTTokenizer.from_pretrained(missing)
    assert str(missing) in str(e.value) and "vocab.json" in str(e.value)


def test_missing_files_error_names_the_directory_and_files(tokenizer_dir, tmp_path):
    shutil.copy(tokenizer_dir / "vocab.json", tmp_path / "vocab.json")
    with pytest.raises(FileNotFoundError) as e:
        OPTTokenizer.from_pretrained(tmp_path)
    message = str(e.value)
    assert str(tmp_path) in message
    assert all(name in message for name in ("tokenizer.json", "vocab.json", "merges.txt"))
    with pytest.raises(NotADirectoryError, match="vocab.json"):
        OPTTokenizer.from_pretrained(tmp_path / "vocab.json")


def test_non_opt_vocab_and_config_errors_name_the_file(tokenizer_dir, tmp_path):
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tokenizer_dir / name, tmp_path / name)
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    vocab["<s>"], vocab["<unk>"] = vocab["<unk>"], vocab["<s>"]
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(ValueError, match=r"vocab\.json.*'<s>' at id 0"):
        OPTTokenizer.from_pretrained(tmp_path)

    shutil.copy(tokenizer_dir / "vocab.json", tmp_path / "vocab.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: bos_token is '<s>'.*'</s>'"):
        OPTTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: not valid JSON"):
        OPTTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b c\n")
    with pytest.raises(ValueError, match=r"merges\.txt:2"):
        OPTTokenizer.from_pretrained(tmp_path)


def test_offline_hub_id_error_says_pass_a_local_directory(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    hub_id = "optiml-jax-test/no-such-tokenizer"
    with pytest.raises(OSError) as e:
        OPTTokenizer.from_pretrained(hub_id)
    assert hub_id in str(e.value) and "local directory" in str(e.value)


def test_hub_id_loads_what_snapshot_download_returns(tokenizer_dir, tok, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(tokenizer_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    loaded = OPTTokenizer.from_pretrained("facebook/opt-125m")
    assert calls[0][0] == "facebook/opt-125m"
    assert {"vocab.json", "merges.txt", "tokenizer.json"} <= set(calls[0][1])
    assert loaded.encode("Hello world") == tok.encode("Hello world")


# ---------------------------------------------------------------------- training
def test_train_byte_level_bpe():
    trained = train_byte_level_bpe(["hello hello world"] * 10, vocab_size=300)
    assert [trained.id_to_token(i) for i in range(4)] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert 260 < trained.vocab_size <= 300
    text = "never seen: ÿ€😀\x00"  # every byte has a token, so nothing is unknown
    assert trained.decode(trained.encode(text)) == text
    with pytest.raises(ValueError, match="vocab_size must be an integer >= 260"):
        train_byte_level_bpe(["x"], vocab_size=100)


# ---------------------------------------------------------------------- shipped demo tokenizer
def test_demo_tokenizer_ships_loads_and_round_trips():
    files = sorted(os.listdir(DEMO_TOKENIZER_DIR))
    assert files == ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    assert sum((DEMO_TOKENIZER_DIR / f).stat().st_size for f in files) < 200_000
    demo = OPTTokenizer.from_pretrained(DEMO_TOKENIZER_DIR)
    assert demo.vocab_size == 2048
    hf = transformers.AutoTokenizer.from_pretrained(str(DEMO_TOKENIZER_DIR))
    sample = "In this task, you are given a country name and you need to return the capital city."
    assert len(demo.encode(sample, add_bos=False)) < len(sample) / 2  # trained on such text: real merges
    for text in HARD_TEXTS + [sample]:
        assert demo.encode(text) == hf(text)["input_ids"]
        assert demo.decode(demo.encode(text, add_bos=False), skip_special_tokens=False) == text
