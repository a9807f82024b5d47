"""A non-editable install: the wheel built from this checkout, installed into a fresh virtual environment,
runs the shipped demo through its console script from a directory outside the repository.

Offline and fast: the environment sees the running interpreter's site-packages (the dependencies are
there, whether the tests run from a virtualenv, a conda-like prefix or a system interpreter) and the
wheel goes in with --no-deps. Those site-packages also hold the editable install of the checkout
(CI runs `pip install -e`), whose import hook could serve `optiml_jax` from the checkout instead: the
test checks that the environment imports the installed copy before it runs anything.
"""

import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("optiml-finetune", "optiml-generate", "optiml-evaluate", "optiml-convert", "optiml-bench")
SHIPPED = (
    "optiml_jax/assets/configs/demo.yaml",
    "optiml_jax/assets/configs/optiml-30b.yaml",
    "optiml_jax/assets/configs/eval/optiml_test.yaml",
    "optiml_jax/assets/configs/bench/registry.yaml",
    "optiml_jax/assets/configs/models/opt-tiny.yaml",
    "optiml_jax/assets/demo_tokenizer/vocab.json",
    "optiml_jax/assets/data/sni/task1146_country_capital.json",
    "optiml_jax/assets/data/sni/splits/default/test_tasks.txt",
)
# The demo, cut to two cheap steps: no held-out task evaluation, one eval-loss batch, no peak-FLOP/s probe.
DEMO_OVERRIDES = (
    "train.max_steps=2",
    "train.batch_size=2",
    "train.seq_len=128",
    "train.log_every_steps=1",
    "train.peak_flops_per_device=1e9",
    "eval.every_steps=0",
    "eval.max_batches=1",
    "eval.tasks=null",
    "eval.num_samples=0",
    "checkpoint.every_steps=0",
    "checkpoint.async_save=false",
)


def _run(args, cwd, env, timeout=900):
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{' '.join(map(str, args))}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _see_running_site_packages(venv_python: Path) -> None:
    """Let the new environment import what the running interpreter can (jax, pip...), after its own
    site-packages. `--system-site-packages` would not do: from inside a virtualenv or a conda-like prefix
    it exposes the *base* interpreter's packages, not the ones this test runs with. addsitedir also
    reads those directories' .pth files, as --system-site-packages does."""
    own = subprocess.run(
        [str(venv_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    running = [p for p in site.getsitepackages() + [site.getusersitepackages()] if Path(p).is_dir()]
    lines = [f"import site; site.addsitedir({p!r})" for p in running]
    (Path(own) / "_running_interpreter_site.pth").write_text("\n".join(lines) + "\n")


def _copy_source(target: Path) -> None:
    """What the build reads (git's tracked and new files of the package, setup.cfg...), without caches: an
    in-tree build would write build/ and *.egg-info into a checkout other processes use."""
    import shutil

    shutil.copytree(
        REPO / "optiml_jax", target / "optiml_jax", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, target / name)


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_runs_the_demo_from_outside_the_checkout(tmp_path):
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTHONPATH", "XLA_FLAGS", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSAFEPATH")
    }
    env.update(
        JAX_PLATFORMS="cpu",
        HF_HUB_OFFLINE="1",
        PIP_NO_INDEX="1",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        TOKENIZERS_PARALLELISM="false",
    )
    _copy_source(tmp_path / "src")
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            tmp_path / "dist",
            tmp_path / "src",
        ],
        cwd=tmp_path,
        env=env,
    )
    (wheel,) = (tmp_path / "dist").glob("optiml_jax-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(
            archive.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt")
        )
    assert set(SHIPPED) <= names, sorted(set(SHIPPED) - names)
    assert all(f"{script} = " in entry_points for script in SCRIPTS), entry_points

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path, env=env)
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    _see_running_site_packages(python)
    # the system's pip, run by the venv's interpreter, installs into the venv; --ignore-installed: the
    # editable install outside it stays as it is
    _run(
        [python, "-m", "pip", "install", "--no-deps", "--ignore-installed", "-q", wheel],
        cwd=tmp_path,
        env=env,
    )
    work = tmp_path / "work"  # outside the repository: nothing resolves against the checkout from here
    work.mkdir()
    where = _run(
        [python, "-c", "import optiml_jax; print(optiml_jax.__file__)"], cwd=work, env=env
    ).stdout.strip()
    assert Path(where).resolve().is_relative_to(venv.resolve()), (
        f"the venv imports optiml_jax from {where}, not from the installed wheel: something on its path "
        "(PYTHONPATH, "
        "a .pth file, an editable install's import hook) puts the checkout first, so this test would "
        "test the checkout"
    )

    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    done = _run(["optiml-finetune", "--config", "demo", *DEMO_OVERRIDES, "--no-progress"], cwd=work, env=env)
    assert "done: step 2, workdir runs/demo" in done.stdout, done.stdout
    final = work / "runs" / "demo" / "final"  # the workdir default stays relative to the working directory
    assert (final / "config.json").is_file() and (final / "vocab.json").is_file()
    assert sorted(p.name for p in work.iterdir()) == ["runs"]
    help_text = _run(["optiml-convert", "--help"], cwd=work, env=env).stdout
    assert help_text.startswith("usage: optiml-convert") and "--to-hf" in help_text


def test_shipped_configs_resolve_from_any_directory_and_the_working_directory_wins(tmp_path, monkeypatch):
    from optiml_jax.config import ConfigError, OPTConfig, presets_dir
    from optiml_jax.run_config import DEMO_CONFIG, load_run_config, resolve_path

    monkeypatch.chdir(tmp_path)
    demo = load_run_config("demo")
    assert demo == load_run_config("configs/demo.yaml") == load_run_config(None)
    assets = DEMO_CONFIG.parents[1]
    assert Path(resolve_path(demo.data.train)) == assets / "data" / "sni"
    assert (Path(resolve_path(demo.tokenizer)) / "vocab.json").is_file()
    assert OPTConfig.from_preset(demo.model[len("preset:") :]) == OPTConfig.from_file(
        presets_dir() / "opt-tiny.yaml"
    )
    assert load_run_config("optiml-1.3b").model == "facebook/opt-1.3b"
    # what the working directory has comes first
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "demo.yaml").write_text(
        DEMO_CONFIG.read_text().replace("workdir: runs/demo", "workdir: mine")
    )
    assert (
        load_run_config("configs/demo.yaml").workdir == "mine"
        and load_run_config("demo").workdir == "runs/demo"
    )
    (tmp_path / "data" / "sni").mkdir(parents=True)
    assert resolve_path("data/sni") == "data/sni"
    with pytest.raises(
        ConfigError, match=r"config file nope not found \(the shipped configs, by name: demo, optiml-1.3b"
    ):
        load_run_config("nope")
