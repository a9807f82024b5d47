"""Data formats, one module each, registered by name (see base.py): SNI task files, JSONL, Parquet, the
hub form `hf:NAME[:SPLIT]` and plain text (`.txt`, data.mixture's whole-sequence slices). Importing this
package registers them; a new format is one more module imported here."""

# isort: off
# Registered in this order: the order of the format choices and of detection messages.
from optiml_jax.data.formats import sni  # noqa: F401 (registers the format)
from optiml_jax.data.formats import jsonl  # noqa: F401
from optiml_jax.data.formats import parquet  # noqa: F401
from optiml_jax.data.formats import hub  # noqa: F401
from optiml_jax.data.formats import text  # noqa: F401

# isort: on
from optiml_jax.data.formats.base import (
    AUTO,
    EvalInstance,
    EvalTask,
    Format,
    Source,
    detect_format,
    format_choices,
    get_format,
    register,
    resolve_format,
    unregister,
)

__all__ = [
    "AUTO",
    "EvalInstance",
    "EvalTask",
    "Format",
    "Source",
    "detect_format",
    "format_choices",
    "get_format",
    "register",
    "resolve_format",
    "unregister",
]
