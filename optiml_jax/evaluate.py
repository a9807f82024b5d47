"""`python -m optiml_jax.evaluate` = `optiml-evaluate`: the command lives in optiml_jax/cli/evaluate.py."""

import sys

from optiml_jax.cli.evaluate import main, parse_args  # noqa: F401  (the names callers import from here)

if __name__ == "__main__":
    sys.exit(main())
