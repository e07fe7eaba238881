"""Layers shared by the Flax models: one patch embedding, one attention, one MLP.

Twins of `torch_reference/layers.py`. Submodule names follow the torch attribute names, and the
children of a torch `nn.Sequential` are named by their index ('0', '3'), so the bridge maps keys
both ways by rule.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

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


def add_class_token(x, cls_token, pos_embed):
    """(B, N, D) patch tokens -> (B, 1 + N, D): the class token in front, then the position table
    added (the prologue of both ViTs)."""
    cls = jnp.broadcast_to(cls_token, (x.shape[0], 1, x.shape[-1]))
    return jnp.concatenate([cls, x], axis=1) + pos_embed


class _ConvThenFlatten(nn.Module):
    """The first source's `nn.Sequential(Conv2d, Rearrange)`: the conv is child '0'."""
    embed_dim: int
    patch_size: int

    @nn.compact
    def __call__(self, x):
        p = self.patch_size
        x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID",
                    kernel_init=torch_linear_init, name="0")(x)
        return x.reshape(x.shape[0], -1, x.shape[-1])


class PatchEmbedding(nn.Module):
    """Non-overlapping patches -> tokens: (B, H, W, C) -> (B, (H/p)*(W/p), embed_dim).

    `rearrange=True`: the first source's layout (`projection/0` is the conv); False: the second's.
    """
    image_size: int = 224
    patch_size: int = 16
    in_channels: int = 3
    embed_dim: int = 768
    rearrange: bool = True

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
            return _ConvThenFlatten(self.embed_dim, p, name="projection")(x)
        x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID",
                    kernel_init=torch_linear_init, name="projection")(x)
        return x.reshape(x.shape[0], -1, x.shape[-1])


ATTENTION_IMPLS = ("xla", "fused", "cudnn")


def compute_dtype(dtype):
    """The dtype of softmax and norm statistics: float32 for bfloat16/float16, else `dtype` itself."""
    return jnp.promote_types(dtype, jnp.float32)


def attend(q, k, v, scale, bias=None, mask=None, dropout: nn.Dropout | None = None, impl: str = "xla"):
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


def _fused_attend(q, k, v, scale, bias, mask, implementation):
    """`attend` through `jax.nn.dot_product_attention`: the leading axes (B, *heads) of q, k, v,
    bias and mask fold into its (B, T, N, H) layout, heads (N) being all axes after the first."""
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
                                       implementation=implementation)
    return out.swapaxes(1, 2).reshape(*lead, q.shape[-2], v.shape[-1])


class Mlp(nn.Module):
    """Dense -> GELU -> Dropout -> Dense -> Dropout, children '0' and '3' as in torch's nn.Sequential;
    `dropout_layers=False`: Dense -> GELU -> Dense, children '0' and '2' (the second source's FFN)."""
    in_features: int
    hidden_features: int
    out_features: int | None = None
    dropout: float = 0.0
    dropout_layers: bool = True
    kernel_init: Any = torch_linear_init

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.dropout and not self.dropout_layers:
            raise ValueError(f"dropout {self.dropout} needs dropout_layers=True")
        x = nn.Dense(self.hidden_features, kernel_init=self.kernel_init, name="0")(x)
        x = gelu(x)
        x = nn.Dropout(self.dropout)(x, deterministic=not train)
        x = nn.Dense(self.out_features or self.in_features, kernel_init=self.kernel_init,
                     name="3" if self.dropout_layers else "2")(x)
        return nn.Dropout(self.dropout)(x, deterministic=not train)


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
        drop = nn.Dropout(self.dropout, deterministic=not train)
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
        drop = lambda: nn.Dropout(self.dropout, deterministic=not train)
        self_attn = MultiheadAttention(self.d_model, self.nhead, self.dropout,
                                       attention_impl=self.attention_impl, name="self_attn")
        linear1 = nn.Dense(self.dim_feedforward, kernel_init=torch_linear_init, name="linear1")
        linear2 = nn.Dense(self.d_model, kernel_init=torch_linear_init, name="linear2")
        norm1 = nn.LayerNorm(epsilon=self.layer_norm_eps, name="norm1")
        norm2 = nn.LayerNorm(epsilon=self.layer_norm_eps, name="norm2")

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


class DropPath(nn.Module):
    """Stochastic depth: with `train=True` (and a 'dropout' rng), zero a whole sample's residual
    branch with probability `drop_prob` and scale the kept ones by 1/(1-drop_prob)."""
    drop_prob: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.drop_prob == 0.0 or not train:
            return x
        keep = 1.0 - self.drop_prob
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return x * mask.astype(x.dtype) / keep
