"""The shared layers against torch's built-ins and their own contracts: the convolution,
transposed convolution and GroupNorm twins (both of `Conv2d`'s forms), GELU's hand-written
derivative, stochastic depth and dropout's draw."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import bridge
import jax_models
import torch_reference.layers
from jax_models import layers, xla_flags
from parity_tests import harness
from parity_tests.cases import SMALL
from twin_models.presets import get_preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def nhwc(a):
    return jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))


def nchw(a):
    return np.asarray(a).transpose(0, 3, 1, 2)


# --- convolutions and GroupNorm (the U-Net's) -----------------------------------------------------


def check_layer(tm, fm, x, grads):
    """A torch layer against its Flax twin on NCHW `x` under a random cotangent: the forward, the
    input's gradient and, per `grads` entry {flax param: (torch param, to flax layout)}, its gradient."""
    variables = bridge.torch_to_flax(tm.state_dict(), fm, nhwc(x))
    xt = torch.from_numpy(x).requires_grad_()
    yt = tm(xt)
    w = np.random.RandomState(1).standard_normal(yt.shape).astype(np.float32)
    (yt * torch.from_numpy(w)).sum().backward()
    f = lambda v, x: jnp.sum(fm.apply(v, x) * nhwc(w))
    gv, gx = jax.grad(f, argnums=(0, 1))(variables, nhwc(x))
    assert harness.rel_err(yt.detach().numpy(), nchw(fm.apply(variables, nhwc(x)))) <= harness.FORWARD_TOL
    assert harness.rel_err(xt.grad.numpy(), nchw(gx)) <= harness.GRAD_TOL
    for name, (param, layout) in grads.items():
        err = harness.rel_err(layout(param.grad.numpy()), gv["params"][name])
        assert err <= harness.GRAD_TOL, f"gradient of {name}: rel err {err:.2e}"


same = lambda a: a


@pytest.mark.parametrize("k, s, p, op", [(2, 2, 0, 0), (3, 3, 0, 0), (3, 2, 1, 1), (4, 2, 1, 0), (3, 1, 1, 0), (3, 3, 2, 2)])
def test_conv_transpose_forward_and_gradients(k, s, p, op):
    torch.manual_seed(0)
    tm = torch.nn.ConvTranspose2d(6, 5, k, stride=s, padding=p, output_padding=op)
    x = np.random.RandomState(0).standard_normal((2, 6, 5, 7)).astype(np.float32)
    check_layer(tm, layers.ConvTranspose2d(6, 5, k, s, p, op), x,
                {"weight": (tm.weight, same), "bias": (tm.bias, same)})


@pytest.mark.parametrize("size", [2, 9], ids=["matmul", "xla-conv"])  # 4 / 81 pixels
@pytest.mark.parametrize("k, s, p", [(3, 1, 1), (3, 2, 1), (1, 1, 0), (4, 2, 1)])
def test_conv2d_forward_and_gradients(k, s, p, size):
    """Both of `Conv2d`'s forms, the patch matmul (small inputs) and XLA's conv, against torch."""
    torch.manual_seed(0)
    tm = torch.nn.Conv2d(6, 5, k, stride=s, padding=p)
    x = np.random.RandomState(0).standard_normal((2, 6, size, size)).astype(np.float32)
    check_layer(tm, layers.Conv2d(5, k, s, p), x,
                {"kernel": (tm.weight, lambda g: g.transpose(2, 3, 1, 0)), "bias": (tm.bias, same)})


def test_matmul_conv_pixels_switches_the_form_while_tracing_only():
    """Inside `matmul_conv_pixels(256)` a 16x16 conv traces as the patch matmul (no convolution in
    the program) with the same result; the threshold is restored after the block, even on error."""
    conv = layers.Conv2d(5, 3, 1, 1)
    x = jnp.asarray(np.random.RandomState(0).standard_normal((2, 16, 16, 6)), jnp.float32)
    v = conv.init(jax.random.key(0), x)
    hlo = lambda: jax.jit(conv.apply).lower(v, x).as_text()  # noqa: E731
    assert "convolution" in hlo()
    with layers.matmul_conv_pixels(256):
        assert "convolution" not in hlo()
        y = conv.apply(v, x)
    assert harness.rel_err(np.asarray(conv.apply(v, x)), np.asarray(y)) <= harness.FORWARD_TOL
    with pytest.raises(RuntimeError), layers.matmul_conv_pixels(256):
        raise RuntimeError
    assert layers.MATMUL_CONV_PIXELS == 4 and "convolution" in hlo()


