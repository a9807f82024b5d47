"""Several data-loading processes in one test: threads with a real rendezvous allgather."""

import threading

import numpy as np


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
