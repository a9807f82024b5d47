"""Reliability of fine-tuning runs: exact resume after SIGKILL / SIGTERM of the real CLI, resume on another
device count, unfinalised and corrupted checkpoints, config changes on resume, non-finite stops, hostile
data through the CLI, and the start-up memory check (with the estimate against XLA's own numbers)."""

import json
import logging
import signal
import time

import jax
import numpy as np
import pytest
from finetune_helpers import (
    TASKS,
    cli_overrides,
    config_dict,
    final_params,
    flat,
    last_logged_step,
    run_config,
    start_cli,
    step_losses,
)
from tiny_models import tiny_model_settings

from optiml_jax.config import ConfigError
from optiml_jax.run_config import from_dict
from optiml_jax.train import train_and_evaluate
from optiml_jax.train.metrics_log import read_jsonl


# ---------------------------------------------------------------------- exact resume of the real CLI
@pytest.mark.slow
def test_cli_killed_or_terminated_resumes_to_the_uninterrupted_result(tiny_preset, tmp_path):
    """SIGKILL and SIGTERM the CLI once metrics.jsonl shows step 25 (checkpoints every 10), run the same
    command again: every step is logged once and equals the uninterrupted run, and so do the final params."""
    steps = 100
    sections = dict(train={"max_steps": steps}, checkpoint={"every_steps": 10, "keep": 2, "save_final": True})
    reference = train_and_evaluate(
        run_config(tiny_preset, tmp_path / "ref", **sections), devices=jax.devices()[:4], progress=False
    )
    configs = {sig: config_dict(tiny_preset, tmp_path / sig, **sections) for sig in ("kill", "term")}
    procs = {sig: start_cli(configs[sig], tmp_path, devices=4) for sig in configs}
    signals = {"kill": signal.SIGKILL, "term": signal.SIGTERM}
    deadline = time.time() + 240
    sent = {}
    while len(sent) < 2 and time.time() < deadline:
        for sig, proc in procs.items():
            if sig not in sent and last_logged_step(tmp_path / sig) >= 25:
                proc.send_signal(signals[sig])
                sent[sig] = last_logged_step(tmp_path / sig)
        time.sleep(0.002)
    outputs = {sig: proc.communicate(timeout=600) for sig, proc in procs.items()}
    assert procs["kill"].returncode == -signal.SIGKILL, outputs["kill"][1][-2000:]
    assert procs["term"].returncode == 0, outputs["term"][1][-2000:]
    stopped = int(outputs["term"][0].split("stopped at step ")[1].split(";")[0])
    assert 25 <= stopped < steps
    assert last_logged_step(tmp_path / "kill") < steps  # really killed mid-way
    assert (tmp_path / "term" / "checkpoints" / str(stopped)).is_dir()  # SIGTERM saved a checkpoint

    procs = {sig: start_cli(configs[sig], tmp_path, devices=4) for sig in configs}
    for sig, proc in procs.items():
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]
        assert f"done: step {steps}" in out
        assert "resumed from" in err
        losses = step_losses(tmp_path / sig)
        assert sorted(losses) == list(range(1, steps + 1))
        np.testing.assert_allclose(
            [losses[s] for s in range(1, steps + 1)],
            [reference.losses[s] for s in range(1, steps + 1)],
            rtol=1e-5,
            err_msg=sig,
        )
        got, want = final_params(tmp_path / sig, tiny_preset), flat(reference.state.params)
        for key in want:
            np.testing.assert_allclose(got[key], want[key], atol=1e-6, err_msg=f"{sig} {key}")


def _wait_for_step(workdir, step: int, proc, seconds: float = 300) -> int:
    deadline = time.time() + seconds
    while last_logged_step(workdir) < step and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    return last_logged_step(workdir)


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_a_second_one_quits_at_once(tiny_preset, tmp_path):
    """The first SIGINT stops the CLI like SIGTERM: a checkpoint, one line, exit 0, no traceback; run
    again, it resumes, and two SIGINTs in a row end it at once (killed by the signal)."""
    config = config_dict(
        tiny_preset, tmp_path / "run", train={"max_steps": 100000}, checkpoint={"every_steps": 0}
    )

    proc = start_cli(config, tmp_path, devices=2)
    assert _wait_for_step(tmp_path / "run", 3, proc) >= 3, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert "Ctrl-C: saving a checkpoint" in err
    stopped = int(out.split("stopped at step ")[1].split(";")[0])
    assert (tmp_path / "run" / "checkpoints" / str(stopped)).is_dir()

    proc = start_cli(config, tmp_path, devices=2)
    assert _wait_for_step(tmp_path / "run", stopped + 3, proc) >= stopped + 3, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGINT)
    time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGINT, (proc.returncode, err[-3000:])
    assert "resumed from" in err and "Traceback" not in err


