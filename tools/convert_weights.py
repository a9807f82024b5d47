"""`python tools/convert_weights.py ...` = `optiml-convert ...` (optiml_jax/cli/convert.py), for a
checkout that is not installed: see that module for the flags."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from optiml_jax.cli.convert import build_parser, main  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
