"""Fine-tuning: config validation, loss/accumulation/mesh invariance, exact resume, non-finite handling,
CLI."""

import json
import logging
import os
import subprocess
import sys
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from finetune_helpers import REPO, TINY_MODEL, run_config

from optiml_jax import fileio
from optiml_jax.config import ConfigError, OPTConfig
from optiml_jax.model import OPTForCausalLM
from optiml_jax.run_config import OptimSection, load_run_config
from optiml_jax.sharding import MeshConfig, init_params_sharded, make_mesh
from optiml_jax.train import (
    Hooks,
    TrainingError,
    flops_per_token,
    learning_rate_schedule,
    train_and_evaluate,
    weight_decay_mask,
)
from optiml_jax.train.context import RunResult
from optiml_jax.train.metrics_log import read_jsonl, read_tensorboard_scalars
from optiml_jax.train.run_hooks import final_model


def flat_params(state):
    return {
        jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(state.params)
    }


# ---------------------------------------------------------------------- config
def test_config_rejects_unknown_keys_and_bad_values_naming_them(tmp_path):
    cfg = load_run_config("demo", ["train.max_steps=3", "optim.lr=1e-4", "mesh.fsdp=2"])
    assert (cfg.train.max_steps, cfg.optim.lr, cfg.mesh.fsdp) == (3, 1e-4, 2)
    for override, needle in [
        ("train.max_stpes=3", "train.max_stpes"),
        ("optim.lr=fast", "optim.lr"),
        ("train.batch_size=0", "train.batch_size"),
        ("optimizer.lr=1", "optimizer"),
        ("data.trian=x", "data.trian"),
        ("train.remat_policy=some", "train.remat_policy"),
        ("train.grad_accum_steps=3", "grad_accum_steps"),
        ("mesh.data=0", "mesh.data"),
        ("data.template=nope", "data.template"),
        ("checkpoint.keep=0", "checkpoint.keep"),
        ("workdir=gs://bucket/run", "workdir"),
        ("train.head_positions=some", "train.head_positions"),
    ]:
        with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
            load_run_config("demo", [override])


