"""OPTTokenizer: OPT's GPT-2 byte-level BPE on the `tokenizers` library, id-for-id equal to Hugging Face.

OPT (and OPT-IML) use GPT-2's byte-level BPE with metaseq's re-indexed vocabulary: ids 0..3 are
`<s>`, `<pad>`, `</s>`, `<unk>`; BOS and EOS are both `</s>` (id 2), padding is id 1. Hugging Face
prepends `</s>` to every text; metaseq's training data has no leading BOS, so `encode` takes `add_bos`
(default True: `encode` is id-for-id Hugging Face's tokenizer call). What a model is *given* -- training
examples, evaluation prompts, scored contexts, pipeline and CLI prompts -- follows PROMPT_ADD_BOS
instead (docs/evaluation.md, "Prompt convention").

What a directory holds (either is enough; both as the hub ships them):
  * `vocab.json` + `merges.txt` (what facebook/opt-* ship), or
  * `tokenizer.json` (what transformers 5 `save_pretrained` writes). When both exist, `tokenizer.json`
    wins, because that is the file transformers loads, and we promise the same ids as transformers.
  * optional `tokenizer_config.json` / `special_tokens_map.json`: they say which special-token strings
    are recognised inside text. The OPT hub files name only `</s>` (as bos, eos *and* unk) and `<pad>`,
    so Hugging Face turns "</s>" and "<pad>" in text into ids 2 and 1, but splits "<s>" and "<unk>" into
    ordinary BPE pieces. We do the same. Without these files the OPT hub values are assumed.

`unk_id` is the vocabulary's `<unk>` (3), not Hugging Face's `unk_token_id` (2, because the hub config
says unk_token="</s>"). A byte-level BPE never needs it: every byte has a token.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from optiml_jax.fileio import write_text_atomic

# metaseq's dictionary order; OPT checkpoints are trained with exactly these ids.
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")
_EXPECTED_IDS = {token: i for i, token in enumerate(SPECIAL_TOKENS)}

# What facebook/opt-125m's tokenizer_config.json / special_tokens_map.json say. Used for a directory
# without those files and for trained tokenizers, so everything behaves like the released models.
OPT_HUB_SPECIAL_TOKENS = {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>"}
# The ids are fixed by the OPT checkpoints, so a config naming other strings for these roles is refused
# rather than silently giving ids the model was not trained with.
_REQUIRED_ROLE_TOKENS = {"bos_token": "</s>", "eos_token": "</s>", "pad_token": "<pad>"}

VOCAB_FILE, MERGES_FILE, TOKENIZER_FILE = "vocab.json", "merges.txt", "tokenizer.json"
CONFIG_FILE, SPECIAL_MAP_FILE = "tokenizer_config.json", "special_tokens_map.json"
TOKENIZER_FILES = (VOCAB_FILE, MERGES_FILE, TOKENIZER_FILE, CONFIG_FILE, SPECIAL_MAP_FILE)

# Small BPE trained on the repo's SNI sample by tools/build_demo_tokenizer.py: a stand-in for the real
# 50k vocabulary in tests and demos (same special ids, same file layout).
DEMO_TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "demo_tokenizer"

# The project's one prompt convention: no `</s>` before a prompt, as metaseq's OPT-IML fine-tuning data
# (`streaming_finetune_language_modeling._tokenize_src_tgt_json`: encode(src + " " + tgt) + [eod]) and so
# our packing have none. Training, evaluation (generation and rank scoring), the pipeline and
# optiml-generate all follow it; evaluation, the pipeline and optiml-generate take `add_bos=True` to
# prepend `</s>` as Hugging Face's tokenizer and metaseq's generator do.
PROMPT_ADD_BOS = False

# "owner/name" as the hub spells repo ids; anything else that does not exist is a missing directory.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class OPTTokenizer:
    """Byte-level BPE with OPT's special tokens. Build with `from_pretrained` or `train_byte_level_bpe`."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        special_tokens_map: Optional[dict] = None,
        extra_special_tokens: Sequence[Any] = (),
        source: str = "tokenizer",
    ):
        """`tokenizer` must be a byte-level BPE whose ids 0..3 are `<s>`, `<pad>`, `</s>`, `<unk>`.

        `special_tokens_map` (Hugging Face role -> token string or AddedToken dict) and
        `extra_special_tokens` are the strings recognised in text, as transformers would add them.
        `source` names the file(s) in error messages. `tokenizer` is taken over (special tokens are
        added to it in place).
        """
        self._source = source
        for token, expected in _EXPECTED_IDS.items():
            got = tokenizer.token_to_id(token)
            if got != expected:
                raise ValueError(
                    f"{source}: OPT needs token {token!r} at id {expected}, found "
                    f"{'no such token' if got is None else f'id {got}'}; this is not an OPT vocabulary"
                )
        self._special_map = dict(OPT_HUB_SPECIAL_TOKENS if special_tokens_map is None else special_tokens_map)
        for role, required in _REQUIRED_ROLE_TOKENS.items():
            value = self._special_map.get(role)
            if value is not None and _content(value) != required:
                raise ValueError(
                    f"{source}: {role} is {_content(value)!r}, but OPT models need {required!r} "
                    f"(id {_EXPECTED_IDS[required]})"
                )
        self._extra_special = list(extra_special_tokens)
        # Register the strings transformers would match in text. Tokens already in the vocabulary keep
        # their ids; adding one twice is a no-op in `tokenizers`.
        # (An `added_tokens_decoder` entry may be marked non-special: matched in text, kept by decode.)
        added = [_added_token(v) for v in self._special_map.values() if v is not None]
        added += [_added_token(v) for v in self._extra_special]
        tokenizer.add_special_tokens([t for t in added if t.special])
        tokenizer.add_tokens([t for t in added if not t.special])
        self._tok = tokenizer
        # Skipped by `decode(skip_special_tokens=True)`: metaseq treats all four as non-text, and the
        # added special tokens are non-text for transformers.
        self._skip_ids = frozenset(_EXPECTED_IDS.values()) | {
            tokenizer.token_to_id(t.content) for t in added if t.special
        }

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "OPTTokenizer":
        """Loads from a local directory, or from a hub id ("owner/name") already in the local cache.

        A hub id is fetched with `huggingface_hub.snapshot_download`; offline, that only succeeds for a
        cached repo, and otherwise the error says to pass a local directory.
        """
        directory = Path(path).expanduser()
        if not directory.is_dir():
            name = os.fspath(path)
            if directory.exists():
                raise NotADirectoryError(
                    f"tokenizer path {name!r} is a file; pass the directory holding "
                    f"{VOCAB_FILE} + {MERGES_FILE} or {TOKENIZER_FILE}"
                )
            if not _HUB_ID.match(name):
                raise FileNotFoundError(
                    f"tokenizer directory {name!r} does not exist (looked for "
                    f"{VOCAB_FILE} + {MERGES_FILE} or {TOKENIZER_FILE} in it)"
                )
            directory = _download_from_hub(name)
        return cls._from_directory(directory)

    @classmethod
    def _from_directory(cls, directory: Path) -> "OPTTokenizer":
        tokenizer_json, vocab, merges = (directory / f for f in (TOKENIZER_FILE, VOCAB_FILE, MERGES_FILE))
        if tokenizer_json.is_file():
            source = str(tokenizer_json)
            try:
                tokenizer = Tokenizer.from_file(source)
            except Exception as e:  # tokenizers raises a bare Exception for malformed JSON
                raise ValueError(f"{source}: not a valid tokenizers file: {e}") from e
            model_type = json.loads(tokenizer.to_str())["model"].get("type")
            if model_type != "BPE":
                raise ValueError(f"{source}: model type is {model_type!r}; OPT uses a byte-level 'BPE'")
        elif vocab.is_file() and merges.is_file():
            source = f"{vocab} + {merges}"
            tokenizer = _byte_level_bpe(_read_vocab(vocab), _read_merges(merges))
        else:
            present = sorted(p.name for p in directory.iterdir())
            raise FileNotFoundError(
                f"tokenizer directory {str(directory)!r} has neither {TOKENIZER_FILE} nor both {VOCAB_FILE} "
                f"and {MERGES_FILE} (it holds: {', '.join(present) or 'nothing'})"
            )
        special_map, extra = _read_special_tokens(directory)
        return cls(tokenizer, special_map, extra, source=source)

    # ------------------------------------------------------------------ vocabulary facts
    @property
    def bos_id(self) -> int:
        return _EXPECTED_IDS["</s>"]  # OPT's BOS is `</s>`, not `<s>`

    @property
    def eos_id(self) -> int:
        return _EXPECTED_IDS["</s>"]

    @property
    def pad_id(self) -> int:
        return _EXPECTED_IDS["<pad>"]

    @property
    def unk_id(self) -> int:
        return _EXPECTED_IDS["<unk>"]

    @property
    def vocab_size(self) -> int:
        """Tokens in this vocabulary (50265 for OPT), not the model's padded embedding rows (50272)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> Tokenizer:
        """The underlying `tokenizers.Tokenizer` (use `add_special_tokens=False`; BOS is ours to add)."""
        return self._tok

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> Optional[str]:
        return self._tok.id_to_token(token_id)

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`; `add_bos=True` prepends `</s>` as Hugging Face does, False as metaseq data."""
        _check_text(text, "text")
        # add_special_tokens=False: a tokenizer.json may carry its own post-processor; BOS is added here.
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else ids

    def encode_batch(self, texts: Sequence[str], add_bos: bool = True) -> list[list[int]]:
        """`encode` of each text, tokenised in parallel by `tokenizers`."""
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a list of strings, got one string; use encode()")
        texts = list(texts)
        for i, text in enumerate(texts):
            _check_text(text, f"texts[{i}]")
        encodings = self._tok.encode_batch(texts, add_special_tokens=False)
        prefix = [self.bos_id] if add_bos else []
        return [prefix + e.ids for e in encodings]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`. Skipping drops ids 0..3 and any other special token; bytes that are not valid
        UTF-8 (a sequence cut mid-character) become U+FFFD, as in Hugging Face."""
        return self._tok.decode(
            self._check_ids(ids, skip_special_tokens), skip_special_tokens=skip_special_tokens
        )

    def decode_batch(self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        checked = [self._check_ids(ids, skip_special_tokens) for ids in batch]
        return self._tok.decode_batch(checked, skip_special_tokens=skip_special_tokens)

    def _check_ids(self, ids: Sequence[int], skip_special_tokens: bool) -> list[int]:
        # `tokenizers` silently drops unknown ids; an id past the vocabulary (e.g. one of the 7 padding
        # rows of OPT's 50272-row embedding) means the caller sampled a non-token, so say so.
        out = []
        for token_id in (int(i) for i in ids):  # int(): numpy / jax scalars are welcome
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(
                    f"token id {token_id} is outside the tokenizer's vocabulary "
                    f"[0, {self.vocab_size}) ({self._source})"
                )
            if not (skip_special_tokens and token_id in self._skip_ids):
                out.append(token_id)
        return out

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Writes vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json, laid out as
        the facebook/opt-* hub repos, so this class and `transformers.AutoTokenizer` both load it.

        Each file is written under a temporary name and renamed, so a reader never sees a half-written
        file (the set of four is not replaced as one unit).
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        vocab, merges = _vocab_and_merges(self._tok)
        special_map = {role: _hub_token_dict(v) for role, v in self._special_map.items() if v is not None}
        config = {
            "tokenizer_class": "GPT2Tokenizer",  # what the OPT hub repos name; transformers 5 maps it to its
            "add_bos_token": True,  # tokenizers-backed GPT2Tokenizer, prepending bos_token
            "add_prefix_space": False,
            "errors": "replace",
            **{role: dict(v, __type="AddedToken") for role, v in special_map.items()},
        }
        # Every string matched in text, with its id and flags (transformers >= 4.34 reads this), so
        # extra added tokens survive the round trip without a tokenizer.json.
        config["added_tokens_decoder"] = {
            str(i): {
                "content": t.content,
                "lstrip": t.lstrip,
                "normalized": t.normalized,
                "rstrip": t.rstrip,
                "single_word": t.single_word,
                "special": t.special,
            }
            for i, t in sorted(self._tok.get_added_tokens_decoder().items())
        }
        merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
        write_text_atomic(directory / VOCAB_FILE, json.dumps(vocab, ensure_ascii=False))
        write_text_atomic(directory / MERGES_FILE, merges_text)
        write_text_atomic(directory / CONFIG_FILE, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        write_text_atomic(
            directory / SPECIAL_MAP_FILE, json.dumps(special_map, indent=2, ensure_ascii=False) + "\n"
        )
        return directory

    def __repr__(self) -> str:
        return f"OPTTokenizer(vocab_size={self.vocab_size}, source={self._source!r})"


# ---------------------------------------------------------------------- training
def train_byte_level_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> OPTTokenizer:
    """Trains a GPT-2-style byte-level BPE whose ids 0..3 are OPT's `<s>`, `<pad>`, `</s>`, `<unk>`.

    It stands in for the 50k GPT-2 vocabulary in tests and demos. All 256 byte symbols are in the
    vocabulary, so any text encodes, and the result can hold fewer merges than `vocab_size` asks for
    when the corpus runs out of pairs seen `min_frequency` times.
    """
    floor = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < floor:
        raise ValueError(
            f"vocab_size must be an integer >= {floor} (4 special tokens + 256 byte symbols), "
            f"got {vocab_size!r}"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),  # given first, in this order, they get ids 0..3
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    # The trainer makes all four specials match inside text; the OPT hub tokenizer matches only `</s>`
    # and `<pad>`. Rebuilding from vocab + merges gives the trained tokenizer the hub's behaviour.
    vocab, merges = _vocab_and_merges(tokenizer)
    return OPTTokenizer(_byte_level_bpe(vocab, merges), source="train_byte_level_bpe")


# ---------------------------------------------------------------------- helpers
def _byte_level_bpe(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    # Exactly what transformers 5's GPT2Tokenizer builds from vocab.json + merges.txt.
    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _vocab_and_merges(tokenizer: Tokenizer) -> tuple[dict[str, int], list[tuple[str, str]]]:
    model = json.loads(tokenizer.to_str())["model"]
    # tokenizers >= 0.20 stores merges as [a, b] pairs, older versions as "a b" strings.
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    vocab = dict(sorted(model["vocab"].items(), key=lambda kv: kv[1]))
    return vocab, merges


def _read_vocab(path: Path) -> dict[str, int]:
    vocab = _read_json(path)
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise ValueError(f"{path}: expected a JSON object mapping token -> integer id")
    return vocab


def _read_merges(path: Path) -> list[tuple[str, str]]:
    merges = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        # "#version: 0.2" header; blank trailing line. Byte-level symbols never contain a space.
        if not line or (lineno == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{path}:{lineno}: expected two symbols separated by one space, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from e


def _read_special_tokens(directory: Path) -> tuple[Optional[dict], list]:
    """Special-token roles and extra special tokens as transformers would see them, or (None, [])."""
    merged: dict[str, Any] = {}
    found = False
    # special_tokens_map.json overrides tokenizer_config.json, as in transformers.
    for name in (CONFIG_FILE, SPECIAL_MAP_FILE):
        path = directory / name
        if not path.is_file():
            continue
        found = True
        data = _read_json(path)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object")
        for key in (
            "bos_token",
            "eos_token",
            "unk_token",
            "pad_token",
            "additional_special_tokens",
            "extra_special_tokens",
        ):
            if data.get(key) is not None:
                merged[key] = data[key]
        for key, required in _REQUIRED_ROLE_TOKENS.items():  # checked here to name the file at fault
            if data.get(key) is not None and _content(data[key]) != required:
                raise ValueError(
                    f"{path}: {key} is {_content(data[key])!r}, but OPT models need {required!r} "
                    f"(id {_EXPECTED_IDS[required]})"
                )
        # transformers 5 also registers every entry of added_tokens_decoder (it writes one on save).
        for token in (data.get("added_tokens_decoder") or {}).values():
            if isinstance(token, dict) and "content" in token:
                merged.setdefault("_added", []).append(token)
    if not found:
        return None, []
    roles = {k: merged.get(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    extra = []
    for key in ("additional_special_tokens", "extra_special_tokens", "_added"):
        value = merged.get(key) or []
        extra.extend(value.values() if isinstance(value, dict) else value)
    return roles, extra


def _content(token: Any) -> str:
    return token["content"] if isinstance(token, dict) else str(token)


def _added_token(token: Any) -> AddedToken:
    if isinstance(token, dict):
        flags = {k: token[k] for k in ("single_word", "lstrip", "rstrip", "normalized") if k in token}
        return AddedToken(token["content"], special=token.get("special", True), **flags)
    return AddedToken(str(token), special=True)


def _hub_token_dict(token: Any) -> dict:
    # The field set facebook/opt-* ship for each special token.
    base = {
        "content": _content(token),
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": True,
    }
    if isinstance(token, dict):
        base.update({k: token[k] for k in ("single_word", "lstrip", "rstrip", "normalized") if k in token})
    return base


def _check_text(text: Any, what: str) -> None:
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, got {type(text).__name__}")


def _download_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo_id, allow_patterns=list(TOKENIZER_FILES))
    except Exception as e:  # offline, not cached, no such repo, no network: all mean the same to the caller
        raise OSError(
            f"{repo_id!r} is not a local directory, and fetching it as a Hugging Face hub id failed "
            f"({type(e).__name__}: {e}). Without hub access, pass a local directory holding "
            f"{VOCAB_FILE} + {MERGES_FILE} or {TOKENIZER_FILE} instead."
        ) from e
    return Path(local)
