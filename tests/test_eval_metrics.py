"""SNI metrics against the official scorer's definitions (allenai/natural-instructions
eval/automatic/evaluation.py): an oracle written here from those definitions, and hand-checked values."""

import string

import pytest

from optiml_jax.eval.metrics import InstanceScorer, aggregate, category_name, normalize_answer, primary_metric


def official_normalize(s):
    # lower, then drop every string.punctuation character, then collapse whitespace (articles stay)
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    return " ".join(s.split())


def official_instance(prediction, references):
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    em = max(float(official_normalize(prediction) == official_normalize(r)) for r in references)
    r1 = max(scorer.score(target=r, prediction=prediction)["rouge1"].fmeasure for r in references)
    rl = max(scorer.score(target=r, prediction=prediction)["rougeL"].fmeasure for r in references)
    return {"exact_match": 100 * em, "rouge1": 100 * r1, "rougeL": 100 * rl}


# (prediction, references, exact match, ROUGE-L) with the values worked out by hand
CASES = [
    ("Yes.", ["yes"], 100.0, 100.0),
    ("héllo", ["hello"], 0.0, 0.0),  # rouge-score's tokenizer keeps [a-z0-9] only: "h llo" vs "hello"
    ("Zürich", ["zurich"], 0.0, 0.0),
    ("running dogs", ["the dog runs"], 0.0, 40.0),  # stems run, dog: LCS 1 of 2 and 3 tokens
    ("the cat", ["cat"], 0.0, 100 * 2 / 3),  # articles are not removed
    ("!!!", ["?"], 100.0, 0.0),  # both normalise to "", which are equal; ROUGE of empty sides is 0
    ("", ["yes"], 0.0, 0.0),
    ("", [""], 100.0, 0.0),
    ("Paris", ["London", "paris."], 100.0, 100.0),  # best over references
    ("New   York\n", ["new york"], 100.0, 100.0),
    ("\u201cyes\u201d", ["yes"], 0.0, 100.0),  # curly quotes are not in string.punctuation
    ("positive", ["Positive", "negative"], 100.0, 100.0),
]


@pytest.fixture(scope="module")
def scorer():
    return InstanceScorer()


@pytest.mark.parametrize("prediction,references,em,rouge_l", CASES)
def test_instance_scores_match_official_definitions(scorer, prediction, references, em, rouge_l):
    got = scorer(prediction, references)
    assert got == pytest.approx(official_instance(prediction, references), abs=1e-9)
    assert got["exact_match"] == em
    assert got["rougeL"] == pytest.approx(rouge_l, abs=1e-9)


def test_rouge1_counts_unigrams_rougeL_order(scorer):
    got = scorer("running dogs", ["the dog runs"])
    assert got["rouge1"] == pytest.approx(80.0)  # both stems found: P 1, R 2/3
    assert got["rougeL"] == pytest.approx(40.0)


def test_normalize_and_names():
    assert (
        normalize_answer("  The  Cat's  hat!! ")
        == official_normalize("  The  Cat's  hat!! ")
        == "the cats hat"
    )
    assert category_name("Textual Entailment") == "textual_entailment"
    assert category_name("Question Answering (multiple choice)") == "question_answering_(multiple_choice)"
    assert primary_metric("textual_entailment") == "exact_match"
    assert primary_metric("word_analogy") == "exact_match"
    assert primary_metric("title_generation") == "rougeL"
    with pytest.raises(ValueError):
        InstanceScorer()("x", [])


def test_aggregate_is_micro_average_per_group_rounded(scorer):
    rows = [
        ("t1", "textual_entailment", "yes", ["yes"]),
        ("t1", "textual_entailment", "no", ["yes"]),
        ("t1", "textual_entailment", "no", ["yes"]),
        ("t2", "title_generation", "the dog runs", ["running dogs"]),
    ]
    records = [{"task": t, "category": c, **scorer(p, r)} for t, c, p, r in rows]
    metrics = aggregate(records)
    assert metrics["overall"] == {
        "exact_match": 25.0,
        "rouge1": round((100 + 80) / 4, 4),
        "rougeL": round((100 + 40) / 4, 4),
        "instances": 4,
    }
    assert metrics["per_task"]["t1"]["exact_match"] == round(100 / 3, 4) == 33.3333
    assert metrics["per_task"]["t2"] == {"exact_match": 0.0, "rouge1": 80.0, "rougeL": 40.0, "instances": 1}
    assert metrics["per_category"]["textual_entailment"]["primary_metric"] == "exact_match"
    assert metrics["per_category"]["title_generation"]["primary_metric"] == "rougeL"
    assert list(metrics["per_task"]) == ["t1", "t2"]
