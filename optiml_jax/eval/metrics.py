"""Super-NaturalInstructions metrics, as the official evaluation computes them.

The official scorer (allenai/natural-instructions `eval/automatic/evaluation.py`, and the same logic in
Tk-Instruct's `src/compute_metrics.py`) gives every instance, against each of its reference outputs:

  * exact match: 1 when the two strings are equal after `normalize_answer` (lowercase, every character
    of `string.punctuation` deleted, whitespace runs collapsed). Articles are kept, unlike SQuAD.
  * ROUGE-1 and ROUGE-L F1 from `rouge-score` with the Porter stemmer, on the raw strings: its own
    tokenizer lowercases and keeps only [a-z0-9] runs, so punctuation, case and non-ASCII letters
    never count, and an empty side scores 0.

An instance's score is the best over its references; a group's is 100 x the mean over its instances
(micro-average), rounded to 4 decimals. Groups are the whole set, each task, and each category
(`Categories[0]` of the task file, lowercased, words joined by "_"). Tk-Instruct reports exact match as
the primary metric of six classification-like categories and ROUGE-L for every other one.

Rank classification (tasks with answer options) reports `acc` (the option of highest summed
log-probability is a reference) and `acc_norm` (the same after dividing each option's log-probability
by its length in characters), lm-evaluation-harness's conventions.
"""

from __future__ import annotations

import string
from typing import Iterable, Mapping, Sequence

# Re-exported: the grouping key is defined with the evaluation data that carries it.
from optiml_jax.data.formats.base import UNCATEGORIZED, category_name  # noqa: F401

METRICS = ("exact_match", "rouge1", "rougeL")
# Tk-Instruct's categories scored by exact match (names as `category_name` writes them); ROUGE-L elsewhere.
EXACT_MATCH_CATEGORIES = frozenset(
    {
        "textual_entailment",
        "cause_effect_classification",
        "coreference_resolution",
        "dialogue_act_recognition",
        "answerability_classification",
        "word_analogy",
    }
)
DECIMALS = 4

_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    return " ".join(text.lower().translate(_PUNCTUATION).split())


def primary_metric(category: str) -> str:
    return "exact_match" if category in EXACT_MATCH_CATEGORIES else "rougeL"


class InstanceScorer:
    """Scores one prediction against its references; holds the ROUGE scorer (built once: it loads NLTK's
    Porter stemmer)."""

    def __init__(self):
        try:
            from rouge_score import rouge_scorer
        except ImportError:
            raise ImportError("ROUGE needs the rouge-score package: pip install rouge-score") from None
        self._rouge = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)

    def __call__(self, prediction: str, references: Sequence[str]) -> dict[str, float]:
        """{metric: 100 x the best value over `references`} for one instance."""
        if not references:
            raise ValueError("an instance needs at least one reference output")
        normalized = normalize_answer(prediction)
        exact = max(float(normalized == normalize_answer(reference)) for reference in references)
        rouge = [self._rouge.score(target=reference, prediction=prediction) for reference in references]
        return {
            "exact_match": 100.0 * exact,
            "rouge1": 100.0 * max(r["rouge1"].fmeasure for r in rouge),
            "rougeL": 100.0 * max(r["rougeL"].fmeasure for r in rouge),
        }


RANK_METRICS = ("acc", "acc_norm")  # rank classification (scoring.py): the likeliest option is right
ALL_METRICS = METRICS + RANK_METRICS


def mean_scores(scores: Sequence[Mapping[str, float]]) -> dict:
    """{metric: mean (rounded) over the instances that have it, "instances": n} of per-instance scores
    (in percent). A group of generated and ranked tasks has both kinds of metric."""
    out = {}
    for metric in ALL_METRICS:
        values = [s[metric] for s in scores if metric in s]
        if values:
            out[metric] = round(sum(values) / len(values), DECIMALS)
    out["instances"] = len(scores)
    return out


def aggregate(records: Iterable[Mapping]) -> dict:
    """metrics.json's "overall", "per_category" and "per_task" from scored records, each a mapping with
    "task", "category" and its metrics. Groups appear in order of first appearance. A category's primary
    metric is Tk-Instruct's for generated answers, accuracy for ranked ones."""
    records = list(records)
    by_task: dict[str, list] = {}
    by_category: dict[str, list] = {}
    for record in records:
        by_task.setdefault(record["task"], []).append(record)
        by_category.setdefault(record["category"], []).append(record)
    per_category = {}
    for name, group in by_category.items():
        ranked = all("acc" in r for r in group)
        per_category[name] = {
            **mean_scores(group),
            "primary_metric": "acc" if ranked else primary_metric(name),
        }
    return {
        "overall": mean_scores(records),
        "per_category": per_category,
        "per_task": {name: mean_scores(group) for name, group in by_task.items()},
    }
