"""Layers shared by the Flax models: one patch embedding, one attention, one MLP, and the twins of
the torch built-ins the models use (`nn.MultiheadAttention`, `nn.TransformerEncoder(Layer)`,
`nn.GroupNorm`, `nn.Conv2d`, `nn.ConvTranspose2d`), and `Dropout`, flax's with its masks drawn
through an unrolled Threefry (`bernoulli`: the same bits, cheaper on CPU).

Twins of `torch_reference/layers.py`. Submodule names follow the torch attribute names, and the
children of a torch `nn.Sequential` are named by their index ('0', '3'), so the bridge maps keys
both ways by rule.
"""

from __future__ import annotations

import contextlib

import math
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from twin_models.presets import ATTENTION_IMPLS  # noqa: F401  (re-exported: layers.ATTENTION_IMPLS)

# torch's default initializers, so that a model trained from scratch starts as its twin would.
torch_linear_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
trunc_normal_02 = nn.initializers.truncated_normal(stddev=0.02)


def torch_bias_init(fan_in: int):
    """`nn.Linear`'s bias init: uniform in +-1/sqrt(fan_in)."""
    bound = fan_in ** -0.5
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)
LN_EPS = 1e-5  # torch's LayerNorm default; flax's is 1e-6


@jax.custom_vjp
def gelu(x):
    """Exact (erf) GELU, torch's default; flax's `nn.gelu` defaults to the tanh approximation.

    The derivative Phi(x) + x phi(x) is written out: the one JAX derives from the erf form makes
    XLA:CPU's MLP backward up to 2x slower (benchmarks/PROFILE_NOTES.md, "GELU's derivative")."""
    return nn.gelu(x, approximate=False)


def _gelu_fwd(x):
    return nn.gelu(x, approximate=False), x


def _gelu_bwd(x, g):
    cdf = 0.5 * (1.0 + jax.lax.erf(x * 0.5 ** 0.5))
    pdf = jnp.exp(-0.5 * x * x) * (2 * math.pi) ** -0.5
    return (g * (cdf + x * pdf),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


def quick_gelu(x):
    """x * sigmoid(1.702 x): the GELU approximation of OpenAI's CLIP (`act="quick_gelu"`)."""
    return x * jax.nn.sigmoid(1.702 * x)


class QuickGELU(nn.Module):
    """Twin of torch's `layers.QuickGELU` (the models call `quick_gelu` through `activation`)."""

    def __call__(self, x):
        return quick_gelu(x)


ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu")


def activation(act: str):
    """The activation function named `act`: "gelu" (exact, erf; torch's default), "gelu_tanh"
    (tanh approximation) or "quick_gelu"."""
    if act not in ACTIVATIONS:
        raise ValueError(f"activation {act!r} is not one of {ACTIVATIONS}")
    return {"gelu": gelu, "gelu_tanh": partial(nn.gelu, approximate=True), "quick_gelu": quick_gelu}[act]


def check_images(x: jax.Array, image_size: int, in_channels: int, owner: str) -> None:
    """Raise a ValueError naming what `owner` expects when `x` is not (B, H, W, C) floats."""
    expected = f"(B, {image_size}, {image_size}, {in_channels}) floating-point images (NHWC)"
    if x.ndim != 4:
        raise ValueError(f"{owner} expects {expected}; got a rank-{x.ndim} array of shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{owner} expects {expected}; got dtype {x.dtype}")
    if tuple(x.shape[1:]) != (image_size, image_size, in_channels):
        hint = " (NCHW input? Flax models take NHWC)" if x.shape[1] == in_channels else ""
        raise ValueError(f"{owner} expects {expected}; got shape {tuple(x.shape)}{hint}")
    if x.shape[0] == 0:
        raise ValueError(f"{owner} expects {expected}; got an empty batch")


def check_feature_map(x: jax.Array, in_channels: int, multiple: int, owner: str) -> None:
    """Raise a ValueError unless `x` is (B > 0, H, W, in_channels) floats with H and W multiples of
    `multiple` (a U-Net that halves the resolution log2(multiple) times)."""
    expected = (f"(B, H, W, {in_channels}) floating-point images (NHWC) with H and W multiples "
                f"of {multiple}")
    if x.ndim != 4:
        raise ValueError(f"{owner} expects {expected}; got a rank-{x.ndim} array of shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{owner} expects {expected}; got dtype {x.dtype}")
    if x.shape[-1] != in_channels or x.shape[1] % multiple or x.shape[2] % multiple:
        hint = " (NCHW input? Flax models take NHWC)" if x.shape[1] == in_channels else ""
        raise ValueError(f"{owner} expects {expected}; got shape {tuple(x.shape)}{hint}")
    if x.shape[0] == 0:
        raise ValueError(f"{owner} expects {expected}; got an empty batch")


def check_token_ids(ids, vocab_size: int, owner: str) -> None:
    """Raise a ValueError unless every id lies in [0, vocab_size) (checked where the ids are
    concrete; inside a traced function they cannot be read)."""
    if isinstance(ids, jax.core.Tracer) or not ids.size:
        return
    host = np.asarray(ids)
    lo, hi = int(host.min()), int(host.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{owner} expects token ids in [0, {vocab_size - 1}] (vocab_size {vocab_size}); "
                         f"got ids {lo}..{hi}")


def check_timesteps(t, batch: int, owner: str) -> None:
    """Raise a ValueError unless `t` holds one timestep per image, shape (batch,)."""
    shape = tuple(getattr(t, "shape", ()))
    if shape != (batch,):
        raise ValueError(f"{owner} expects one timestep per image, shape ({batch},); got "
                         f"{'a ' + type(t).__name__ if not shape else 'shape ' + str(shape)}")


def add_class_token(x, cls_token, pos_embed):
    """(B, N, D) patch tokens -> (B, 1 + N, D): the class token in front, then the position table
    added (the prologue of both ViTs)."""
    cls = jnp.broadcast_to(cls_token, (x.shape[0], 1, x.shape[-1]))
    return jnp.concatenate([cls, x], axis=1) + pos_embed


class _ConvThenFlatten(nn.Module):
    """The first source's `nn.Sequential(Conv2d, Rearrange)`: the conv is child '0'."""
    embed_dim: int
    patch_size: int
    bias: bool = True

    @nn.compact
    def __call__(self, x):
        p = self.patch_size
        x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", use_bias=self.bias,
                    kernel_init=torch_linear_init, name="0")(x)
        return x.reshape(x.shape[0], -1, x.shape[-1])


