"""`import optiml_jax.lm_eval` registers the lm-evaluation-harness model class `optiml_jax`
(optiml_jax/eval/harness.py); `python -m optiml_jax.lm_eval ARGS` is lm_eval's command line with it
(optiml_jax/cli/lm_eval.py). Both need the `eval` extra."""

import sys

from optiml_jax.cli.lm_eval import main  # noqa: F401  (the command, for `python -m`)
from optiml_jax.eval.harness import MODEL_NAME, OptimlJaxLM  # noqa: F401  (the names callers import from here)

if __name__ == "__main__":
    sys.exit(main())
