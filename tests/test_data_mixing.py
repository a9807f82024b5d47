"""EPS mixing: p(task) ∝ min(n_task, eps); deterministic, seekable, epoch-cycling per task."""

import itertools

import numpy as np

from optiml_jax.data.mixing import MixtureStream, mixing_weights

TASKS = {
    "small": [("small", i) for i in range(10)],
    "big": [("big", i) for i in range(1000)],
    "mid": [("mid", i) for i in range(50)],
}


def test_weights_are_capped_example_proportional():
    np.testing.assert_allclose(mixing_weights([10, 1000, 50], eps=100), [10 / 160, 100 / 160, 50 / 160])
    np.testing.assert_allclose(mixing_weights([10, 1000, 50], eps=10**6), [10 / 1060, 1000 / 1060, 50 / 1060])


def test_empirical_frequencies_match_capped_proportions():
    stream = MixtureStream(TASKS, eps=100, seed=3)
    n = 40000
    counts = {name: 0 for name in TASKS}
    for _, (name, _) in itertools.islice(stream, n):
        counts[name] += 1
    expected = {"small": 10 / 160, "big": 100 / 160, "mid": 50 / 160}
    for name in TASKS:
        assert abs(counts[name] / n - expected[name]) < 0.01, (counts, expected)
    assert stream.task_counts() == counts


def test_each_task_cycles_through_all_examples_every_epoch():
    stream = MixtureStream(TASKS, eps=100, seed=0)
    small = [i for _, (name, i) in itertools.islice(stream, 2000) if name == "small"]
    assert len(small) >= 30
    epochs = [small[k : k + 10] for k in range(0, 30, 10)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(10))
    assert epochs[0] != epochs[1]  # reshuffled per epoch


def test_deterministic_and_seekable():
    first = list(itertools.islice(MixtureStream(TASKS, eps=100, seed=5), 9000))
    assert first == list(itertools.islice(MixtureStream(TASKS, eps=100, seed=5), 9000))
    assert first != list(itertools.islice(MixtureStream(TASKS, eps=100, seed=6), 9000))
    # Read order of the tasks does not matter, and seeking (across a chunk boundary) equals continuing.
    reordered = dict(reversed(list(TASKS.items())))
    for start in (0, 1, 4095, 4096, 5000):
        resumed = MixtureStream(reordered, eps=100, seed=5, start=start)
        assert list(itertools.islice(resumed, 9000 - start)) == first[start:]