class PatchEmbedding(nn.Module):
    """Non-overlapping patches -> tokens: (B, H, W, C) -> (B, (H/p)*(W/p), embed_dim).

    `rearrange=True`: the first source's layout (`projection/0` is the conv); False: the second's.
    `bias=False`: a conv without bias (CLIP's, in open_clip and Hugging Face).
    """
    image_size: int = 224
    patch_size: int = 16
    in_channels: int = 3
    embed_dim: int = 768
    rearrange: bool = True
    bias: bool = True

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @nn.compact
    def __call__(self, x):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        check_images(x, self.image_size, self.in_channels, type(self).__name__)
        p = self.patch_size
        if self.rearrange:
            return _ConvThenFlatten(self.embed_dim, p, self.bias, name="projection")(x)
        x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", use_bias=self.bias,
                    kernel_init=torch_linear_init, name="projection")(x)
        return x.reshape(x.shape[0], -1, x.shape[-1])


def compute_dtype(dtype):
    """The dtype of softmax and norm statistics: float32 for bfloat16/float16, else `dtype` itself."""
    return jnp.promote_types(dtype, jnp.float32)


def attend(q, k, v, scale, bias=None, mask=None, dropout: Dropout | None = None, impl: str = "xla"):
    """softmax(q k^T * scale + bias) v over (..., N, D) heads; `mask` is True where attention is allowed.

    Logits and softmax are in `compute_dtype` (float32 for bfloat16 inputs), the result in v's dtype.
    `impl`: "xla" the explicit einsum-softmax; "fused" `jax.nn.dot_product_attention` (XLA picks
    the kernel); "cudnn" its cuDNN kernel (GPU, half precision). The fused ones take no attention
    dropout and keep float32 softmax, so with active dropout or float64 inputs "xla" runs instead.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl {impl!r} is not one of {ATTENTION_IMPLS}")
    drops = dropout is not None and dropout.rate > 0 and not dropout.deterministic
    if impl != "xla" and not drops and q.dtype != jnp.float64:
        return _fused_attend(q, k, v, scale, bias, mask, None if impl == "fused" else impl)
    attn = jnp.matmul(q, jnp.swapaxes(k, -2, -1), preferred_element_type=compute_dtype(q.dtype)) * scale
    if bias is not None:
        attn = attn + bias
    if mask is not None:
        attn = jnp.where(mask, attn, jnp.finfo(attn.dtype).min)
    attn = jax.nn.softmax(attn, axis=-1)
    if dropout is not None:
        attn = dropout(attn)
    return attn.astype(v.dtype) @ v


CUDNN_SEQ_MULTIPLE = 16


def _fused_attend(q, k, v, scale, bias, mask, implementation, pad_to: int | None = None):
    """`attend` through `jax.nn.dot_product_attention`: the leading axes (B, *heads) of q, k, v,
    bias and mask fold into its (B, T, N, H) layout, heads (N) being all axes after the first.

    cuDNN's kernel refuses sequence lengths such as ViT's 197: with `pad_to` (default 16 for
    "cudnn") q, k and v are padded to a multiple of it, the padded keys masked out (by
    `key_value_seq_lengths`, or in the mask when there is one) and the padded rows dropped."""
    if pad_to is None:
        pad_to = CUDNN_SEQ_MULTIPLE if implementation == "cudnn" else 1
    T, S = q.shape[-2], k.shape[-2]
    Tp, Sp = -T % pad_to, -S % pad_to
    kv_lengths = None
    if Tp or Sp:
        rows = lambda t, n: jnp.pad(t, [(0, 0)] * (t.ndim - 2) + [(0, n), (0, 0)])  # noqa: E731
        q, k, v = rows(q, Tp), rows(k, Sp), rows(v, Sp)
        if bias is not None:
            bias = jnp.pad(bias, [(0, 0)] * (bias.ndim - 2) + [(0, Tp), (0, Sp)])
        if mask is not None:
            mask = jnp.pad(mask, [(0, 0)] * (mask.ndim - 2) + [(0, Tp), (0, Sp)], constant_values=True)
            mask = mask & (jnp.arange(S + Sp) < S)
        else:
            kv_lengths = jnp.full((q.shape[0],), S, jnp.int32)
    lead = q.shape[:-2]
    B, N = lead[0], math.prod(lead[1:])
    btnh = lambda t: t.reshape(B, N, *t.shape[-2:]).swapaxes(1, 2)

    def bnts(m):
        if m is None:
            return None
        m = m.reshape((1,) * (len(lead) + 2 - m.ndim) + m.shape)
        heads = m.shape[1:-2]
        if all(d == 1 for d in heads):
            return m.reshape(m.shape[0], 1, *m.shape[-2:])
        return jnp.broadcast_to(m, (m.shape[0], *lead[1:], *m.shape[-2:])).reshape(m.shape[0], N, *m.shape[-2:])

    out = jax.nn.dot_product_attention(btnh(q), btnh(k), btnh(v), bnts(bias), bnts(mask), scale=scale,
                                       implementation=implementation, key_value_seq_lengths=kv_lengths)
    return out.swapaxes(1, 2).reshape(*lead, q.shape[-2], v.shape[-1])[..., :T, :]


class Mlp(nn.Module):
    """Dense -> GELU -> Dropout -> Dense -> Dropout, children '0' and '3' as in torch's nn.Sequential;
    `dropout_layers=False`: Dense -> GELU -> Dense, children '0' and '2' (the second source's FFN).
    `act` names the activation (`activation`): exact GELU by default."""
    in_features: int
    hidden_features: int
    out_features: int | None = None
    dropout: float = 0.0
    dropout_layers: bool = True
    kernel_init: Any = torch_linear_init
    act: str = "gelu"

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.dropout and not self.dropout_layers:
            raise ValueError(f"dropout {self.dropout} needs dropout_layers=True")
        x = nn.Dense(self.hidden_features, kernel_init=self.kernel_init, name="0")(x)
        x = activation(self.act)(x)
        x = Dropout(self.dropout)(x, deterministic=not train)
        x = nn.Dense(self.out_features or self.in_features, kernel_init=self.kernel_init,
                     name="3" if self.dropout_layers else "2")(x)
        return Dropout(self.dropout)(x, deterministic=not train)


class MultiheadAttention(nn.Module):
    """Twin of `torch.nn.MultiheadAttention` (batch_first): `query`/`key`/`value` are the three
    slices of torch's fused `in_proj_weight`, `out_proj` the output. Returns (B, Nq, embed_dim).

    `key_padding_mask` (B, Nk) and a bool `attn_mask` (Nq, Nk) or (B, Nq, Nk) use torch's
    polarity: True where attention is *blocked*. `attention_impl` (Flax only): see `attend`.
    """
    embed_dim: int
    num_heads: int
    dropout: float = 0.0
    bias: bool = True
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, query, key, value, key_padding_mask=None, attn_mask=None, train: bool = False):
        E, H = self.embed_dim, self.num_heads
        if E % H:
            raise ValueError(f"embed_dim {E} is not divisible by num_heads {H}")
        dense = lambda name: nn.Dense(E, use_bias=self.bias, kernel_init=nn.initializers.xavier_uniform(),
                                      name=name)

        def heads(x):
            return x.reshape(*x.shape[:-1], H, E // H).swapaxes(-3, -2)

        q, k, v = heads(dense("query")(query)), heads(dense("key")(key)), heads(dense("value")(value))
        allowed = None
        if key_padding_mask is not None:
            allowed = ~key_padding_mask[:, None, None, :]
        if attn_mask is not None:
            m = ~attn_mask if attn_mask.ndim == 2 else ~attn_mask[:, None]
            allowed = m if allowed is None else allowed & m
        drop = Dropout(self.dropout, deterministic=not train)
        x = attend(q, k, v, (E // H) ** -0.5, mask=allowed, dropout=drop, impl=self.attention_impl)
        x = x.swapaxes(-3, -2).reshape(*x.shape[:-3], x.shape[-2], E)
        return nn.Dense(E, use_bias=self.bias, kernel_init=torch_linear_init, name="out_proj")(x)


class TransformerEncoderLayer(nn.Module):
    """Twin of `torch.nn.TransformerEncoderLayer` (batch_first, post-norm by default, ReLU);
    `attention_impl` is Flax only (see `attend`)."""
    d_model: int
    nhead: int
    dim_feedforward: int = 2048
    dropout: float = 0.1
    activation: str = "relu"
    layer_norm_eps: float = 1e-5
    norm_first: bool = False
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x, src_key_padding_mask=None, train: bool = False):
        act = {"relu": nn.relu, "gelu": gelu}[self.activation]
        drop = lambda: Dropout(self.dropout, deterministic=not train)
        self_attn = MultiheadAttention(self.d_model, self.nhead, self.dropout,
                                       attention_impl=self.attention_impl, name="self_attn")
        linear1 = nn.Dense(self.dim_feedforward, kernel_init=torch_linear_init, name="linear1")
        linear2 = nn.Dense(self.d_model, kernel_init=torch_linear_init, name="linear2")
        norm1 = LayerNorm(epsilon=self.layer_norm_eps, name="norm1")
        norm2 = LayerNorm(epsilon=self.layer_norm_eps, name="norm2")

        def sa_block(h):
            return drop()(self_attn(h, h, h, key_padding_mask=src_key_padding_mask, train=train))

        def ff_block(h):
            return drop()(linear2(drop()(act(linear1(h)))))

        if self.norm_first:
            x = x + sa_block(norm1(x))
            return x + ff_block(norm2(x))
        x = norm1(x + sa_block(x))
        return norm2(x + ff_block(x))


class TransformerEncoder(nn.Module):
    """Twin of `torch.nn.TransformerEncoder`: `layers_i` are independent copies of `encoder_layer`."""
    encoder_layer: TransformerEncoderLayer
    num_layers: int

    def setup(self):
        self.layers = [self.encoder_layer.clone(parent=None) for _ in range(self.num_layers)]

    def __call__(self, x, src_key_padding_mask=None, train: bool = False):
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=src_key_padding_mask, train=train)
        return x


_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry2x32(k0, k1, x0, x1):
    """The Threefry-2x32 block cipher (20 rounds) on uint32 arrays, unrolled: one elementwise
    fusion. JAX lowers its `threefry2x32` primitive on CPU as a loop of 5 trips that writes whole
    u32 arrays each trip; this gives the same words 4-5x faster there."""
    ks = (k0, k1, k0 ^ k1 ^ np.uint32(0x1BD11BDA))
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for i in range(5):
        for r in _THREEFRY_ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = x0 ^ ((x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r)))
        x0, x1 = x0 + ks[(i + 1) % 3], x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x0, x1


def _threefry_key_data(key):
    """(2,) uint32 of a threefry key (typed or raw) when `jax.random` would draw from it with the
    partitionable threefry (JAX's default), else None."""
    if not jax.config.jax_threefry_partitionable:
        return None
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape or str(jax.random.key_impl(key)) != "threefry2x32":
            return None
        return jax.random.key_data(key)
    if key.shape != (2,) or key.dtype != jnp.uint32 or jax.config.jax_default_prng_impl != "threefry2x32":
        return None
    return key


# Masks smaller than this take JAX's own draw: they cost nothing either way, and in one program
# (swin-digits' training step, whose DropPath masks are (128, 1, 1)) LLVM's loop vectorizer spent
# more than 20 minutes on the unrolled rounds (`isUniformAcrossVFsAndUFs`, recursing over them).
UNROLLED_MIN_SIZE = 2 ** 16


def bernoulli(key, p: float, shape):
    """`jax.random.bernoulli(key, p, shape)`, the same bits, through the unrolled threefry for a
    mask of at least `UNROLLED_MIN_SIZE` elements, float32 `p` and a threefry key (the trainer's);
    JAX's own draw otherwise. Dropout's masks are the bulk of a training step's random numbers."""
    shape = tuple(shape)
    data = _threefry_key_data(key)
    size = math.prod(shape)
    if data is None or jnp.result_type(float) != jnp.float32 or not UNROLLED_MIN_SIZE <= size < 2 ** 32:
        return jax.random.bernoulli(key, p, shape)
    counts = jax.lax.iota(jnp.uint32, size).reshape(shape)
    b0, b1 = _threefry2x32(data[0], data[1], jnp.zeros(shape, jnp.uint32), counts)
    mantissa = ((b0 ^ b1) >> np.uint32(9)) | np.uint32(0x3F800000)
    uniform = jax.lax.bitcast_convert_type(mantissa, jnp.float32) - np.float32(1.0)
    return jnp.maximum(np.float32(0.0), uniform) < np.float32(p)


class Dropout(nn.Module):
    """`flax.linen.Dropout` with the same fields, rng stream and masks (its auto-name is the same
    "Dropout_N"), drawing through `bernoulli`."""
    rate: float
    broadcast_dims: tuple = ()
    deterministic: bool | None = None
    rng_collection: str = "dropout"

    @nn.compact
    def __call__(self, inputs, deterministic: bool | None = None, rng=None):
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        if self.rate == 0.0 or deterministic:
            return inputs
        if self.rate == 1.0:
            return jnp.zeros_like(inputs)
        keep_prob = 1.0 - self.rate
        if rng is None:
            rng = self.make_rng(self.rng_collection)
        dims = {d % inputs.ndim for d in self.broadcast_dims}
        shape = [1 if d in dims else n for d, n in enumerate(inputs.shape)]
        mask = jnp.broadcast_to(bernoulli(rng, keep_prob, shape), inputs.shape)
        return jax.lax.select(mask, inputs / keep_prob, jnp.zeros_like(inputs))


class DropPath(nn.Module):
    """Stochastic depth: with `train=True` (and a 'dropout' rng), zero a whole sample's residual
    branch with probability `drop_prob` and scale the kept ones by 1/(1-drop_prob)."""
    drop_prob: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.drop_prob == 0.0 or not train:
            return x
        keep = 1.0 - self.drop_prob
        mask = bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return x * mask.astype(x.dtype) / keep


# ---------------------------------------------------------------------------------------------
# Layer norm: torch's LayerNorm over the last axis, with its backward written out


def _layer_stats(h, epsilon):
    """(normalized h, 1/std) over the last axis of h, in two passes (the mean, then the mean
    square of h less it), as torch does: no cancellation when the mean is large."""
    d = h - h.mean(-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.square(d).mean(-1, keepdims=True) + epsilon)
    return d * rstd, rstd


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def layer_normalize(h, epsilon):
    """h (..., C) normalized over its last axis. Its backward is written out, (g - mean(g) -
    y mean(g y)) / std: on XLA:CPU 1.1-1.9x faster than the derivative JAX takes through the
    statistics (docs/benchmarks.md)."""
    return _layer_stats(h, epsilon)[0]


def _layer_normalize_fwd(h, epsilon):
    y, rstd = _layer_stats(h, epsilon)
    return y, (y, rstd)


def _layer_normalize_bwd(epsilon, res, g):
    y, rstd = res
    return (rstd * (g - g.mean(-1, keepdims=True) - y * (g * y).mean(-1, keepdims=True)),)


layer_normalize.defvjp(_layer_normalize_fwd, _layer_normalize_bwd)


class LayerNorm(nn.Module):
    """Twin of `torch.nn.LayerNorm(C)` with flax's `nn.LayerNorm` params (`scale`, `bias`) and its
    auto-name: statistics over the last axis in `compute_dtype` (float32 for bfloat16 inputs)
    through `layer_normalize`, the result in the dtype of x, scale and bias, as flax's."""
    epsilon: float = LN_EPS

    @nn.compact
    def __call__(self, x):
        C = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (C,))
        bias = self.param("bias", nn.initializers.zeros, (C,))
        y = layer_normalize(x.astype(compute_dtype(x.dtype)), self.epsilon)
        return (y * scale + bias).astype(jnp.result_type(x, scale, bias))


# ---------------------------------------------------------------------------------------------
# Convolution and group norm (the U-Net's): torch's semantics on NHWC


GN_EPS = 1e-5  # torch's GroupNorm default; flax's is 1e-6


def _group_mean(sums, num_groups, n):
    """(B, C) sums per channel -> (B, 1, C): the mean over n values of each channel's group."""
    B, C = sums.shape
    k = C // num_groups
    return jnp.repeat(sums.reshape(B, num_groups, k).sum(-1), k, axis=-1)[:, None, :] / n


def _group_stats(h, num_groups, epsilon):
    """(normalized h, 1/std) of h (B, HW, C) in one pass over h: the sums of d and d^2, d = h less
    a shift per group (its mean over 16 evenly spaced pixels), so that E[d^2] - E[d]^2 does not
    cancel when the mean is large against the spread, as E[h^2] - E[h]^2 would (torch's Welford
    update solves the same problem). One read of h where two passes took two plus a write."""
    k = h.shape[2] // num_groups
    n = h.shape[1] * k
    pilot = h[:, ::max(1, h.shape[1] // 16)]
    d = h - _group_mean(pilot.sum(1), num_groups, pilot.shape[1] * k)
    m = _group_mean(d.sum(1), num_groups, n)
    var = jnp.maximum(_group_mean(jnp.square(d).sum(1), num_groups, n) - jnp.square(m), 0.0)
    rstd = jax.lax.rsqrt(var + epsilon)
    return (d - m) * rstd, rstd


@partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def group_normalize(h, num_groups, epsilon):
    """h (B, HW, C) normalized over each group of contiguous channels and HW. Its backward is
    written out, (g - mean(g) - y mean(g y)) / std per group: 1.4-1.75x faster on XLA:CPU than
    the derivative JAX takes through the statistics (measured with their earlier two-pass form)."""
    return _group_stats(h, num_groups, epsilon)[0]


def _group_normalize_fwd(h, num_groups, epsilon):
    y, rstd = _group_stats(h, num_groups, epsilon)
    return y, (y, rstd)


def _group_normalize_bwd(num_groups, epsilon, res, g):
    y, rstd = res
    n = y.shape[1] * (y.shape[2] // num_groups)
    return (rstd * (g - _group_mean(g.sum(1), num_groups, n)
                    - y * _group_mean((g * y).sum(1), num_groups, n)),)


group_normalize.defvjp(_group_normalize_fwd, _group_normalize_bwd)


class GroupNorm(nn.Module):
    """Twin of `torch.nn.GroupNorm` on NHWC (params `scale`, `bias`): statistics over each group of
    contiguous channels and the spatial axes (`group_normalize`). Each pass sums over the spatial
    axis with the channels minor, then over the channels of a group: on XLA:CPU that is 6x faster
    than one reduction over (spatial, channels in group). Computed in `compute_dtype` (float32
    for bfloat16 inputs), returned in the dtype of x, scale and bias."""
    num_groups: int
    epsilon: float = GN_EPS

    @nn.compact
    def __call__(self, x):
        C = x.shape[-1]
        if C % self.num_groups:
            raise ValueError(f"{C} channels do not split into {self.num_groups} groups")
        scale = self.param("scale", nn.initializers.ones, (C,))
        bias = self.param("bias", nn.initializers.zeros, (C,))
        h = x.reshape(x.shape[0], -1, C).astype(compute_dtype(x.dtype))
        y = group_normalize(h, self.num_groups, self.epsilon).reshape(x.shape)
        return (y * scale + bias).astype(jnp.result_type(x, scale, bias))


MATMUL_CONV_PIXELS = 4  # at or below this many input pixels (2x2), a conv is one matmul (see Conv2d)


@contextlib.contextmanager
def matmul_conv_pixels(pixels: int):
    """Within the block, convs over at most `pixels` input pixels trace as im2col matmuls (read
    when a function is traced, so wrap the first call of a jitted function or its `lower`): to
    compare the two forms on a whole program (`python -m benchmarks.sampling --matmul-conv-pixels`)."""
    global MATMUL_CONV_PIXELS
    before, MATMUL_CONV_PIXELS = MATMUL_CONV_PIXELS, int(pixels)
    try:
        yield
    finally:
        MATMUL_CONV_PIXELS = before


class Conv2d(nn.Module):
    """Twin of `nn.Conv2d(in, features, kernel, stride, padding)` on NHWC, with `nn.Conv`'s params
    (`kernel` (k, k, in, out), `bias`) and init. A 1x1 conv is a matmul; so is a conv over at most
    `MATMUL_CONV_PIXELS` pixels, over the k*k shifted views (im2col): XLA:CPU's convolution takes
    0.8-2.3 s for a 3x3 over the U-Net's 2x2x1024 bottleneck (batch 16), the matmul ~10-20 ms.
    From 4x4 up XLA's conv wins with few channels (2x at 8x8x32, the views cost more than the matmul
    saves) and loses at most 1.2x (4x4x512)."""
    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0

    @nn.compact
    def __call__(self, x):
        k, s, p = self.kernel_size, self.stride, self.padding
        kernel = self.param("kernel", torch_linear_init, (k, k, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias)
        B, H, W, C = x.shape
        if k == 1 and s == 1 and p == 0:
            return x @ kernel[0, 0] + bias
        if H * W > MATMUL_CONV_PIXELS:
            y = jax.lax.conv_general_dilated(x, kernel, (s, s), ((p, p), (p, p)),
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            return y + bias
        Ho, Wo = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
        xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
        views = [xp[:, i:i + s * (Ho - 1) + 1:s, j:j + s * (Wo - 1) + 1:s] for i in range(k) for j in range(k)]
        return jnp.concatenate(views, axis=-1) @ kernel.reshape(k * k * C, self.features) + bias


def conv(features, kernel, stride=1, padding=0, name=None):
    """Twin of `nn.Conv2d(in, features, kernel, stride, padding)`."""
    return Conv2d(features, kernel, stride, padding, name=name)


class ConvTranspose2d(nn.Module):
    """Twin of `torch.nn.ConvTranspose2d` on NHWC. The parameter is torch's own `weight`
    (in, out, kh, kw), so the bridge carries it as is: the transposed convolution is the input
    dilated by `stride`, padded by k - 1 - padding, convolved with the spatially flipped kernel;
    when kernel == stride (no padding) each input pixel paints its own output patch: one matmul,
    without the dilated zeros (the U-Net's case), written as (B*H*W, in) @ (in, k*k*out) so that
    XLA:CPU does not transpose the input first (5-7% of a ddpm-digits U-Net call)."""
    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    output_padding: int = 0

    @nn.compact
    def __call__(self, x):
        k, s, p = self.kernel_size, self.stride, self.padding
        bound = 1 / math.sqrt(self.out_channels * k * k)  # torch's fan_in for (in, out, kh, kw)
        init = lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -bound, bound)
        weight = self.param("weight", init, (self.in_channels, self.out_channels, k, k))
        bias = self.param("bias", init, (self.out_channels,))
        lo, hi = k - 1 - p, k - 1 - p + self.output_padding
        x, weight, bias = nn.dtypes.promote_dtype(x, weight, bias)
        if k == s and p == 0 and self.output_padding == 0:  # patches that don't overlap: one matmul
            B, H, W, C = x.shape
            patches = x.reshape(-1, C) @ weight.transpose(0, 2, 3, 1).reshape(C, k * k * self.out_channels)
            y = patches.reshape(B, H, W, k, k, self.out_channels).transpose(0, 1, 3, 2, 4, 5)
            return y.reshape(B, H * s, W * s, self.out_channels) + bias
        y = jax.lax.conv_general_dilated(
            x, weight[:, :, ::-1, ::-1], window_strides=(1, 1), padding=((lo, hi), (lo, hi)),
            lhs_dilation=(s, s), dimension_numbers=("NHWC", "IOHW", "NHWC"))
        return y + bias