# ---------------------------------------------------------------------- checkpoints on disk
@pytest.fixture(scope="module")
def reference_run(tiny_preset, tmp_path_factory):
    """4 uninterrupted steps on all 8 devices."""
    return train_and_evaluate(run_config(tiny_preset, tmp_path_factory.mktemp("ref") / "w"), progress=False)


@pytest.mark.slow
def test_unfinalised_and_corrupted_checkpoints_are_not_used(tiny_preset, tmp_path, reference_run, caplog):
    workdir = tmp_path / "w"
    cfg = run_config(tiny_preset, workdir, checkpoint={"every_steps": 1, "keep": 5})
    first = train_and_evaluate(cfg, progress=False, stop_after_steps=3)
    assert first.step == 3
    checkpoints = workdir / "checkpoints"
    assert sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == [1, 2, 3]
    # A step being written when the process died: Orbax's temporary name, never finalised.
    unfinished = checkpoints / "4.orbax-checkpoint-tmp-1234567890"
    (unfinished / "state").mkdir(parents=True)
    (unfinished / "state" / "garbage").write_bytes(b"\0" * 10)
    # The newest finalised step loses its array data (truncated files).
    data_files = [
        p
        for p in (checkpoints / "3" / "state").rglob("*")
        if p.is_file() and "ocdbt" in str(p) and p.stat().st_size > 0 and "/d/" in str(p)
    ]
    assert data_files
    for path in data_files:
        path.write_bytes(path.read_bytes()[:10])
    with caplog.at_level(logging.WARNING, logger="optiml_jax.train"):
        second = train_and_evaluate(cfg, progress=False)
    assert any(
        str(checkpoints / "3") in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records
    )
    assert second.step == 4 and sorted(second.losses) == [3, 4]  # resumed from step 2
    assert list((workdir / "checkpoints_corrupt").glob("3-*"))
    np.testing.assert_allclose(
        [second.losses[s] for s in (3, 4)], [reference_run.losses[s] for s in (3, 4)], rtol=1e-6
    )
    got, want = flat(second.state.params), flat(reference_run.state.params)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=1e-7, err_msg=key)
    assert step_losses(workdir) == pytest.approx({s: reference_run.losses[s] for s in range(1, 5)}, rel=1e-6)


@pytest.mark.slow
def test_resume_on_a_different_device_count_and_mesh(tiny_preset, tmp_path, reference_run):
    """Written on 8 devices (data=4 x fsdp=2), restored on 4 (data=2 x fsdp=2): the mesh is a safe key."""
    first = train_and_evaluate(
        run_config(tiny_preset, tmp_path / "w", mesh={"data": -1, "fsdp": 2}),
        progress=False,
        stop_after_steps=2,
    )
    assert first.step == 2
    second = train_and_evaluate(
        run_config(tiny_preset, tmp_path / "w", mesh={"data": 2, "fsdp": 2}),
        devices=jax.devices()[:4],
        progress=False,
    )
    assert (
        second.step == 4
        and second.state.params["decoder"]["embed_tokens"]["embedding"].sharding.mesh.size == 4
    )
    curve = {**first.losses, **second.losses}
    np.testing.assert_allclose(
        [curve[s] for s in range(1, 5)], [reference_run.losses[s] for s in range(1, 5)], atol=1e-4
    )
    got, want = flat(second.state.params), flat(reference_run.state.params)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=1e-4, err_msg=key)


