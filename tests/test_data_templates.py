"""SNI prompt templates: exact zero-/few-shot strings and the paper's delimiter rule."""

from collections import Counter

from optiml_jax.data.templates import ANSWER_DELIMITERS, add_delimiter, format_sni, sample_delimiter


def test_delimiter_sampling_is_pinned_and_deterministic():
    # Pinned values: changing the sampling scheme would silently change the data of resumed runs.
    assert sample_delimiter(0, "t", 0) == " Output:"
    assert sample_delimiter(0, "t", 1) == "\nanswer:"
    assert sample_delimiter(0, "t", 0) == sample_delimiter(0, "t", 0)
    assert [sample_delimiter(1, "t", i) for i in range(50)] != [
        sample_delimiter(2, "t", i) for i in range(50)
    ]


def test_delimiters_are_uniform_over_the_eight():
    counts = Counter(sample_delimiter(7, "task", i) for i in range(8000))
    assert set(counts) == set(ANSWER_DELIMITERS) and len(ANSWER_DELIMITERS) == 8
    assert all(850 <= c <= 1150 for c in counts.values()), counts


def test_zero_shot_exact():
    src, tgt = format_sni("Translate the word into French. ", "dog \n", " chien\n", seed=0, task="t", index=0)
    assert src == "Instructions: Translate the word into French.\n\nInput: dog Output:"
    assert tgt == "chien"


def test_two_shot_exact():
    src, tgt = format_sni(
        "Give the capital.",
        "France",
        "Paris",
        exemplars=[("Japan ", "Tokyo"), ("Peru", " Lima ")],
        seed=0,
        task="t",
        index=1,
    )  # delimiter "\nanswer:"
    assert src == (
        "Instructions: Give the capital.\n\n"
        "Input: Japan\nanswer: Tokyo\n\n"
        "Input: Peru\nanswer: Lima\n\n"
        "Input: France\nanswer:"
    )
    assert tgt == "Paris"


def test_no_delimiter_when_prompt_ends_with_colon():
    assert (
        add_delimiter("Question: who?  Search result URL:  ", "\nA:") == "Question: who?  Search result URL:"
    )
    assert add_delimiter("Question: who?", "\nA:") == "Question: who?\nA:"
    src, _ = format_sni(
        "Answer it.", "Q: x. Search result URL:", "y", exemplars=[("Q: z?", "w")], seed=0, task="t", index=0
    )
    assert src == "Instructions: Answer it.\n\nInput: Q: z? Output: w\n\nInput: Q: x. Search result URL:"
