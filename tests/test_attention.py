"""Every attention implementation computes what `blockwise` computes: forward outputs and gradients on
packed rows with several segments, right padding and left-padded prompts, head dims 64 and 128, lengths
that are and are not multiples of 128; the Pallas kernels run in interpret mode on CPU. `blockwise`
itself is checked against plain autodiff attention in test_model_parity.py and, through the model,
against Hugging Face."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optiml_jax.model.attention import AttentionError, attention, choose_implementation
from optiml_jax.model.kernels.base import fused_dot_product_attention
from optiml_jax.model.kernels.blockwise import blockwise_attention
from optiml_jax.model.masks import segment_mask

KERNELS = ("xla", "splash", "pallas_gpu")
# (length, head dim, dtype, tolerance relative to the largest reference value)
CASES = [(128, 64, jnp.float32, 1e-5), (192, 128, jnp.float32, 1e-5), (128, 128, jnp.bfloat16, 2e-2)]


def _inputs(length, head_dim, dtype, heads=2, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (
        jnp.asarray(rng.normal(size=(3, length, heads, head_dim)) * scale, dtype)
        for scale in (head_dim**-0.5, 1.0, 1.0)
    )
    segments = np.zeros((3, length), np.int32)
    third = length // 3
    segments[0, :third], segments[0, third : 2 * third], segments[0, 2 * third : length - 5] = (
        1,
        2,
        3,
    )  # packed
    segments[1, 7:] = 1  # a left-padded prompt
    segments[2, :] = 1  # one whole row
    return q, k, v, jnp.asarray(segments)


def _value_and_grads(fn, q, k, v, seed=1):
    weights = jnp.asarray(np.random.default_rng(seed).normal(size=q.shape), jnp.float32)

    def loss(q, k, v):
        return jnp.sum(fn(q, k, v).astype(jnp.float32) * weights)

    out = jax.jit(fn)(q, k, v)
    return out, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def _assert_close(ours, reference, tolerance, what):
    ours, reference = np.asarray(ours, np.float32), np.asarray(reference, np.float32)
    scale = float(np.max(np.abs(reference)))
    error = float(np.max(np.abs(ours - reference)))
    assert error <= tolerance * scale, f"{what}: max error {error:.3g} > {tolerance} x {scale:.3g}"


@pytest.mark.parametrize(
    "length,head_dim,dtype,tolerance", CASES, ids=[f"{c[0]}-d{c[1]}-{jnp.dtype(c[2]).name}" for c in CASES]
)
@pytest.mark.parametrize("implementation", KERNELS)
def test_kernel_matches_blockwise(implementation, length, head_dim, dtype, tolerance):
    q, k, v, segments = _inputs(length, head_dim, dtype)
    run = lambda name: lambda q, k, v: attention(q, k, v, segment_ids=segments, implementation=name)
    reference_out, reference_grads = _value_and_grads(run("blockwise"), q, k, v)
    out, grads = _value_and_grads(run(implementation), q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    _assert_close(out, reference_out, tolerance, "output")
    for name, ours, reference in zip("qkv", grads, reference_grads):
        assert np.all(np.isfinite(np.asarray(ours, np.float32))), f"d{name} is not finite"
        _assert_close(ours, reference, tolerance, f"d{name}")


def test_cudnn_wrapper_mask_semantics_through_xla():
    """What `cudnn` runs (rows padded to 128, the segments as a whole [b, 1, t, t] mask), with XLA in
    cuDNN's place: at length % 128 == 64, cuDNN's NaN-gradient case, the padding must not leak."""
    q, k, v, segments = _inputs(192, 64, jnp.float32)
    wrapped = lambda q, k, v: fused_dot_product_attention(
        q, k, v, segments, backend="xla", causal=True, pad_to=128
    )
    plain = lambda q, k, v: blockwise_attention(q, k, v, segment_mask(segments, True), causal=True)
    (out, grads), (reference_out, reference_grads) = (
        _value_and_grads(wrapped, q, k, v),
        _value_and_grads(plain, q, k, v),
    )
    _assert_close(out, reference_out, 1e-5, "output")
    for ours, reference in zip(grads, reference_grads):
        _assert_close(ours, reference, 1e-5, "gradient")


def test_non_causal_paths_agree():
    q, k, v, segments = _inputs(128, 64, jnp.float32)
    outs = {
        name: attention(q, k, v, segment_ids=segments, causal=False, implementation=name)
        for name in ("blockwise", "xla", "splash")
    }
    for name in ("xla", "splash"):
        _assert_close(outs[name], outs["blockwise"], 1e-5, name)


@pytest.mark.parametrize(
    "platform,dtype,head_dim,length,dropout,branches,expected",
    [
        ("cpu", "bfloat16", 64, 2048, False, False, "blockwise"),
        ("gpu", "bfloat16", 64, 2048, False, False, "cudnn"),
        ("gpu", "float16", 128, 1000, False, False, "cudnn"),
        ("gpu", "float32", 64, 2048, False, False, "blockwise"),  # cuDNN has no float32
        ("gpu", "bfloat16", 96 + 4, 2048, False, False, "blockwise"),  # head dim not a multiple of 8
        ("gpu", "bfloat16", 64, 2048, True, False, "blockwise"),  # attention dropout
        ("gpu", "bfloat16", 64, 2048, False, True, "xla"),  # scoring's segment branches need a mask
        ("tpu", "bfloat16", 128, 2048, False, False, "splash"),
        ("tpu", "bfloat16", 128, 2000, False, False, "blockwise"),  # not a multiple of the kernel block
        ("tpu", "bfloat16", 128, 2048, False, True, "blockwise"),
    ],
)
def test_auto_picks_per_platform_and_says_why(platform, dtype, head_dim, length, dropout, branches, expected):
    name, reason = choose_implementation(
        "auto",
        platform=platform,
        dtype=dtype,
        head_dim=head_dim,
        length=length,
        dropout=dropout,
        segment_branches=branches,
    )
    assert name == expected and reason


def test_what_cannot_run_here_is_a_clear_error():
    choose = lambda name, **kw: choose_implementation(
        name, **{**dict(platform="cpu", dtype="float32", head_dim=64, length=128, dropout=False), **kw}
    )
    with pytest.raises(AttentionError, match="cudnn.*needs an NVIDIA GPU.*cpu"):
        choose("cudnn")
    with pytest.raises(AttentionError, match="bfloat16 or float16, not float32"):
        choose("cudnn", platform="gpu")
    with pytest.raises(AttentionError, match="no attention dropout"):
        choose("xla", dropout=True)
    with pytest.raises(AttentionError, match="TPU kernel"):
        choose("splash", platform="gpu")
    with pytest.raises(AttentionError, match="not one of"):
        choose("flash")
    assert choose("splash", segment_branches=True)[0] == "blockwise"  # logged fallback, not an error
    assert choose("splash")[1].startswith("asked for; Pallas interpret mode")
    q, k, v, segments = _inputs(128, 64, jnp.float32)
    with pytest.raises(AttentionError, match="needs an NVIDIA GPU"):
        attention(q, k, v, segment_ids=segments, implementation="cudnn")


def test_the_choice_is_logged_once_with_its_reason(caplog):
    q, k, v, segments = _inputs(128, 64, jnp.float32)
    with caplog.at_level(logging.INFO, logger="optiml_jax.model.attention"):
        for _ in range(3):
            attention(q, k, v, segment_ids=segments, implementation="auto", causal=False)
    lines = [r.getMessage() for r in caplog.records if "attention=auto" in r.getMessage()]
    assert len(lines) <= 1  # another test of this process may have logged it first
    from optiml_jax.model import attention as module

    assert ("auto", "blockwise", "CPU") in module._logged_choices


# ---------------------------------------------------------------------- a training step per implementation
@pytest.fixture(scope="module")
def training_losses():
    """losses(implementation): three AdamW steps of the tiny model on packed rows (several segments,
    padding) on a 2 x 2 mesh (rows and heads split, so the kernels run under shard_map)."""
    import functools

    from finetune_helpers import TINY_MODEL

    from optiml_jax.config import OPTConfig
    from optiml_jax.run_config import OptimSection, TrainSection
    from optiml_jax.sharding import MeshConfig, make_mesh
    from optiml_jax.train import (
        build_model,
        create_train_state,
        global_batch,
        make_optimizer,
        make_train_step,
    )

    rng = np.random.default_rng(3)
    length, rows = 128, 4
    segments = np.zeros((rows, length), np.int32)
    for row in range(rows):
        cuts = np.sort(rng.choice(np.arange(8, length - 8), size=2, replace=False))
        (
            segments[row, : cuts[0]],
            segments[row, cuts[0] : cuts[1]],
            segments[row, cuts[1] : length - 3 * row],
        ) = 1, 2, 3
    positions = np.zeros_like(segments)
    for row in range(rows):
        for segment in (1, 2, 3):
            where = np.flatnonzero(segments[row] == segment)
            positions[row, where] = np.arange(where.size)
    batch = {
        "input_ids": rng.integers(3, 2048, (rows, length)).astype(np.int32),
        "targets": rng.integers(3, 2048, (rows, length)).astype(np.int32),
        "segment_ids": segments,
        "positions": positions,
        "loss_mask": (segments > 0).astype(np.float32),
    }
    mesh = make_mesh(MeshConfig(2, 1, 2), devices=jax.devices()[:4])
    optim = OptimSection(lr=1e-2, warmup_steps=0)

    @functools.cache
    def losses(name):
        train = TrainSection(max_steps=3, batch_size=rows, seq_len=length, attention=name, dropout=0.0)
        model = build_model(OPTConfig(**TINY_MODEL), train)
        tx = make_optimizer(optim, 3)
        state, shardings = create_train_state(model, tx, mesh, seed=0)
        step = make_train_step(model, tx, train, optim, mesh, shardings)
        out = []
        for _ in range(3):
            state, metrics = step(state, global_batch(batch, mesh, rows))
            out.append(float(metrics["loss"]))
        return tuple(out)

    return losses


@pytest.mark.slow
@pytest.mark.parametrize("implementation", KERNELS)
def test_training_losses_match_blockwise_over_three_steps(implementation, training_losses):
    reference = training_losses("blockwise")
    assert reference[2] < reference[0]  # it trains
    np.testing.assert_allclose(training_losses(implementation), reference, rtol=1e-4, atol=0)


def test_kernel_with_attention_dropout_is_a_config_error():
    from finetune_helpers import TINY_MODEL

    from optiml_jax.config import ConfigError, OPTConfig
    from optiml_jax.run_config import TrainSection
    from optiml_jax.train import build_model

    with pytest.raises(ConfigError, match="train.attention='xla' has no attention dropout"):
        build_model(OPTConfig(**TINY_MODEL), TrainSection(attention="xla", attention_dropout=0.1))
    with pytest.raises(ConfigError, match="train.attention='cudnn' needs an NVIDIA GPU"):
        build_model(OPTConfig(**TINY_MODEL), TrainSection(attention="cudnn"))


def test_float32_parity_runs_with_full_precision_matmuls_here_and_in_subprocesses():
    """On GPU jax's default float32 matmul is TF32 (10-bit mantissa): HF-parity tests would then fail
    by ~1e-3. conftest sets `highest` for this process and for the CLIs the tests start."""
    import subprocess
    import sys

    assert jax.config.jax_default_matmul_precision == "highest"
    child = subprocess.run(
        [sys.executable, "-c", "import jax; print(jax.config.jax_default_matmul_precision)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert child.stdout.strip() == "highest"


# ---------------------------------------------------------------------- the target platform is a parameter
def _traced_forward(platform, dtype=jnp.bfloat16, remat_policy="dots"):
    """The jaxpr of the tiny model's forward pass traced for `platform` on abstract shapes (nothing
    runs: a CPU host traces the program of a TPU or GPU)."""
    from finetune_helpers import TINY_MODEL

    from optiml_jax.config import OPTConfig
    from optiml_jax.model import OPTForCausalLM

    model = OPTForCausalLM(OPTConfig(**TINY_MODEL), dtype=dtype, platform=platform, remat_policy=remat_policy)
    ids = jax.ShapeDtypeStruct((2, 128), jnp.int32)
    params = jax.eval_shape(lambda ids: model.init(jax.random.PRNGKey(0), ids), ids)
    return str(jax.jit(lambda params, ids: model.apply(params, ids)).trace(params, ids).jaxpr)


def test_a_cpu_host_traces_the_kernel_of_the_target_platform(monkeypatch):
    from jax._src.cudnn import fused_attention_stablehlo

    from optiml_jax.model import attention as module

    tpu = _traced_forward("tpu")
    assert "pallas_call" in tpu and "dot_product_attention_fwd" not in tpu
    assert any(choice[:2] == ("auto", "splash") for choice in module._logged_choices)
    # jax asks the installed cuDNN for its version while tracing; a CPU host has none (a GPU host's
    # jax CUDA plugin answers), so a version stands in for it here
    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 90800)
    gpu = _traced_forward("gpu")
    assert "dot_product_attention_fwd" in gpu and "pallas_call" not in gpu
    assert any(choice[:2] == ("auto", "cudnn") for choice in module._logged_choices)
    here = _traced_forward(None)  # the running backend: this CPU
    assert "pallas_call" not in here and "dot_product_attention_fwd" not in here
    assert "attention_log_sum_exp" in here  # blockwise's named state, which remat "dots" keeps


def test_remat_and_memory_ask_the_kernel_that_runs():
    from optiml_jax.model.attention import resolve_attention
    from optiml_jax.model.kernels import KERNELS, AttentionShapes
    from optiml_jax.model.remat import REMAT_POLICIES
    from optiml_jax.train.memory import estimate_training_memory

    shapes = AttentionShapes(length=2048, head_dim=128, heads=16)
    splash, _ = resolve_attention("auto", "tpu", "bfloat16", shapes)
    blockwise, _ = resolve_attention("auto", "cpu", "bfloat16", shapes)
    assert (splash, blockwise) == (KERNELS["splash"], KERNELS["blockwise"])
    # "dots" keeps what the kernel names: blockwise its output and log-sum-exp, splash nothing of its own
    assert blockwise.saved_names == ("attention_out", "attention_log_sum_exp") and splash.saved_names == ()
    assert REMAT_POLICIES["dots"](splash.saved_names) is not None
    # a flash kernel keeps a log-sum-exp per head, not blockwise's [length x length] mask per row
    assert splash.saved_bytes_per_token(shapes, np.dtype("float32")) < blockwise.saved_bytes_per_token(
        shapes, np.dtype("float32")
    )

    from optiml_jax.config import OPTConfig

    config = OPTConfig.from_preset("1.3b")
    estimate = lambda platform, policy: estimate_training_memory(
        config,
        mesh_shape={"data": 1, "fsdp": 1, "tensor": 1},
        global_batch=4,
        seq_len=2048,
        remat_policy=policy,
        compute_dtype="bfloat16",
        platform=platform,
    )
    for policy in ("none", "dots"):
        on_tpu, on_cpu = estimate("tpu", policy), estimate("cpu", policy)
        assert on_tpu.activations < on_cpu.activations, policy
        assert "attention=splash" in on_tpu.table() and "attention=blockwise" in on_cpu.table()


def test_every_kernel_module_is_a_listed_kernel_and_the_model_takes_its_platform():
    """A kernel is one module of model/kernels/ with a SPEC: found by name, listed for configs and
    CLIs, asked by auto (the fallback last); a run's model is built for the platform it is given."""
    import pkgutil

    from finetune_helpers import TINY_MODEL

    from optiml_jax.config import OPTConfig
    from optiml_jax.model import kernels
    from optiml_jax.run_config import TrainSection
    from optiml_jax.train import build_model

    modules = {info.name for info in pkgutil.iter_modules(kernels.__path__)} - {"base"}
    assert set(kernels.KERNELS) == modules and set(kernels.IMPLEMENTATIONS) == {"auto", *modules}
    assert list(kernels.KERNELS)[-1] == kernels.FALLBACK.name == "blockwise"
    train = TrainSection(attention="cudnn", compute_dtype="bfloat16", attention_dropout=0.0)
    assert build_model(OPTConfig(**TINY_MODEL), train, platform="gpu").platform == "gpu"