# ---------------------------------------------------------------------- config changes on resume
@pytest.mark.slow
def test_resume_refuses_result_changing_config_unless_overwrite(tiny_preset, tmp_path, capsys):
    import yaml

    from optiml_jax.cli.finetune import main

    workdir = tmp_path / "w"
    config = config_dict(tiny_preset, workdir)
    first = train_and_evaluate(from_dict(config), progress=False, stop_after_steps=2)
    saved = yaml.safe_load((workdir / "config.yaml").read_text())
    assert saved["train"]["seq_len"] == 64 and saved["seed"] == 7  # the resolved config, saved at start
    changed = config_dict(
        tiny_preset, workdir, seed=8, train={"seq_len": 32}, optim={"lr": 1e-3}, data={"train": TASKS[:1]}
    )
    with pytest.raises(ConfigError) as error:
        train_and_evaluate(from_dict(changed), progress=False)
    for key in ("seed", "train.seq_len", "optim.lr", "data.train"):
        assert key in str(error.value)
    assert "--overwrite" in str(error.value)
    # The CLI: one line, status 2, nothing trained.
    code = main(["--config", "demo", *cli_overrides(changed), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "train.seq_len" in err[0] and err[0].startswith("error:")
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [2]
    # Safe keys: max_steps, logging, eval and checkpoint cadence, mesh.
    # (mesh and device count: test_resume_on_a_different_device_count_and_mesh)
    safe = config_dict(
        tiny_preset,
        workdir,
        train={"max_steps": 3, "log_every_steps": 2},
        checkpoint={"every_steps": 5, "keep": 3},
        eval={"every_steps": 7},
        mesh={"data": 8},
    )
    resumed = train_and_evaluate(from_dict(safe), progress=False)
    assert sorted(resumed.losses) == [3] and first.step == 2
    # --overwrite starts afresh under the new config.
    code = main(["--config", "demo", *cli_overrides(changed), "--no-progress", "--overwrite"])
    assert code == 0
    assert [r["step"] for r in read_jsonl(workdir / "metrics.jsonl") if "train/step_loss" in r] == [
        1,
        2,
        3,
        4,
    ]
    assert yaml.safe_load((workdir / "config.yaml").read_text())["train"]["seq_len"] == 32


# ---------------------------------------------------------------------- bad numbers
def test_nonfinite_run_stops_with_a_clear_cli_message_and_keeps_the_last_good_checkpoint(
    tiny_preset, tmp_path, capsys
):
    """lr=1e30 blows the params up after the first update: every later step is non-finite, skipped and
    counted; after 3 in a row the CLI stops (status 1) naming the last good checkpoint, step 1."""
    import orbax.checkpoint as ocp

    from optiml_jax.cli.finetune import main

    workdir = tmp_path / "w"
    config = config_dict(
        tiny_preset,
        workdir,
        train={"max_steps": 20, "max_nonfinite_in_a_row": 3},
        optim={"lr": 1e30, "warmup_steps": 0, "schedule": "constant"},
        checkpoint={"every_steps": 1, "keep": 20, "async_save": False},
    )
    code = main(["--config", "demo", *cli_overrides(config), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1
    message = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(message) == 1 and "3 non-finite" in message[0] and "max_nonfinite_in_a_row" in message[0]
    assert f"last good checkpoint is {workdir / 'checkpoints' / '1'}" in message[0]
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [1]
    records = {r["step"]: r for r in read_jsonl(workdir / "metrics.jsonl") if "train/step_loss" in r}
    assert records[1]["train/nonfinite"] == 0 and records[4]["train/nonfinite_in_a_row"] == 3
    assert records[4]["train/nonfinite_total"] == 3
    with ocp.CheckpointManager(workdir / "checkpoints") as manager:
        saved = manager.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    assert int(saved["nonfinite_in_a_row"]) == 0
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(saved["params"]))


# ---------------------------------------------------------------------- bad data
def test_hostile_jsonl_is_skipped_and_counted_or_one_line_error(tiny_preset, tmp_path, capsys):
    from optiml_jax.cli.finetune import main

    good = [json.dumps({"src": f"Question {i}: what is {i} plus {i}?", "tgt": f"{2 * i}"}) for i in range(40)]
    hostile = tmp_path / "hostile.jsonl"
    lines = [
        good[0].encode(),
        b'{"src": "unterminated',
        json.dumps({"src": "no target"}).encode(),
        json.dumps({"src": "empty", "tgt": ""}).encode(),
        b'{"src": "bad \xff\xfe bytes", "tgt": "x"}',
        json.dumps({"src": "long " * 400, "tgt": "y"}).encode(),
        b"[1, 2, 3]",
    ] + [g.encode() for g in good[1:]]
    hostile.write_bytes(b"\n".join(lines) + b"\n")
    config = config_dict(
        tiny_preset,
        tmp_path / "skip",
        data={"train": str(hostile), "overlong": "drop"},
        train={"max_steps": 2},
    )
    assert main(["--config", "demo", *cli_overrides(config), "--no-progress"]) == 0
    capsys.readouterr()
    last = [r for r in read_jsonl(tmp_path / "skip" / "metrics.jsonl") if "train/step_loss" in r][-1]
    skipped = {k: v for k, v in last.items() if k.startswith("data/skipped/")}
    assert sum(skipped.values()) == 5 and skipped["data/skipped/malformed_json"] >= 1
    assert skipped["data/skipped/invalid_utf8"] == 1 and skipped["data/skipped/empty_target"] == 1

    config = config_dict(tiny_preset, tmp_path / "raise", data={"train": str(hostile), "on_error": "raise"})
    code = main(["--config", "demo", *cli_overrides(config), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error:") and f"{hostile}:2" in err[0] and "Traceback" not in err[0]


# ---------------------------------------------------------------------- memory
def test_memory_estimate_is_printed_and_a_run_that_cannot_fit_stops_before_compiling(
    tiny_preset, tmp_path, capsys, caplog, monkeypatch
):
    import optiml_jax.train.loop as train_module
    from optiml_jax.cli.finetune import main

    def must_not_run(*args, **kwargs):
        raise AssertionError("allocated or compiled although the run cannot fit")

    monkeypatch.setattr(train_module, "create_train_state", must_not_run)
    monkeypatch.setattr(train_module, "make_train_step", must_not_run)
    config = config_dict(tiny_preset, tmp_path / "big", train={"memory_limit_gib": 1e-4})
    with caplog.at_level(logging.INFO, logger="optiml_jax.train"):
        code = main(["--config", "demo", *cli_overrides(config), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "needs about" in err and "GiB per device" in err and "train.batch_size" in err
    # The estimate table is logged at start-up (process 0), whether or not the run fits.
    assert any(
        "memory per device (estimate, 8 devices)" in r.getMessage() and "optimizer state" in r.getMessage()
        for r in caplog.records
    )
    monkeypatch.setenv("OPTIML_JAX_MEMORY_LIMIT_GIB", "0.0001")
    config = config_dict(tiny_preset, tmp_path / "env")
    assert main(["--config", "demo", *cli_overrides(config), "--no-progress"]) == 1
    assert "needs about" in capsys.readouterr().err


@pytest.mark.parametrize("remat", ["none", "dots", "full"])
def test_activation_estimate_is_within_2x_of_xla(remat):
    """The estimate's transient part (saved activations + logits + gradients) against the temp bytes of
    XLA's compiled train step (memory_analysis), for a model where activations dominate."""
    import jax.numpy as jnp

    from optiml_jax.config import OPTConfig
    from optiml_jax.run_config import OptimSection, TrainSection
    from optiml_jax.sharding import MeshConfig, batch_sharding, make_mesh
    from optiml_jax.train import build_model, make_optimizer, make_train_step, state_shardings
    from optiml_jax.train.memory import estimate_training_memory

    # activations dominate: long sequences through a wider, deeper model than the tiny one, with dropout
    wider_deeper = dict(hidden_size=64, num_hidden_layers=4, ffn_dim=256)
    config = OPTConfig(
        **tiny_model_settings(vocab_size=512, max_position_embeddings=512, dropout=0.1, **wider_deeper)
    )
    batch, seq_len = 8, 256
    train = TrainSection(max_steps=5, batch_size=batch, seq_len=seq_len, remat_policy=remat)
    model, tx = build_model(config, train), make_optimizer(OptimSection(), 5)
    mesh = make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    abstract, shardings = state_shardings(model, tx, mesh)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    batch_spec = {
        k: jax.ShapeDtypeStruct(
            (batch, seq_len), jnp.float32 if k == "loss_mask" else jnp.int32, sharding=batch_sharding(mesh)
        )
        for k in ("input_ids", "targets", "loss_mask", "segment_ids", "positions")
    }
    analysis = (
        make_train_step(model, tx, train, OptimSection(), mesh, shardings)
        .lower(state, batch_spec)
        .compile()
        .memory_analysis()
    )
    if analysis is None or not getattr(analysis, "temp_size_in_bytes", 0):
        pytest.skip("no memory analysis on this backend")
    estimate = estimate_training_memory(
        config, mesh_shape=dict(mesh.shape), global_batch=batch, seq_len=seq_len, remat_policy=remat
    )
    transient = estimate.activations + estimate.logits + estimate.grads
    assert 0.5 < transient / analysis.temp_size_in_bytes < 2.0, (transient, analysis.temp_size_in_bytes)
