"""Instance-level hold-out: OPT-IML's "fully supervised" evaluation (held-out instances of seen tasks).

`data.eval_holdout` withholds the LAST examples of every training task, in read order (SNI: file order
of the usable instances; JSONL: line order, shards in path order), from training; they form the eval
set. The value is either

  * an int N >= 1: the last N examples of every task. A task with N or fewer usable examples is an
    error (it would have nothing left to train on), or
  * a float in (0, 1): the last floor(fraction * n) examples of a task of n examples (a task smaller
    than 1 / fraction contributes none).

Which instances are held out depends only on the data read and this value (not on the seed, EPS or the
batch layout), so the eval set stays fixed across runs, and the two parts are disjoint by construction.
Examples keep their formatting (an SNI instance gets the same prompt delimiter whichever side it lands
on). Duplicate instances inside a task are not looked for: the SNI sample in data/sni has none.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence, TypeVar, Union

from optiml_jax.data.sources import DataError

T = TypeVar("T")
Holdout = Union[int, float, None]


def holdout_problem(value) -> Optional[str]:
    """Why `value` is not a valid data.eval_holdout (None when it is; None itself means "off")."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"must be an integer (instances per task) or a fraction in (0, 1), got {value!r}"
    if isinstance(value, int) and value < 1:
        return f"must be >= 1 instances per task (leave it out for no hold-out), got {value!r}"
    if isinstance(value, float) and not 0.0 < value < 1.0:
        return (
            f"as a fraction must be in (0, 1), got {value!r} (write an integer without a decimal point "
            f"for a number of instances per task)"
        )
    return None


def holdout_size(num_examples: int, holdout: Holdout) -> int:
    """How many of a task's `num_examples` are held out."""
    if holdout is None:
        return 0
    if isinstance(holdout, float):
        return math.floor(holdout * num_examples)
    return holdout


def split_holdout(
    tasks: Mapping[str, Sequence[T]], holdout: Holdout
) -> tuple[dict[str, Sequence[T]], dict[str, Sequence[T]]]:
    """(train, held_out), both task name -> examples in the original order. Held-out tasks with no
    example (a fraction of a small task) are left out of `held_out`."""
    problem = holdout_problem(holdout)
    if problem:
        raise ValueError(f"data.eval_holdout {problem}")
    train, held_out = {}, {}
    for name, examples in tasks.items():  # slices: lazily read tasks (records.py) stay unread
        k = holdout_size(len(examples), holdout)
        if k >= len(examples):
            raise DataError(
                f"data.eval_holdout={holdout!r} would withhold all {len(examples)} usable examples "
                f"of task {name}, leaving it nothing to train on; lower it, or give a fraction "
                f"(e.g. 0.1) to hold out a share of every task"
            )
        train[name] = examples[: len(examples) - k]
        if k:
            held_out[name] = examples[len(examples) - k :]
    if holdout is not None and not held_out:
        raise DataError(
            f"data.eval_holdout={holdout!r} holds out no example of any of the {len(tasks)} "
            f"task(s) (largest: {max((len(v) for v in tasks.values()), default=0)} examples); "
            f"raise it"
        )
    return train, held_out


def holdout_tag(holdout: Holdout) -> str:
    """Folded into the train loader's state fingerprint, so a run never resumes under another split."""
    return f"eval_holdout={holdout!r}"
