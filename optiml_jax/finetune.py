"""`python -m optiml_jax.finetune` = `optiml-finetune`: the command lives in optiml_jax/cli/finetune.py."""

import sys

from optiml_jax.cli.common import init_distributed  # noqa: F401  (the names callers import from here)
from optiml_jax.cli.finetune import main, parse_args  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