def test_cli_config_error_is_one_line_and_nonzero(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "optiml_jax.finetune", "--config", "demo", "train.max_stpes=3"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.max_stpes" in lines[0] and "Traceback" not in proc.stderr


def test_shipped_recipes_load():
    for name in ("demo", "optiml-1.3b", "optiml-30b"):
        cfg = load_run_config(name)
        assert cfg.optim.b2 == 0.95 and cfg.optim.eps == 1e-8 and cfg.optim.clip_norm == 1.0
    recipe = load_run_config("optiml-30b")
    assert (recipe.optim.lr, recipe.optim.warmup_steps, recipe.train.batch_size, recipe.train.seq_len) == (
        5e-5,
        60,
        256,
        2048,
    )


# ---------------------------------------------------------------------- optimizer pieces
def test_schedule_is_warmup_then_linear_decay_to_zero():
    schedule = learning_rate_schedule(OptimSection(lr=5e-5, warmup_steps=60), max_steps=4000)
    assert float(schedule(0)) == pytest.approx(5e-5 / 60)
    assert float(schedule(59)) == pytest.approx(5e-5)
    assert float(schedule(60)) == pytest.approx(5e-5)
    assert float(schedule(2030)) == pytest.approx(2.5e-5, rel=1e-4)
    assert float(schedule(4000)) == pytest.approx(0.0, abs=1e-12)


def test_weight_decay_skips_biases_and_layer_norms():
    params = {
        "decoder": {
            "layers": {"fc1": {"kernel": 0, "bias": 0}, "final_layer_norm": {"scale": 0, "bias": 0}},
            "embed_tokens": {"embedding": 0},
        }
    }
    mask = weight_decay_mask(params)
    assert mask["decoder"]["layers"]["fc1"] == {"kernel": True, "bias": False}
    assert mask["decoder"]["layers"]["final_layer_norm"] == {"scale": False, "bias": False}
    assert mask["decoder"]["embed_tokens"]["embedding"] is True


def test_flops_per_token_formula():
    from optiml_jax.config import OPTConfig

    config = OPTConfig.from_preset("125m")
    f = flops_per_token(config, 512)
    assert f["attention"] == 12 * 12 * 512 * 768 and f["lm_head"] == 6 * 768 * 50272
    assert f["total"] == 6 * config.num_params(include_embeddings=False) + f["lm_head"] + f["attention"]


# ---------------------------------------------------------------------- invariances
@pytest.mark.slow
def test_grad_accumulation_gives_the_same_update(tiny_preset, tmp_path):
    runs = {}
    for accum in (1, 4):
        cfg = run_config(
            tiny_preset,
            tmp_path / f"accum{accum}",
            train={"max_steps": 3, "grad_accum_steps": accum, "dropout": 0.0},
            mesh={"data": 2, "fsdp": 1, "tensor": 1},
        )
        runs[accum] = train_and_evaluate(cfg, devices=jax.devices()[:2], progress=False)
    np.testing.assert_allclose(
        [runs[4].losses[s] for s in (1, 2, 3)], [runs[1].losses[s] for s in (1, 2, 3)], rtol=1e-5
    )
    big, small = flat_params(runs[1].state), flat_params(runs[4].state)
    # Adam divides by sqrt(v): a weight whose true gradient is 0 (the k_proj bias: softmax ignores it)
    # moves on float rounding alone, so the bound is 1% of one step (lr = 3e-3), not float epsilon.
    for key in big:
        np.testing.assert_allclose(small[key], big[key], atol=3e-5, err_msg=key)
    assert runs[1].losses[3] < runs[1].losses[1]


@pytest.mark.slow
def test_mesh_shape_does_not_change_the_losses(tiny_preset, tmp_path):
    """Dropout on: the masks come from fold_in(key, step), not from the device layout."""
    meshes = {
        "2x2x2": ({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()),
        "data8": ({"data": 8, "fsdp": 1, "tensor": 1}, jax.devices()),
        "single": ({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]),
    }
    losses = {}
    for name, (mesh, devices) in meshes.items():
        cfg = run_config(tiny_preset, tmp_path / name, train={"max_steps": 5}, mesh=mesh)
        result = train_and_evaluate(cfg, devices=devices, progress=False)
        losses[name] = [result.losses[s] for s in range(1, 6)]
    np.testing.assert_allclose(losses["2x2x2"], losses["single"], atol=1e-4)
    np.testing.assert_allclose(losses["data8"], losses["single"], atol=1e-4)


@pytest.mark.slow
def test_resume_continues_exactly(tiny_preset, tmp_path, monkeypatch):
    """4 steps in one go == 2 steps, SIGTERM (checkpoint saved), then a second invocation on the same
    workdir for 2 more: same loss curve, same final params (dropout on)."""
    import signal

    import optiml_jax.train.loop as train_module

    whole = train_and_evaluate(run_config(tiny_preset, tmp_path / "whole"), progress=False)
    cfg = run_config(tiny_preset, tmp_path / "split", checkpoint={"every_steps": 0})
    real_global_batch, calls = train_module.global_batch, {"n": 0}

    def sigterm_during_second_step(local, mesh, size):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_global_batch(local, mesh, size)

    monkeypatch.setattr(train_module, "global_batch", sigterm_during_second_step)
    first = train_and_evaluate(cfg, progress=False)
    monkeypatch.setattr(train_module, "global_batch", real_global_batch)
    assert first.interrupted and first.step == 2
    second = train_and_evaluate(cfg, progress=False)
    assert second.step == 4 and sorted(second.losses) == [3, 4]
    curve = {**first.losses, **second.losses}
    np.testing.assert_allclose(
        [curve[s] for s in range(1, 5)], [whole.losses[s] for s in range(1, 5)], rtol=1e-6
    )
    a, b = flat_params(whole.state), flat_params(second.state)
    for key in a:
        np.testing.assert_allclose(b[key], a[key], atol=1e-7, err_msg=key)
    # The metrics file of the split run holds the same curve (lines of both invocations).
    logged = {
        r["step"]: r["train/step_loss"]
        for r in read_jsonl(tmp_path / "split" / "metrics.jsonl")
        if "train/step_loss" in r
    }
    np.testing.assert_allclose(
        [logged[s] for s in range(1, 5)], [whole.losses[s] for s in range(1, 5)], rtol=1e-6
    )


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tiny_preset, tmp_path, monkeypatch):
    import optiml_jax.train.loop as train_module

    real_global_batch = train_module.global_batch
    calls = {"n": 0}

    def poisoned(local, mesh, size):
        calls["n"] += 1
        if calls["n"] >= 2:  # every step after the first gets a NaN in its loss
            local = dict(local, loss_mask=np.where(local["loss_mask"] > 0, np.nan, 0).astype(np.float32))
        return real_global_batch(local, mesh, size)

    monkeypatch.setattr(train_module, "global_batch", poisoned)
    cfg = run_config(tiny_preset, tmp_path / "nan", train={"max_steps": 10, "max_nonfinite_in_a_row": 3})
    with pytest.raises(TrainingError, match="3 non-finite"):
        train_and_evaluate(cfg, progress=False)
    records = [r for r in read_jsonl(tmp_path / "nan" / "metrics.jsonl") if "train/nonfinite_total" in r]
    assert records[0]["train/nonfinite_total"] == 0 and records[-1]["train/nonfinite_total"] >= 2


def test_skipped_update_leaves_params_untouched(tiny_preset, tmp_path):
    from optiml_jax.config import OPTConfig
    from optiml_jax.run_config import TrainSection
    from optiml_jax.sharding import MeshConfig, make_mesh
    from optiml_jax.train import (
        build_model,
        create_train_state,
        global_batch,
        make_optimizer,
        make_train_step,
    )

    train = TrainSection(max_steps=5, batch_size=2, seq_len=8)
    model = build_model(OPTConfig(**TINY_MODEL), train)
    tx = make_optimizer(OptimSection(), 5)
    mesh = make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    state, shardings = create_train_state(model, tx, mesh, seed=0)
    before = flat_params(state)
    step = make_train_step(model, tx, train, OptimSection(), mesh, shardings)
    ones = np.ones((2, 8), np.int32)
    batch = global_batch(
        {
            "input_ids": ones * 5,
            "targets": ones * 6,
            "segment_ids": ones,
            "positions": np.tile(np.arange(8, dtype=np.int32), (2, 1)),
            "loss_mask": np.full((2, 8), np.inf, np.float32),
        },
        mesh,
        2,
    )
    state, metrics = step(state, batch)
    assert int(metrics["nonfinite"]) == 1 and int(state.nonfinite_total) == 1 and int(state.step) == 1
    after = flat_params(state)
    for key in before:
        np.testing.assert_array_equal(after[key], before[key])


# ---------------------------------------------------------------------- CLI smoke test
@pytest.mark.slow
def test_finetune_cli_smoke(tmp_path, capsys, tiny_preset):
    from optiml_jax.cli.finetune import main

    workdir = tmp_path / "cli"
    run = [
        "--config",
        "demo",
        f"workdir={workdir}",
        "train.max_steps=3",
        f"model=preset:{tiny_preset}",
        "train.batch_size=8",
        "train.seq_len=64",
    ]
    code = main(
        [
            *run,
            "eval.every_steps=2",
            "eval.max_batches=2",
            "eval.num_samples=1",
            "eval.sample_max_new_tokens=3",
            "eval.tasks.max_instances=3",
            "eval.tasks.max_new_tokens=4",  # the demo's held-out task metrics
            "train.log_every_steps=1",
            "train.peak_flops_per_device=1e9",
            "--no-progress",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "done: step 3" in out and "eval prompt" in out
    # eval.tasks: every evaluation writes its predictions and scores, the final one also beside the model
    table = out[out.index("held-out tasks at the first and last") :]
    row = next(
        line for line in table.splitlines() if line.startswith("task833_poem_sentiment_classification")
    )
    assert "@0" in table and "@3" in table and row.count("EM") == 2 and row.count("RL") == 2
    for step in (0, 2, 3):
        predictions = read_jsonl(workdir / "eval" / str(step) / "predictions.jsonl")
        assert len(predictions) == 8 * 3 and {"prediction", "references", "exact_match", "rougeL"} <= set(
            predictions[0]
        )
    final_metrics = json.loads((workdir / "final" / "metrics.json").read_text())
    assert final_metrics == json.loads((workdir / "eval" / "3" / "metrics.json").read_text())
    assert final_metrics["overall"]["instances"] == 24 and final_metrics["settings"]["step"] == 3
    records = read_jsonl(workdir / "metrics.jsonl")
    train_steps = [r["step"] for r in records if "train/loss" in r]
    assert train_steps == [1, 2, 3]
    row = next(r for r in records if r["step"] == 3 and "train/loss" in r)
    for key in ("train/lr", "train/grad_norm", "train/tokens_per_s", "train/mfu", "data/packed/rows"):
        assert key in row
    assert any("eval/loss" in r for r in records)
    tags = {tag for _, tag, _ in read_tensorboard_scalars(workdir / "tensorboard")}
    assert {
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_s",
        "train/mfu",
        "eval/loss",
    } <= tags
    assert {
        "eval_tasks/exact_match",
        "eval_tasks/rougeL",
        "eval_tasks/task1146_country_capital/rougeL",
    } <= tags
    assert any("eval_tasks/rouge1" in r for r in records if r["step"] == 3)
    assert (workdir / "checkpoints" / "3").is_dir()
    # Same workdir again: already at max_steps, nothing to train, no crash.
    assert (
        main(
            [
                *run,
                "eval.num_samples=0",
                "eval.max_batches=1",
                "eval.tasks=null",
                "train.peak_flops_per_device=1e9",
                "--no-progress",
            ]
        )
        == 0
    )


# ---------------------------------------------------------------------- which parameters train
def test_final_model_appears_with_its_scores(tmp_path, monkeypatch):
    """final/metrics.json (eval.tasks' scores of the last step) is inside final/ when final/ is renamed
    into place, not copied in after it: a run stopped in between leaves no final/ without it."""
    config = OPTConfig.from_dict(TINY_MODEL)
    mesh = make_mesh(MeshConfig(data=-1))
    params, _ = init_params_sharded(OPTForCausalLM(config, scan_layers=True), jax.random.PRNGKey(0), mesh)
    scores = tmp_path / "eval" / "4" / "metrics.json"
    scores.parent.mkdir(parents=True)
    scores.write_text(json.dumps({"overall": {"instances": 3}}))
    renamed, replace = [], fileio._replace_dir

    def watched(tmp, directory):
        renamed.append((directory.name, sorted(p.name for p in tmp.iterdir())))
        replace(tmp, directory)

    monkeypatch.setattr(fileio, "_replace_dir", watched)
    result = RunResult(step=4, state=None, model=None, losses={}, eval_losses={}, task_metrics={4: {}})
    run = SimpleNamespace(
        workdir=tmp_path, opt_config=config, state=SimpleNamespace(params=params), tokenizer=None,
        result=result, is_main=True,
    )  # fmt: skip
    final_model(run, 4)
    assert len(renamed) == 1 and renamed[0][0] == "final" and "metrics.json" in renamed[0][1], renamed
    assert (tmp_path / "final" / "metrics.json").read_text() == scores.read_text()
    assert result.final_dir == str(tmp_path / "final")


def test_relative_workdir_stays_put_when_the_working_directory_changes(tiny_preset, tmp_path, monkeypatch):
    """The working directory is process-wide (lm_eval's suites change it while they run, and background
    threads may be writing then): a relative workdir means the directory it named when the run began."""
    monkeypatch.chdir(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cfg = run_config(tiny_preset, "run", train={"max_steps": 2}, checkpoint={"save_final": True})
    hooks = Hooks().add(lambda run, step: os.chdir(elsewhere), every=1)
    result = train_and_evaluate(cfg, progress=False, hooks=hooks)
    assert result.final_dir == str(tmp_path / "run" / "final") and (tmp_path / "run" / "final").is_dir()
    assert (tmp_path / "run" / "checkpoints" / "2").is_dir()
    assert not any(elsewhere.iterdir())


def test_frozen_embeddings_stay_put_hold_no_moments_and_resume(tiny_preset, tmp_path):
    """train.trainable leaves the embeddings (and so the tied LM head) out: they end where they began
    while every other parameter moves, the optimizer state holds no moments for them, and a stopped run
    resumes from its checkpoint into the same structure."""
    from optiml_jax.config import OPTConfig
    from optiml_jax.sharding import make_mesh
    from optiml_jax.train import build_model, create_train_state, make_optimizer

    cfg = run_config(tiny_preset, tmp_path / "frozen", train={"trainable": "^(?!.*embed_)"})
    seen = []

    def hooks():  # a user's hooks run at their cadences, after the run's own
        return (
            Hooks()
            .add(lambda run, step: seen.append(("every", step, int(run.state.step))), every=1)
            .add(lambda run, step: seen.append(("stopped", step)), on_preemption=True)
            .add(lambda run, step: seen.append(("end", step)), at_end=True)
        )

    first = train_and_evaluate(cfg, progress=False, stop_after_steps=2, hooks=hooks())
    assert first.interrupted and first.step == 2
    assert seen == [("every", 1, 1), ("every", 2, 2), ("stopped", 2)]
    seen.clear()
    second = train_and_evaluate(cfg, progress=False, hooks=hooks())
    assert second.step == 4 and sorted(second.losses) == [3, 4]
    assert seen == [("every", 3, 3), ("end", 4)]

    model = build_model(OPTConfig.from_preset(tiny_preset), cfg.train)
    initial, _ = create_train_state(
        model, make_optimizer(cfg.optim, 4, cfg.train.trainable), make_mesh(cfg.mesh), cfg.seed
    )
    before, after = flat_params(initial), flat_params(second.state)
    frozen = [key for key in before if "embed_" in key]
    assert len(frozen) == 2  # token and position embeddings
    for key in before:
        if key in frozen:
            np.testing.assert_array_equal(after[key], before[key], err_msg=key)
        else:
            assert not np.array_equal(after[key], before[key]), key
    moments = [
        jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(second.state.opt_state)
    ]
    assert any("fc1" in path for path in moments)
    assert not any("embed_" in path for path in moments), moments


def test_trainable_that_is_not_a_regex_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"train.trainable='\(embed' is not a regular expression"):
        load_run_config("demo", [f"workdir={tmp_path}", "train.trainable=(embed"])


# ---------------------------------------------------------------------- a workdir that is not a run's
def test_workdir_with_files_a_run_did_not_write_is_refused_and_left_alone(tiny_preset, tmp_path):
    workdir = tmp_path / "exported"
    (workdir / "final").mkdir(parents=True)
    (workdir / "final" / "README.md").write_text("my notes")
    (workdir / "metrics.jsonl").write_text('{"step": 1, "mine": 1}\n')
    cfg = run_config(tiny_preset, workdir)
    for overwrite in (False, True):  # --overwrite never replaces what a run did not write
        with pytest.raises(ConfigError, match="holds files a fine-tuning run did not write") as error:
            train_and_evaluate(cfg, progress=False, overwrite=overwrite)
        assert "final" in str(error.value) and "metrics.jsonl" in str(error.value)
    assert (workdir / "final" / "README.md").read_text() == "my notes"
    assert (workdir / "metrics.jsonl").read_text() == '{"step": 1, "mine": 1}\n'
    assert sorted(p.name for p in workdir.iterdir()) == ["final", "metrics.jsonl"]

    # Beside files with other names, --overwrite lets a run go ahead and leaves them as they were.
    beside = tmp_path / "notes"
    beside.mkdir()
    (beside / "notes.txt").write_text("keep me")
    cfg = run_config(tiny_preset, beside, train={"max_steps": 1})
    with pytest.raises(ConfigError, match=r"notes\.txt.*--overwrite"):
        train_and_evaluate(cfg, progress=False)
    assert train_and_evaluate(cfg, progress=False, overwrite=True).step == 1
    assert (beside / "notes.txt").read_text() == "keep me"
    # A run's own workdir, overwritten, loses only what the run wrote.
    assert train_and_evaluate(cfg, progress=False, overwrite=True).step == 1
    assert (beside / "notes.txt").read_text() == "keep me"


def test_console_loss_lines_without_a_bar_and_a_finished_run_left_as_it_is(
    tiny_preset, tmp_path, capsys, caplog
):
    """--no-progress: a loss line every train.log_every_steps on the console (step, loss, lr, tokens/s,
    MFU, ETA). Running the finished run again changes no file and says so."""
    from finetune_helpers import cli_overrides, config_dict

    from optiml_jax.finetune import main

    config = config_dict(
        tiny_preset, tmp_path / "run", train={"log_every_steps": 2}, checkpoint={"save_final": True}
    )
    with caplog.at_level(logging.INFO, logger="optiml_jax.train"):
        assert main(["--config", "demo", *cli_overrides(config), "--no-progress"]) == 0
    lines = [r.getMessage() for r in caplog.records if ": loss " in r.getMessage()]
    assert [line.split("step ")[1].split(":")[0] for line in lines] == ["2/4", "4/4"], lines
    for part in (", lr ", " tokens/s, MFU ", "%, ETA "):
        assert part in lines[0], lines[0]

    def snapshot():
        return {
            str(p.relative_to(tmp_path / "run")): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted((tmp_path / "run").rglob("*"))
            if p.is_file()
        }

    before = snapshot()
    capsys.readouterr()
    assert main(["--config", "demo", *cli_overrides(config), "--no-progress"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert snapshot() == before
