"""`python -m optiml_jax.bench` = `optiml-bench`: the command lives in optiml_jax/cli/bench.py."""

import sys

if __name__ == "__main__":
    from optiml_jax.cli.bench import main  # the command floor sits above the bench package

    sys.exit(main())