def test_conv2d_initializes_as_flax_conv():
    import flax.linen as nn
    x = jnp.ones((1, 4, 4, 3))
    ours = layers.Conv2d(8, 3, 1, 1).init(jax.random.key(0), x)
    flax_conv = nn.Conv(8, (3, 3), padding=1, kernel_init=layers.torch_linear_init).init(jax.random.key(0), x)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool((a == b).all()), ours, flax_conv))


def test_group_norm_forward_and_gradients():
    """An offset of 100 on a unit signal is where E[x^2] - E[x]^2 without a shift fails."""
    torch.manual_seed(0)
    tm = torch.nn.GroupNorm(8, 32)
    torch.nn.init.normal_(tm.weight)
    torch.nn.init.normal_(tm.bias)
    x = (100 + np.random.RandomState(0).standard_normal((3, 32, 6, 5))).astype(np.float32)
    check_layer(tm, layers.GroupNorm(8), x, {"scale": (tm.weight, same), "bias": (tm.bias, same)})


@pytest.mark.parametrize("offset, outlier", [(1e4, 0.0), (0.0, 300.0), (100.0, 300.0)],
                         ids=["offset-1e4", "outlier-300", "both"])
def test_group_norm_one_pass_statistics_hold_against_float64(offset, outlier):
    """The one-pass statistics' shift (a group's mean over 16 spaced pixels) keeps the error at
    float32 round-off when the mean is 1e4 standard deviations out, and when the first pixel is a
    300-sigma outlier (a shift by that pixel alone: rel err 3.5e-5, over the tolerance)."""
    x = (offset + np.random.RandomState(0).standard_normal((3, 32, 16, 16))).astype(np.float32)
    x[:, :, 0, 0] += outlier
    ref = torch.nn.functional.group_norm(torch.from_numpy(x).double(), 8, eps=layers.GN_EPS).numpy()
    fm = layers.GroupNorm(8)
    y = fm.apply(fm.init(jax.random.key(0), nhwc(x)), nhwc(x))
    assert harness.rel_err(ref, nchw(y)) <= harness.FORWARD_TOL


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gelu_derivative_matches_torch(dtype):
    """`layers.gelu` carries its own derivative (XLA:CPU runs it faster than JAX's); it must
    stay torch's exact-GELU derivative, tails included."""
    x = np.linspace(-12, 12, 20001).astype(dtype)
    with jax.enable_x64(dtype == "float64"):
        y, vjp = jax.vjp(layers.gelu, jnp.asarray(x))
        (got,) = vjp(jnp.ones_like(y))
        assert got.dtype == np.dtype(dtype)
    tx = torch.tensor(x, requires_grad=True)
    torch.nn.functional.gelu(tx).sum().backward()
    assert harness.rel_err(torch.nn.functional.gelu(tx).detach().numpy(), y) <= harness.FORWARD_TOL
    assert harness.rel_err(tx.grad.numpy(), got) <= (1e-6 if dtype == "float32" else 1e-14)


def test_drop_path_only_in_training_and_per_sample():
    p = 0.3
    x = np.ones((4000, 5, 2), np.float32)
    dp = jax_models.layers.DropPath(p)
    np.testing.assert_array_equal(dp.apply({}, jnp.asarray(x)), x)
    f = np.asarray(dp.apply({}, jnp.asarray(x), train=True, rngs={"dropout": jax.random.key(0)}))
    tdp = torch_reference.layers.DropPath(p)
    np.testing.assert_array_equal(tdp.eval()(torch.from_numpy(x)).numpy(), x)
    t = tdp.train()(torch.from_numpy(x)).numpy()
    sigma = np.sqrt(p * (1 - p) / len(x))
    for out in (f, t):
        assert np.all(out == out[:, :1, :1])  # whole samples are kept or dropped
        assert set(np.unique(out)) == {0.0, np.float32(1 / (1 - p))}
        assert abs(np.mean(out[:, 0, 0] == 0) - p) < 5 * sigma
    with pytest.raises(Exception, match="dropout"):
        dp.apply({}, jnp.asarray(x), train=True)


