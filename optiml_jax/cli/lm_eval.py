"""`python -m optiml_jax.lm_eval ARGS`: lm-evaluation-harness's own command line with our model class
`optiml_jax` registered (optiml_jax/eval/harness.py; needs the `eval` extra)."""

from __future__ import annotations

import sys

from lm_eval.__main__ import cli_evaluate

from optiml_jax.cli.common import EXIT_BAD_INPUT, EXIT_OK, report
from optiml_jax.config import ConfigError
from optiml_jax.eval import harness  # noqa: F401  (registers the model class "optiml_jax")


def main(argv=None) -> int:
    """lm_eval's CLI, with this package's model registered."""
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        cli_evaluate()
    except ConfigError as e:  # ours; lm_eval's own bad arguments exit 2 from argparse
        return report(e, EXIT_BAD_INPUT)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
