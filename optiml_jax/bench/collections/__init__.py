"""One reader per collection layout (spec §2): `READERS[name](path, columns, known)` -> the collection's
tasks, read lazily (tasks.Task.load). `columns` is the registry's column mapping for the collection
(collections.NAME.columns), `known` the registry's task names (P3 subsets are matched to them)."""

from optiml_jax.bench.collections import crossfit, exmix, flan, promptsource, reasoning, sni, t5, unifiedskg

READERS = {
    "sni": sni.read,
    "promptsource": promptsource.read,
    "flan": flan.read,
    "crossfit": crossfit.read,
    "exmix": exmix.read,
    "t5": t5.read,
    "unifiedskg": unifiedskg.read,
    "reasoning": reasoning.read,
}