@pytest.mark.parametrize("shape", [(), (7,), (2, 1, 3), (16, 4, 33, 33), (1, 3, 7, 5, 7, 90)])
@pytest.mark.parametrize("key", ["typed", "raw", "folded", "rbg"])
def test_bernoulli_draws_the_bits_of_jax_random(shape, key):
    """The unrolled threefry gives jax.random.bernoulli's masks bit for bit (so dropout, and every
    training run, is what it was), and other key kinds go to JAX's own draw."""
    k = {"typed": lambda: jax.random.key(3), "raw": lambda: jax.random.PRNGKey(3),
         "folded": lambda: jax.random.fold_in(jax.random.key(9), 5),
         "rbg": lambda: jax.random.key(3, impl="rbg")}[key]()
    for p in (0.9, 0.5, 0.1):
        want = jax.jit(lambda k: jax.random.bernoulli(k, p, shape))(k)
        got = jax.jit(lambda k: layers.bernoulli(k, p, shape))(k)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


def test_bernoulli_unrolls_only_masks_that_pay_for_it():
    """Large masks skip JAX's threefry primitive (its rolled loop on CPU); small ones keep it (the
    unrolled rounds once sent LLVM's vectorizer into a 20-minute compile)."""
    big = (2, layers.UNROLLED_MIN_SIZE // 2)
    assert "random_bits" not in str(jax.make_jaxpr(lambda k: layers.bernoulli(k, 0.9, big))(jax.random.key(0)))
    assert "random_bits" in str(jax.make_jaxpr(lambda k: layers.bernoulli(k, 0.9, (128, 1, 1)))(jax.random.key(0)))


def test_dropout_gives_flax_dropout_s_outputs():
    """`layers.Dropout` keeps flax's fields, auto-names ("Dropout_0") and rng stream: same outputs."""
    import flax.linen as nn

    class Net(nn.Module):
        drop: type

        @nn.compact
        def __call__(self, x, train):
            x = self.drop(0.3)(x, deterministic=not train)
            x = self.drop(0.5, broadcast_dims=(-1,))(x, deterministic=not train)
            return self.drop(1.0)(x, deterministic=not train) + self.drop(0.0)(x, deterministic=not train)

    x = jnp.arange(1.0, 66561.0).reshape(4, 128, 130)        # over UNROLLED_MIN_SIZE
    ours, flax_s = Net(layers.Dropout), Net(nn.Dropout)
    for train in (False, True):
        got = ours.apply({}, x, train, rngs={"dropout": jax.random.key(1)})
        np.testing.assert_array_equal(got, flax_s.apply({}, x, train, rngs={"dropout": jax.random.key(1)}))
        assert (np.asarray(got) == 0).any() == train
    with pytest.raises(Exception, match="dropout"):
        ours.apply({}, x, True)


def test_a_training_loss_with_dropout_is_unchanged_by_the_unrolled_threefry(monkeypatch):
    """A vit-tiny-digits loss and gradient in training mode (dropout 0.1 in attention, MLP and
    embedding; at batch 128 each mask is over `UNROLLED_MIN_SIZE`) are the same through
    `layers.bernoulli` as through `jax.random.bernoulli`. Not to the bit: the two programs fuse the
    LayerNorms' reductions differently (1 ulp in the loss); one other dropout key moves the loss
    by 1e-3 and more, so the masks are the same."""
    model = jax_models.create_model("vit-tiny-digits")
    x = jnp.asarray(np.random.default_rng(0).random((128, 32, 32, 1), np.float32))
    variables = model.init(jax.random.key(0), x)

    def loss(params, key=jax.random.key(2)):
        out = model.apply({**variables, "params": params}, x, train=True, rngs={"dropout": key})
        return jnp.sum(out ** 2)

    fast = jax.jit(jax.value_and_grad(loss))(variables["params"])
    other = jax.jit(loss)(variables["params"], jax.random.key(3))
    monkeypatch.setattr(layers, "bernoulli", jax.random.bernoulli)
    slow = jax.jit(jax.value_and_grad(loss))(variables["params"])
    assert abs(float(fast[0]) - float(slow[0])) <= 1e-6 * abs(float(slow[0]))
    assert abs(float(other) - float(slow[0])) >= 1e-3 * abs(float(slow[0]))
    for a, b in zip(jax.tree.leaves(fast[1]), jax.tree.leaves(slow[1])):
        assert harness.rel_err(np.asarray(b), np.asarray(a)) <= 1e-5


@pytest.mark.parametrize("with_mask", [False, True], ids=["lengths", "mask"])
def test_fused_attention_padded_for_cudnn_gives_the_unpadded_result(with_mask):
    """cuDNN refuses 197 tokens; `_fused_attend` pads q, k, v to a multiple of 16 and masks the
    padded keys (by key lengths, or in the mask): the result is the unpadded one. Checked here on
    XLA's kernel, which takes any length."""
    rs = np.random.RandomState(0)
    q, k, v = (jnp.asarray(rs.standard_normal((2, 3, 197, 8)), jnp.float32) for _ in range(3))
    mask = jnp.asarray(rs.rand(197, 197) > 0.3) | jnp.eye(197, dtype=bool) if with_mask else None
    ref = layers.attend(q, k, v, 8 ** -0.5, mask=mask)
    got = layers._fused_attend(q, k, v, 8 ** -0.5, None, mask, None, pad_to=16)
    assert got.shape == ref.shape
    assert harness.rel_err(ref, got) <= 1e-6


def test_inference_compiler_options_give_reductions_to_ynnpack_unless_the_user_says_otherwise(monkeypatch):
    """On CPU an inference program compiled with `inference_compiler_options()` runs GroupNorm's
    sums as a YNNPACK fusion (XLA's own loop without them) with the same result; a user's own
    YNNPACK flag in `XLA_FLAGS` turns the options off."""
    fm = layers.GroupNorm(8)
    x = jnp.asarray(np.random.RandomState(0).standard_normal((4, 16, 16, 32)), jnp.float32)
    v = fm.init(jax.random.key(0), x)
    options = xla_flags.inference_compiler_options()
    assert options == xla_flags.INFERENCE_OPTIONS
    plain = jax.jit(fm.apply).lower(v, x).compile()
    ynn = jax.jit(fm.apply, compiler_options=options).lower(v, x).compile()
    fusions = lambda c: [l for l in c.as_text().splitlines() if "__ynn_fusion" in l]  # noqa: E731
    assert not fusions(plain) and fusions(ynn)
    assert harness.rel_err(np.asarray(plain(v, x)), np.asarray(ynn(v, x))) <= harness.FORWARD_TOL
    mine = f"--{xla_flags.YNN_FLAG}=individual_dot,individual_convolution"
    monkeypatch.setenv("XLA_FLAGS", f"{os.environ.get('XLA_FLAGS', '')} {mine}")
    assert xla_flags.inference_compiler_options() is None


def test_train_compiler_options_let_ynnpack_fuse_the_elementwise_work_into_the_dots(monkeypatch):
    """`train_compiler_options(True)` (the recipe's `cpu_dot_fusion`): an MLP's backward compiles
    with GELU's derivative inside YNNPACK's dot fusions (with `CPU_FLAGS` alone each holds a dot and
    nothing else), to the same result; off by default, when the user sets the flag and on one thread."""
    import re
    mlp = layers.Mlp(32, 128)
    x = jnp.asarray(np.random.RandomState(0).standard_normal((8, 16, 32)), jnp.float32)
    v = mlp.init(jax.random.key(0), x)
    grad = jax.grad(lambda v, x: jnp.sum(mlp.apply(v, x) ** 2))
    if xla_flags.xla_cpu_threads() < 2:
        pytest.skip("one CPU: the options apply with several XLA threads")
    options = xla_flags.train_compiler_options(True)
    assert options == xla_flags.DOT_FUSION_OPTIONS and xla_flags.train_compiler_options() is None

    def ynn_bodies(compiled):
        text = compiled.as_text()
        names = re.findall(r"calls=%([\w.]+)[^\n]*__ynn_fusion", text)
        bodies = {n: re.search(rf"^%{re.escape(n)} .*?^}}", text, re.S | re.M).group(0) for n in names}
        ops = lambda b: set(re.findall(r"= \S+ (\w[\w-]*)\(", b)) - {"parameter", "bitcast", "dot", "transpose"}  # noqa: E731
        return {n: ops(b) for n, b in bodies.items()}
    plain = jax.jit(grad, compiler_options={xla_flags.YNN_FLAG: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}).lower(v, x).compile()
    fused = jax.jit(grad, compiler_options=options).lower(v, x).compile()
    assert ynn_bodies(plain) and not any(ynn_bodies(plain).values())
    assert {"erf", "exponential", "multiply"} <= set().union(*ynn_bodies(fused).values())
    ref, out = jax.tree_util.tree_leaves(plain(v, x)), jax.tree_util.tree_leaves(fused(v, x))
    assert max(harness.rel_err(np.asarray(a), np.asarray(b)) for a, b in zip(ref, out)) <= harness.FORWARD_TOL
    monkeypatch.setenv("XLA_FLAGS", f"{os.environ.get('XLA_FLAGS', '')} --{xla_flags.YNN_FLAG}=individual_dot,individual_convolution")
    assert xla_flags.train_compiler_options(True) is None
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    assert xla_flags.xla_cpu_threads() == 1 and xla_flags.train_compiler_options(True) is None


def test_parity_compiler_options_give_dots_to_xla_which_rounds_less_than_ynnpack(monkeypatch):
    """A parity measurement's dot (`parity_compiler_options()`) is XLA's own, not a YNNPACK fusion
    as under `CPU_FLAGS`, and lands closer to float64: ViT-B's MLP output projection at batch 2,
    1.5e-6 with YNNPACK, 2.6e-7 without (torch 3.5e-7) on an AVX2 AMD EPYC; 7.0e-7 and 3.8e-7
    (torch 3.3e-7) on an AVX-512 one (Zen 4), whose YNNPACK kernel rounds less. A user's own
    YNNPACK flag turns it off."""
    rs = np.random.RandomState(0)
    a = rs.standard_normal((394, 3072)).astype(np.float32)
    b = (rs.standard_normal((3072, 768)) / 55).astype(np.float32)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    options = xla_flags.parity_compiler_options()
    assert options == xla_flags.PARITY_OPTIONS
    plain = jax.jit(jnp.dot).lower(a, b).compile()
    parity = jax.jit(jnp.dot, compiler_options=options).lower(a, b).compile()
    assert "__ynn_fusion" in plain.as_text() and "__ynn_fusion" not in parity.as_text()
    ynn_err, xla_err = harness.rel_err(exact, np.asarray(plain(a, b))), harness.rel_err(exact, np.asarray(parity(a, b)))
    torch_err = harness.rel_err(exact, (torch.from_numpy(a) @ torch.from_numpy(b)).numpy())
    assert xla_err <= 1.5 * torch_err and xla_err < ynn_err, (xla_err, torch_err, ynn_err)
    monkeypatch.setenv("XLA_FLAGS", f"{os.environ.get('XLA_FLAGS', '')} --{xla_flags.YNN_FLAG}=individual_dot,individual_convolution")
    assert xla_flags.parity_compiler_options() is None


@pytest.mark.parametrize("name", [p if p in ("vit-tiny-digits", "encoder-vit-digits") else
                                  pytest.param(p, marks=pytest.mark.slow) for p in SMALL])
def test_init_compiled_at_level_1_gives_the_same_weights(name, monkeypatch):
    """`init_variables` compiles `model.init` with `init_compiler_options()` (LLVM level 1, a
    third to a half of the compile time): the same bits as XLA's default level (3). A user's own
    level in `XLA_FLAGS` turns the options off."""
    from train.tasks import get_task

    preset = get_preset(name)
    task = get_task(preset)
    model, args = task.jax_training.model(preset), task.jax_training.init_args(preset)
    init = lambda level: jax.jit(lambda k: model.init(k, *args),  # noqa: E731
                                 compiler_options={"xla_backend_optimization_level": level})(jax.random.key(3))
    a = jax.tree_util.tree_leaves_with_path(init(xla_flags.INIT_OPTIONS["xla_backend_optimization_level"]))
    b = jax.tree_util.tree_leaves_with_path(init("3"))
    assert [p for p, _ in a] == [p for p, _ in b]
    differ = [jax.tree_util.keystr(p) for (p, x), (_, y) in zip(a, b) if not np.array_equal(x, y)]
    assert not differ, f"{name}: init at level 1 differs from the default in {differ[:5]}"
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_backend_optimization_level" not in f]
    monkeypatch.setenv("XLA_FLAGS", " ".join(flags))
    assert xla_flags.init_compiler_options() == xla_flags.INIT_OPTIONS
    monkeypatch.setenv("XLA_FLAGS", " ".join([*flags, "--xla_backend_optimization_level=2"]))
    assert xla_flags.init_compiler_options() is None


def test_xla_flags_take_convolutions_off_ynnpack_unless_the_user_says_otherwise(monkeypatch):
    """`jax_models.apply_cpu_flags()` (what the CLIs call) adds `xla_flags.CPU_FLAGS` before JAX
    starts: a 3x3 conv then compiles to XLA's own convolution, not a YNNPACK fusion; a user's own
    setting of the flag is kept. Importing `jax_models` alone leaves XLA's default (YNNPACK)."""
    code = ("import sys, jax_models, jax, jax.numpy as jnp\n"
            "sys.argv[1:] == ['apply'] and jax_models.apply_cpu_flags()\n"
            "f = jax.jit(lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), 'SAME', "
            "dimension_numbers=('NHWC', 'HWIO', 'NHWC')))\n"
            "print('ynn' in f.lower(jnp.ones((4, 16, 16, 32)), jnp.ones((3, 3, 32, 32))).compile().as_text())")
    mine = "--xla_cpu_experimental_ynn_fusion_type=individual_dot,individual_convolution"
    one_thread = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"  # XLA reads no flag after its 2nd word
    out = {}
    for flags, call in (("", "apply"), (mine, "apply"), ("", "import only"), (one_thread, "apply")):
        env = {**os.environ, "XLA_FLAGS": flags, "PYTHONPATH": ROOT}
        r = subprocess.run([sys.executable, "-c", code, call], env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        out[flags, call] = r.stdout.split()[-1]
    assert out == {("", "apply"): "False", (mine, "apply"): "True", ("", "import only"): "True",
                   (one_thread, "apply"): "False"}

    monkeypatch.setattr(xla_flags, "_backend_started", lambda: False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    assert xla_flags.apply_cpu_flags() == list(xla_flags.CPU_FLAGS)
    assert os.environ["XLA_FLAGS"].split() == [*xla_flags.CPU_FLAGS, "--xla_force_host_platform_device_count=2"]
    assert xla_flags.apply_cpu_flags() == []
    monkeypatch.setenv("XLA_FLAGS", mine)
    assert xla_flags.apply_cpu_flags() == [] and os.environ["XLA_FLAGS"] == mine
    monkeypatch.setattr(xla_flags, "_backend_started", lambda: True)
    monkeypatch.setenv("XLA_FLAGS", "")
    assert xla_flags.apply_cpu_flags() == [] and os.environ["XLA_FLAGS"] == ""


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_layer_norm_matches_flax_and_torch_with_its_written_out_backward(dtype):
    """`layers.LayerNorm` has flax's params and auto-name; its output and the gradients of x,
    scale and bias are torch's `nn.LayerNorm`'s, also where the mean is large against the spread."""
    import flax.linen as nn

    rs = np.random.RandomState(0)
    x = (rs.randn(3, 5, 48) * 2 + 50).astype(dtype)
    g = rs.randn(*x.shape).astype(dtype)
    scale, bias = (1 + 0.1 * rs.randn(48)).astype(dtype), (0.1 * rs.randn(48)).astype(dtype)
    with jax.enable_x64(dtype == "float64"):
        ours = layers.LayerNorm()
        variables = ours.init(jax.random.key(0), jnp.asarray(x))
        assert jax.tree.structure(variables) == jax.tree.structure(nn.LayerNorm().init(jax.random.key(0), jnp.asarray(x)))
        assert set(nn.Sequential([layers.LayerNorm()]).init(jax.random.key(0), jnp.asarray(x))["params"]) == {"layers_0"}
        params = {"params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}}
        y, pull = jax.vjp(ours.apply, params, jnp.asarray(x))
        dp, dx = pull(jnp.asarray(g))
        assert y.dtype == np.dtype(dtype) and dx.dtype == np.dtype(dtype)
    ref = torch.nn.LayerNorm(48, eps=layers.LN_EPS).to(getattr(torch, dtype))
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(scale))
        ref.bias.copy_(torch.from_numpy(bias))
    xt = torch.from_numpy(x).requires_grad_(True)
    yt = ref(xt)
    yt.backward(torch.from_numpy(g))
    tol = (harness.FORWARD_TOL, 1e-5) if dtype == "float32" else (1e-13, 1e-12)
    assert harness.rel_err(yt.detach().numpy(), y) <= tol[0]
    for theirs, got in [(xt.grad, dx), (ref.weight.grad, dp["params"]["scale"]), (ref.bias.grad, dp["params"]["bias"])]:
        assert harness.rel_err(theirs.numpy(), got) <= tol[1]
