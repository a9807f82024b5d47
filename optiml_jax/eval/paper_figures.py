"""The figures OPT-IML's paper reports (arXiv 2212.12017 v1, §5, Tables 9-14; 0-shot / k-shot, percent),
and the Open LLM Leaderboard's for the 1.3B models, for report.md to print beside ours when the
evaluated model has a released size.

Keys are the suite files' `benchmark` names (configs/eval/); a figure is {shots: value}, with the
shot count as a string, or "reported" for a suite the paper gives one number for.
"""

from __future__ import annotations

from typing import Optional

# (hidden_size, num_hidden_layers, num_attention_heads) of the released OPT / OPT-IML sizes
RELEASED_SIZES = {
    (768, 12, 12): "125m",
    (1024, 24, 16): "350m",
    (2048, 24, 32): "1.3b",
    (2560, 32, 32): "2.7b",
    (4096, 32, 32): "6.7b",
    (5120, 40, 40): "13b",
    (7168, 48, 56): "30b",
    (9216, 64, 72): "66b",
    (12288, 96, 96): "175b",
}

# benchmark -> model -> {shots: figure}; MMLU, BBH and RAFT are the OPT-IML-Max rows
PAPER_FIGURES = {
    "30b": {
        "opt14": {"OPT-30B": {"0": 59.2, "32": 60.5}, "OPT-IML-30B": {"0": 66.3, "32": 64.4}},
        "promptsource": {"OPT-30B": {"0": 39.8, "5": 37.9}, "OPT-IML-30B": {"0": 48.3, "5": 50.1}},
        "flan": {"OPT-30B": {"0": 39.1, "5": 42.9}, "OPT-IML-30B": {"0": 60.9, "5": 58.3}},
        "sni": {
            "OPT-30B": {"0": 33.7, "2": 3.5, "5": 42.2},
            "OPT-IML-30B": {"0": 47.9, "2": 47.1, "5": 46.9},
        },
        "mmlu": {"OPT-30B": {"0": 23.5, "5": 25.9}, "OPT-IML-Max-30B": {"0": 46.3, "5": 43.2}},
        "bbh": {"OPT-30B": {"reported": 28.0}, "OPT-IML-Max-30B": {"reported": 30.9}},
        "raft": {"OPT-30B": {"reported": 49.1}, "OPT-IML-Max-30B": {"reported": 69.3}},
    },
    "175b": {
        # Table 12: SNI's 44 held-out tasks (textual entailment, coreference, dialogue act recognition)
        "sni": {
            "OPT-175B": {"0": 33.3, "2": 7.7, "5": 45.2},
            "OPT-IML-175B": {"0": 51.5, "2": 53.6, "5": 53.0},
        },
    },
    "1.3b": {
        # Open LLM Leaderboard v1 (lm-evaluation-harness), by task: the paper has no 1.3B rows
        "arc_challenge": {"OPT-1.3B": {"25": 29.52}, "OPT-IML-Max-1.3B": {"25": 30.72}},
        "hellaswag": {"OPT-1.3B": {"10": 54.53}, "OPT-IML-Max-1.3B": {"10": 53.81}},
        "mmlu": {"OPT-1.3B": {"5": 24.96}, "OPT-IML-Max-1.3B": {"5": 27.61}},
        "truthfulqa_mc2": {"OPT-1.3B": {"0": 38.71}, "OPT-IML-Max-1.3B": {"0": 38.34}},
        "winogrande": {"OPT-1.3B": {"5": 59.75}, "OPT-IML-Max-1.3B": {"5": 60.22}},
    },
}


def released_size(config) -> Optional[str]:
    """ "30b" etc. when an OPTConfig has the shape of a released OPT / OPT-IML model, else None."""
    shape = (config.hidden_size, config.num_hidden_layers, config.num_attention_heads)
    return RELEASED_SIZES.get(shape)


def paper_figures(config) -> dict:
    """The reported figures for a model of this config's size (empty for other sizes)."""
    size = released_size(config) if config is not None else None
    return PAPER_FIGURES.get(size, {})
