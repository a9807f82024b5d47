"""`python -m optiml_jax.convert_weights` = `optiml-convert`: the command lives in
optiml_jax/cli/convert.py."""

import sys

from optiml_jax.cli.convert import build_parser, main  # noqa: F401  (the names callers import from here)

if __name__ == "__main__":
    sys.exit(main())
