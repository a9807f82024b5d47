"""Several data-loading processes in one test: threads with a real rendezvous allgather."""

import threading

import numpy as np
from fake_tokenizer import ByteTokenizer

from optiml_jax.data import DataConfig, build_loaders


def as_processes(n, work):
    """Runs work(process_index, allgather) for n simulated processes, one thread each, with a real
    rendezvous allgather (every process must call it, in the same order); returns their results."""
    barrier, slots, results, errors = threading.Barrier(n, timeout=300), [None] * n, [None] * n, []

    def run(p):
        def allgather(x):
            slots[p] = np.asarray(x)
            barrier.wait()
            out = np.stack(slots)
            barrier.wait()  # nobody overwrites its slot before everyone has read
            return out

        try:
            results[p] = work(p, allgather)
        except BaseException as e:  # noqa: BLE001 - re-raised below, in the test's thread
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(p,)) for p in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def process_loaders(data: dict, p, n, allgather, reads=None, **settings):
    """build_loaders' (train, eval) of simulated process `p` of `n`: DataConfig(**data), the byte
    tokenizer, 6 rows; `settings` are build_loaders' others (seed and seq_len at least). `reads`, when
    given, learns that this thread is process `p` (its `register`), to attribute the reads it counts."""
    if reads is not None:
        reads.register(p)
    return build_loaders(
        DataConfig(**data),
        ByteTokenizer(),
        batch_size=6,
        process_index=p,
        process_count=n,
        allgather=allgather,
        **settings,
    )
