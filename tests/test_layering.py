"""The package's layering, read from the source (ast): no module imports one above it, and a module
imports the package's own modules inside a function only with a comment saying why (an optional
dependency or start-up cost). docs/architecture.md states the same layers."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "optiml_jax"

# Bottom to top: a module may import its own floor and those below. The name is the part of the
# module's path after optiml_jax (a folder stands for everything in it).
LAYERS = (
    ("config",),
    ("paths", "fileio", "tokenizer", "sharding"),
    ("model",),
    ("checkpoints", "data"),
    ("generate",),
    ("eval", "pipelines", "notebook", "bench"),
    ("run_config",),
    ("train",),
    # compiling the train step and the decode loop for a TPU / GPU target ahead of time
    ("aot",),
    # the command-line front ends, and the old module names that forward to them
    ("cli", "finetune", "evaluate", "convert_weights", "lm_eval"),
)
FLOOR = {name: level for level, names in enumerate(LAYERS) for name in names}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _floor(module: str) -> int | None:
    """The floor of `optiml_jax.X...`; None for the package root (it imports lazily, by name)."""
    parts = module.split(".")
    return FLOOR[parts[1]] if len(parts) > 1 else None


def _is_entry_point(node: ast.AST) -> bool:
    """`if __name__ == "__main__":`: what `python -m` runs, never imported by other code."""
    test = getattr(node, "test", None)
    return (
        isinstance(node, ast.If)
        and isinstance(test, ast.Compare)
        and isinstance(test.left, ast.Name)
        and test.left.id == "__name__"
    )


def _own_imports(path: Path):
    """(line, imported module, inside a function) for every import of optiml_jax.* in `path`."""
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if _is_entry_point(child):
                continue
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                # `from optiml_jax import X` imports the submodule X when there is one
                names = (
                    [f"{child.module}.{alias.name}" for alias in child.names]
                    if child.module == "optiml_jax"
                    else [child.module]
                )
            else:
                visit(child, nested)
                continue
            for name in names:
                if name == "optiml_jax" or name.startswith("optiml_jax."):
                    found.append((child.lineno, name, in_function))

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return found


def _modules():
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_floor():
    unplaced = sorted(
        {_module_name(p).split(".")[1] for p in _modules() if "." in _module_name(p)} - set(FLOOR)
    )
    assert not unplaced, f"add these to LAYERS (and docs/architecture.md): {unplaced}"


def test_no_module_imports_one_above_it():
    upward = []
    for path in _modules():
        module = _module_name(path)
        own = _floor(module)
        for line, imported, _ in _own_imports(path):
            if imported.split(".")[1:2] and imported.split(".")[1] not in FLOOR:
                continue  # `from optiml_jax import load_pretrained`: a lazy attribute, not a module
            target = _floor(imported)
            if own is not None and target is not None and target > own:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {module} -> {imported}")
    assert not upward, "imports that run up the layers:\n" + "\n".join(upward)


def test_function_local_imports_say_why():
    silent = []
    for path in _modules():
        lines = path.read_text(encoding="utf-8").splitlines()
        for line, imported, in_function in _own_imports(path):
            if not in_function:
                continue
            here, above = lines[line - 1], lines[line - 2].strip()
            if "#" not in here and not above.startswith("#"):
                silent.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {imported}")
    assert not silent, (
        "function-local imports of the package without a comment saying why (an optional dependency "
        "or start-up cost); import at the top instead:\n" + "\n".join(silent)
    )


def test_the_layering_checks_catch_what_they_claim(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from optiml_jax.train import loop\n"
        "def f():\n"
        "    from optiml_jax.cli import common\n"
        "    # start-up cost: jax\n"
        "    import optiml_jax.sharding\n"
        'if __name__ == "__main__":\n'
        "    from optiml_jax.cli.generate import main\n"
    )
    assert _own_imports(sample) == [
        (1, "optiml_jax.train", False),
        (3, "optiml_jax.cli", True),
        (5, "optiml_jax.sharding", True),
    ]
    assert _floor("optiml_jax.cli.common") > _floor("optiml_jax.train.loop") > _floor("optiml_jax.config")
