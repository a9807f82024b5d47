"""Packing: the exact OPT-IML token layout of one example, greedy rows, truncation. Hand-checkable:
the fake tokenizer maps every UTF-8 byte b to id b + 4 (so " " = 36, "a" = 101), eos = bos = 2, pad = 1."""

import numpy as np
import pytest
from fake_tokenizer import ByteTokenizer

from optiml_jax.data.packing import (
    Packer,
    PackStats,
    TokenizedExample,
    fit_to_length,
    row_arrays,
    tokenize_examples,
)
from optiml_jax.data.sources import Example

A, B, C, D, E, F, SP, EOS = 101, 102, 103, 104, 105, 106, 36, 2


def tok(src, tgt):
    return tokenize_examples([Example("t", src, tgt, "x:1")], ByteTokenizer())[0]


def test_one_example_exact_layout():
    # src trailing spaces are stripped, then ONE space joins; tgt trailing whitespace stripped; no BOS; eos.
    ex = tok("ab  ", "c\n")
    assert ex.tokens == (A, B, SP, C, EOS)
    assert ex.num_source == 2  # the joining space belongs to the target side
    row = row_arrays([ex], seq_len=6)
    np.testing.assert_array_equal(row["input_ids"], [A, B, SP, C, 1, 1])
    np.testing.assert_array_equal(row["targets"], [B, SP, C, EOS, 1, 1])
    np.testing.assert_array_equal(row["loss_mask"], [0, 1, 1, 1, 0, 0])  # targets " ", "c", </s>
    np.testing.assert_array_equal(row["segment_ids"], [1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(row["positions"], [0, 1, 2, 3, 0, 0])
    assert row["input_ids"].dtype == np.int32 and row["loss_mask"].dtype == np.float32


def test_source_and_target_are_encoded_separately():
    calls = []

    class Recording(ByteTokenizer):
        def encode_batch(self, texts, add_bos=True):
            calls.append((list(texts), add_bos))
            return super().encode_batch(texts, add_bos)

    tokenize_examples([Example("t", "Q: x ", " y ", "f:1")], Recording())
    assert calls == [(["Q: x"], False), (["  y"], False)]


def three_examples():
    return [
        tok("a", "b"),  # a ␣ b </s>      -> 3 slots
        tok("cd", "e"),  # c d ␣ e </s>    -> 4 slots
        tok("", "f"),
    ]  # ␣ f </s>        -> 2 slots (empty source: every predicted token is target)


def test_greedy_packing_of_three_examples_into_one_row():
    packer = Packer(seq_len=10)
    assert [packer.add(e) for e in three_examples()] == [[], [], []]
    row = row_arrays(packer.flush(), seq_len=10)
    np.testing.assert_array_equal(row["input_ids"], [A, SP, B, C, D, SP, E, SP, F, 1])
    np.testing.assert_array_equal(row["targets"], [SP, B, EOS, D, SP, E, EOS, F, EOS, 1])
    np.testing.assert_array_equal(row["loss_mask"], [1, 1, 1, 0, 1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(row["segment_ids"], [1, 1, 1, 2, 2, 2, 2, 3, 3, 0])
    np.testing.assert_array_equal(row["positions"], [0, 1, 2, 0, 1, 2, 3, 0, 1, 0])
    # No target crosses an example: each example's last target is its own </s>.
    for seg in (1, 2, 3):
        assert row["targets"][row["segment_ids"] == seg][-1] == EOS
    assert packer.stats["examples"] == 3 and packer.stats["rows"] == 1 and packer.stats["pad_tokens"] == 1
    assert packer.stats["loss_tokens"] == int(row["loss_mask"].sum()) == 8


def test_row_closes_when_exactly_full_and_when_next_does_not_fit():
    ex1, ex2, ex3 = three_examples()
    packer = Packer(seq_len=7)  # 3 + 4 slots fill it exactly: closed at once, ex3 starts the next row
    assert packer.add(ex1) == []
    assert packer.add(ex2) == [[ex1, ex2]]
    assert packer.add(ex3) == []
    assert packer.flush() == [ex3] and packer.flush() is None

    packer = Packer(seq_len=6)  # ex2 does not fit after ex1: ex1's row is closed and padded
    assert packer.add(ex1) == []
    assert packer.add(ex2) == [[ex1]]
    assert packer.add(ex3) == [[ex2, ex3]]  # 4 + 2 slots: full again, closed at once
    assert not packer.pending
    row = row_arrays([ex1], seq_len=6)
    np.testing.assert_array_equal(row["segment_ids"], [1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(row["input_ids"][3:], [1, 1, 1])


def test_left_truncation_of_source_keeps_whole_target():
    stats = PackStats()
    ex = tok("abcdefgh", "xy")  # 8 source + ␣ x y </s> = 12 tokens
    out = fit_to_length(ex, seq_len=6, overlong="truncate", stats=stats)  # at most 7 tokens
    assert out.tokens == tuple(b + 4 for b in b"fgh xy") + (EOS,)
    assert out.num_source == 3
    assert stats == {"source_truncated": 1}
    row = row_arrays([out], seq_len=6)
    np.testing.assert_array_equal(row["loss_mask"], [0, 0, 1, 1, 1, 1])
    # Through the packer, the same truncation is counted and fills the row exactly.
    packer = Packer(seq_len=6)
    assert packer.add(ex) == [[out]] and packer.stats["source_truncated"] == 1


def test_overlong_target_drop_or_truncate():
    ex = tok("ab", "wxyz")  # a b ␣ w x y z </s>: the target side (6 tokens) needs 6 slots + 1 source
    stats = PackStats()
    assert fit_to_length(ex, seq_len=5, overlong="drop", stats=stats) is None
    assert stats == {"overlong_dropped": 1}
    out = fit_to_length(ex, seq_len=5, overlong="truncate", stats=stats)
    assert out.tokens == (B, SP, 123, 124, 125, 126) and out.num_source == 1  # b ␣ w x y z, no </s>
    assert stats["target_truncated"] == 1
    # Exactly fitting target (seq_len 6 = 1 source token + 6 target tokens - 1): only the source is cut.
    out = fit_to_length(ex, seq_len=6, overlong="drop", stats=stats)
    assert out.tokens == (B, SP, 123, 124, 125, 126, EOS) and stats["source_truncated"] == 1
    packer = Packer(seq_len=5, overlong="drop")
    assert packer.add(ex) == [] and not packer.pending and packer.stats["overlong_dropped"] == 1


def test_empty_example_is_dropped_and_bad_overlong_rejected():
    packer = Packer(seq_len=4)
    assert packer.add(TokenizedExample(tokens=(EOS,), num_source=0)) == []
    assert packer.stats["empty_dropped"] == 1
    with pytest.raises(ValueError, match="overlong"):
        Packer(seq_len=4, overlong="cut")
