"""Image captioning in Flax linen: twins of `torch_reference/captioning.py`, and generation as one
compiled call (`generate`: a `lax.while_loop` over a fixed-size key-value cache).

Images are NHWC. Module names are Hugging Face GPT-2's (without the `transformer.` prefix).
Generation follows the torch twin's rules token for token (see that module's docstring and
`beam_search`): greedy argmax (lowest id among ties), sampling by the inverse CDF of the uniforms
given, HF-like beam search. `attention_impl` (last field, Flax only) picks `layers.attend`'s kernel.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import flax.linen as nn
from flax import struct

from .layers import Dropout, LayerNorm, attend, check_token_ids
from .vit import VisionTransformer

normal_02 = nn.initializers.normal(0.02)
NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """What generation reads from the decoder (the source reads `text_decoder.config.bos_token_id`)."""
    vocab_size: int
    max_positions: int
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int


def decoder_config(vocab_size, max_positions, bos_token_id=None, eos_token_id=None, pad_token_id=0):
    """A checked `DecoderConfig`; bos and eos default to the project tokenizer's `vocab_size - 2`
    and `vocab_size - 1`."""
    bos = vocab_size - 2 if bos_token_id is None else bos_token_id
    eos = vocab_size - 1 if eos_token_id is None else eos_token_id
    for name, i in (("bos_token_id", bos), ("eos_token_id", eos), ("pad_token_id", pad_token_id)):
        if not 0 <= i < vocab_size:
            raise ValueError(f"{name} {i} is not an id below vocab_size {vocab_size}")
    return DecoderConfig(vocab_size, max_positions, bos, eos, pad_token_id)


@struct.dataclass
class KVCache:
    """Per layer, self-attention keys and values (B, heads, max_length, head_dim), written at
    `index` with `lax.dynamic_update_slice`, and cross-attention keys and values
    (B, heads, image tokens, head_dim) computed once."""
    self_k: tuple
    self_v: tuple
    cross_k: tuple
    cross_v: tuple
    index: Any = 0

    def write(self, layer: int, k, v) -> KVCache:
        """Layer `layer`'s new keys and values (B, heads, T, head_dim) written at `index`."""
        def put(xs, x):
            new = jax.lax.dynamic_update_slice(xs[layer], x, (0, 0, self.index, 0))
            return xs[:layer] + (new,) + xs[layer + 1:]
        return self.replace(self_k=put(self.self_k, k), self_v=put(self.self_v, v))

    def reorder(self, rows) -> KVCache:
        """Keep the self-attention rows `rows` (beam search); beams never leave their image, whose
        cross keys they share."""
        take = lambda xs: tuple(x[rows] for x in xs)
        return self.replace(self_k=take(self.self_k), self_v=take(self.self_v))


@struct.dataclass
class DecoderOutput:
    logits: jax.Array                      # (B, T, vocab_size)
    past_key_values: KVCache | None = None


def split_heads(x, heads):
    """(B, T, W) -> (B, heads, T, W / heads)."""
    B, T, W = x.shape
    return x.reshape(B, T, heads, W // heads).swapaxes(1, 2)


def merge_heads(x):
    """(B, heads, T, head_dim) -> (B, T, heads * head_dim)."""
    B, H, T, D = x.shape
    return x.swapaxes(1, 2).reshape(B, T, H * D)


def _dense(features, name, std=0.02):
    return nn.Dense(features, kernel_init=nn.initializers.normal(std), name=name)


class CausalSelfAttention(nn.Module):
    """GPT-2's self-attention: fused `c_attn` (q, k, v), `c_proj`; causal. (B, T, W) -> (B, T, W).
    With a cache, the T new positions are written at `cache.index` and see every position before
    them; returns (out, cache). `proj_std`: the initial spread of `c_proj` (GPT-2 scales it down
    with the depth)."""
    width: int
    heads: int
    dropout: float = 0.0
    proj_std: float = 0.02
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x, cache=None, layer: int = 0, train: bool = False):
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        T = x.shape[1]
        qkv = jnp.split(_dense(3 * self.width, "c_attn")(x), 3, axis=-1)
        q, k, v = (split_heads(t, self.heads) for t in qkv)
        start = 0
        if cache is not None:
            start, cache = cache.index, cache.write(layer, k, v)
            k, v = cache.self_k[layer], cache.self_v[layer]
        mask = jnp.arange(k.shape[2])[None, :] <= (start + jnp.arange(T))[:, None]
        drop = Dropout(self.dropout, deterministic=not train, name="attn_dropout")
        out = attend(q, k, v, q.shape[-1] ** -0.5, mask=mask, dropout=drop, impl=self.attention_impl)
        out = _dense(self.width, "c_proj", self.proj_std)(merge_heads(out))
        return Dropout(self.dropout, name="resid_dropout")(out, deterministic=not train), cache


class CrossAttention(nn.Module):
    """GPT-2's cross-attention: queries `q_attn` from the text, fused keys and values `c_attn` from
    the image tokens, `c_proj`. (B, T, W), (B, N, W) -> (B, T, W)."""
    width: int
    heads: int
    dropout: float = 0.0
    proj_std: float = 0.02
    attention_impl: str = "xla"

    def setup(self):
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        self.q_attn = _dense(self.width, "q_attn")
        self.c_attn = _dense(2 * self.width, "c_attn")
        self.c_proj = _dense(self.width, "c_proj", self.proj_std)

    def key_values(self, encoder_hidden_states):
        """(B, N, W) -> keys and values, each (B, heads, N, head_dim)."""
        k, v = jnp.split(self.c_attn(encoder_hidden_states), 2, -1)
        return split_heads(k, self.heads), split_heads(v, self.heads)

    @nn.compact
    def __call__(self, x, encoder_hidden_states=None, key_values=None, train: bool = False):
        k, v = self.key_values(encoder_hidden_states) if key_values is None else key_values
        q = split_heads(self.q_attn(x), self.heads)
        drop = Dropout(self.dropout, deterministic=not train, name="attn_dropout")
        out = attend(q, k, v, q.shape[-1] ** -0.5, dropout=drop, impl=self.attention_impl)
        out = self.c_proj(merge_heads(out))
        return Dropout(self.dropout, name="resid_dropout")(out, deterministic=not train)


class MLP(nn.Module):
    """GPT-2's feed-forward: `c_fc`, tanh GELU, `c_proj`, dropout."""
    width: int
    hidden: int
    dropout: float = 0.0
    proj_std: float = 0.02

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.gelu(_dense(self.hidden, "c_fc")(x), approximate=True)
        x = _dense(self.width, "c_proj", self.proj_std)(x)
        return Dropout(self.dropout, name="dropout")(x, deterministic=not train)


class Block(nn.Module):
    """Pre-norm decoder block: x + attn(ln_1(x)), x + crossattention(ln_cross_attn(x), image),
    x + mlp(ln_2(x)). Returns (x, cache)."""
    width: int
    heads: int
    mlp_ratio: float = 4
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    proj_std: float = 0.02
    attention_impl: str = "xla"

    def setup(self):
        ln = lambda: LayerNorm(epsilon=self.layer_norm_eps)
        self.ln_1, self.ln_cross_attn, self.ln_2 = ln(), ln(), ln()
        self.attn = CausalSelfAttention(self.width, self.heads, self.dropout, self.proj_std, self.attention_impl)
        self.crossattention = CrossAttention(self.width, self.heads, self.dropout, self.proj_std,
                                             self.attention_impl)
        self.mlp = MLP(self.width, int(self.width * self.mlp_ratio), self.dropout, self.proj_std)

    def __call__(self, x, encoder_hidden_states=None, cache=None, layer: int = 0, train: bool = False):
        a, cache = self.attn(self.ln_1(x), cache, layer, train)
        x = x + a
        cross = None if cache is None else (cache.cross_k[layer], cache.cross_v[layer])
        x = x + self.crossattention(self.ln_cross_attn(x), encoder_hidden_states, cross, train)
        return x + self.mlp(self.ln_2(x), train), cache


class TextDecoder(nn.Module):
    """GPT-2 with cross-attention: (B, T) ids and (B, N, image_width) image tokens -> DecoderOutput
    with logits (B, T, vocab_size) from the tied token embedding `wte`. `image_proj` (Dense) maps
    the image tokens to `width` when `image_width` differs. With `past_key_values` (from
    `init_cache`) the ids continue the cached positions, the image tokens are not needed, and the
    output carries the updated cache."""
    vocab_size: int = 50257
    max_positions: int = 1024
    width: int = 768
    layers: int = 12
    heads: int = 12
    image_width: int | None = None
    mlp_ratio: float = 4
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int = 0
    attention_impl: str = "xla"

    @property
    def config(self) -> DecoderConfig:
        return decoder_config(self.vocab_size, self.max_positions, self.bos_token_id, self.eos_token_id,
                              self.pad_token_id)

    @property
    def _image_width(self) -> int:
        return self.width if self.image_width is None else self.image_width

    def setup(self):
        self.config  # noqa: B018  (checks the special ids)
        self.wte = nn.Embed(self.vocab_size, self.width, embedding_init=normal_02)
        self.wpe = nn.Embed(self.max_positions, self.width, embedding_init=normal_02)
        self.drop = Dropout(self.dropout)
        proj_std = 0.02 / math.sqrt(2 * self.layers)
        self.h = [Block(self.width, self.heads, self.mlp_ratio, self.dropout, self.layer_norm_eps, proj_std,
                        self.attention_impl) for _ in range(self.layers)]
        self.ln_f = LayerNorm(epsilon=self.layer_norm_eps)
        if self._image_width != self.width:
            self.image_proj = _dense(self.width, "image_proj")

    def project_image(self, encoder_hidden_states):
        """(B, N, image_width) -> (B, N, width)."""
        x = encoder_hidden_states
        if x.ndim != 3 or x.shape[-1] != self._image_width:
            raise ValueError(f"TextDecoder expects image tokens (B, N, {self._image_width}); "
                             f"got shape {tuple(x.shape)}")
        return x if self._image_width == self.width else self.image_proj(x)

    def init_cache(self, encoder_hidden_states, max_length: int) -> KVCache:
        """An empty cache for `max_length` positions, with every layer's cross keys and values."""
        if not 1 <= max_length <= self.max_positions:
            raise ValueError(f"cache max_length must be in [1, {self.max_positions}]; got {max_length}")
        enc = self.project_image(encoder_hidden_states)
        cross = [block.crossattention.key_values(enc) for block in self.h]
        empty = jnp.zeros((enc.shape[0], self.heads, max_length, self.width // self.heads), enc.dtype)
        return KVCache((empty,) * self.layers, (empty,) * self.layers, tuple(k for k, _ in cross),
                       tuple(v for _, v in cross), jnp.zeros((), jnp.int32))

    def __call__(self, input_ids, encoder_hidden_states=None, past_key_values=None, train: bool = False):
        cache = past_key_values
        T = input_ids.shape[-1]
        limit = self.max_positions if cache is None else cache.self_k[0].shape[2]
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer) or T > limit:
            raise ValueError(f"TextDecoder expects (B, T) integer ids with T <= {limit} positions; "
                             f"got {input_ids.dtype} of shape {tuple(input_ids.shape)}")
        check_token_ids(input_ids, self.vocab_size, "TextDecoder")
        enc = None if cache is not None else self.project_image(encoder_hidden_states)
        start = 0 if cache is None else cache.index
        x = self.drop(self.wte(input_ids) + self.wpe(start + jnp.arange(T)), deterministic=not train)
        for i, block in enumerate(self.h):
            x, cache = block(x, enc, cache, i, train)
        x = self.ln_f(x)
        if cache is not None:
            cache = cache.replace(index=cache.index + T)
        return DecoderOutput(self.wte.attend(x), cache)


def caption_loss(logits, captions, pad_token_id):
    """Next-token cross-entropy: logits (B, T, V) at positions 0..T-2 against captions[:, 1:],
    averaged over the targets that are not `pad_token_id`."""
    targets = captions[:, 1:]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], targets)
    weight = (targets != pad_token_id).astype(ce.dtype)
    return (ce * weight).sum() / weight.sum()


def sample_tokens(logits, uniforms, temperature=1.0, top_k: int = 0):
    """(B, V) logits, (B,) uniforms in [0, 1) -> (B,) ids by the inverse CDF of
    softmax(logits / temperature) over the `top_k` largest (all when 0)."""
    scaled = logits / temperature
    V = scaled.shape[-1]
    if 0 < top_k < V:
        _, keep = jax.lax.top_k(scaled, top_k)
        allowed = jnp.zeros(scaled.shape, bool).at[jnp.arange(scaled.shape[0])[:, None], keep].set(True)
        scaled = jnp.where(allowed, scaled, NEG_INF)
    cdf = jnp.cumsum(jax.nn.softmax(scaled, axis=-1), axis=-1)
    token = (cdf <= uniforms[:, None] * cdf[:, -1:]).sum(-1)
    return jnp.minimum(token, V - 1)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_generation_args(max_length, max_positions, num_beams=1, do_sample=False, temperature=1.0,
                          top_k=0, min_length=0, length_penalty=1.0):
    """ValueErrors naming what is expected of generate's arguments."""
    if not isinstance(max_length, int) or not 1 <= max_length <= max_positions:
        raise ValueError(f"max_length must be an int in [1, {max_positions}] (the decoder's position "
                         f"table); got {max_length!r}")
    if not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be an int >= 1; got {num_beams!r}")
    if do_sample and num_beams > 1:
        raise ValueError("do_sample=True takes num_beams=1 (beam sampling is not implemented)")
    if not (_is_real(temperature) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number; got {temperature!r}")
    if not (_is_real(length_penalty) and math.isfinite(length_penalty)):
        raise ValueError(f"length_penalty must be a finite number; got {length_penalty!r}")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0: no filter); got {top_k!r}")
    if not isinstance(min_length, int) or not 0 <= min_length <= max_length:
        raise ValueError(f"min_length must be an int in [0, max_length={max_length}]; got {min_length!r}")


class ImageCaptioningModel(nn.Module):
    """The second source's captioner: `__call__(images, captions)` -> logits (B, T, vocab_size)
    with the decoder cross-attending to the image encoder's tokens (an encoder that takes
    `return_tokens` is asked for them). `generate` is the traced decode; call it through the
    module-level `generate`, which compiles it once per shape and setting."""
    image_encoder: nn.Module
    text_decoder: TextDecoder

    def encode_images(self, images, train: bool = False):
        """(B, H, W, C) -> image tokens (B, N, image_width)."""
        if "return_tokens" in inspect.signature(type(self.image_encoder).__call__).parameters:
            return self.image_encoder(images, return_tokens=True, train=train)
        x = self.image_encoder(images, train=train)
        return x[:, None] if x.ndim == 2 else x

    def __call__(self, images, captions, train: bool = False):
        outputs = self.text_decoder(captions, self.encode_images(images, train), train=train)
        return outputs.logits

    def generate(self, images, max_length: int = 50, num_beams: int = 1, do_sample: bool = False,
                 temperature=1.0, top_k: int = 0, length_penalty=1.0, min_length=0, uniforms=None,
                 use_cache: bool = True):
        """(B, H, W, C) images -> (B, 1 + max_length) ids, as the torch twin's `generate`: one
        `lax.while_loop` that stops when every sequence has ended; the image encoder and the cross
        keys and values run once, before it. `uniforms` (B, max_length) are the sampling draws."""
        config = self.text_decoder.config
        check_generation_args(max_length, config.max_positions, num_beams, do_sample, 1.0, top_k)
        B = images.shape[0]
        image_features = self.encode_images(images)
        if num_beams > 1:
            image_features = jnp.repeat(image_features, num_beams, axis=0)
        rows = image_features.shape[0]
        tokens = jnp.full((rows, max_length + 1), config.pad_token_id, jnp.int32).at[:, 0].set(config.bos_token_id)
        decoder = self.text_decoder
        cache = decoder.init_cache(image_features, max_length) if use_cache else None

        def next_logits(tokens, t, cache):
            if cache is not None:
                ids = jax.lax.dynamic_slice_in_dim(tokens, t, 1, axis=1)
                out = decoder(ids, past_key_values=cache)
                return out.logits[:, -1].astype(jnp.float32), out.past_key_values
            logits = decoder(tokens[:, :max_length], image_features).logits
            return jax.lax.dynamic_index_in_dim(logits, t, 1, keepdims=False).astype(jnp.float32), None

        if num_beams > 1:
            return _beam_search(next_logits, tokens, cache, B, num_beams, max_length, config, length_penalty,
                                min_length)

        def body(state):
            t, tokens, finished, cache = state
            logits, cache = next_logits(tokens, t, cache)
            logits = jnp.where((t < min_length) & (jnp.arange(logits.shape[-1]) == config.eos_token_id),
                               NEG_INF, logits)
            if do_sample:
                u = jax.lax.dynamic_index_in_dim(uniforms, t, 1, keepdims=False)
                token = sample_tokens(logits, u, temperature, top_k)
            else:
                token = jnp.argmax(logits, axis=-1)
            token = jnp.where(finished, config.pad_token_id, token).astype(jnp.int32)
            tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], t + 1, axis=1)
            return t + 1, tokens, finished | (token == config.eos_token_id), cache

        def cond(state):
            t, _, finished, _ = state
            return (t < max_length) & ~jnp.all(finished)

        state = (jnp.zeros((), jnp.int32), tokens, jnp.zeros((rows,), bool), cache)
        return jax.lax.while_loop(cond, body, state)[1]

    def generate_caption(self, image, max_length: int = 50):
        """Greedy decode of one (H, W, C) image, with the cache: (1, 1 + max_length) ids, padded
        after `eos` (the module-level `generate_caption` cuts them as the source does)."""
        return self.generate(image[None], max_length)


def _beam_search(next_logits, tokens, cache, B, K, max_length, config, length_penalty, min_length):
    """The torch twin's `beam_search`, each step vectorized over images, in one `lax.while_loop`."""
    L1 = tokens.shape[1]
    eos, pad = config.eos_token_id, config.pad_token_id
    scores = jnp.full((B, K), NEG_INF, jnp.float32).at[:, 0].set(0.0)
    pool_tokens = jnp.full((B, K, L1), pad, jnp.int32)
    pool_scores = jnp.full((B, K), NEG_INF, jnp.float32)
    image_row = jnp.arange(B)[:, None] * K
    take = jax.vmap(lambda x, i: x[i])

    def merge(pool_tokens, pool_scores, new_tokens, new_scores):
        all_scores = jnp.concatenate([pool_scores, new_scores], 1)
        kept, order = jax.lax.top_k(all_scores, K)
        return take(jnp.concatenate([pool_tokens, new_tokens], 1), order), kept

    def body(state):
        t, tokens, scores, pool_tokens, pool_scores, done, cache = state
        logits, new_cache = next_logits(tokens, t, cache)
        logp = jax.nn.log_softmax(logits, axis=-1)
        V = logp.shape[-1]
        logp = jnp.where((t < min_length) & (jnp.arange(V) == eos), NEG_INF, logp)
        candidates = (scores.reshape(-1, 1) + logp).reshape(B, K * V)
        top_scores, top_index = jax.lax.top_k(candidates, 2 * K)
        source_row = image_row + top_index // V
        token = (top_index % V).astype(jnp.int32)
        is_eos = token == eos
        grown = tokens[source_row].at[:, :, t + 1].set(token)
        length = (t + 1).astype(jnp.float32) ** length_penalty
        finished_ok = is_eos & (jnp.arange(2 * K) < K)
        finished_scores = jnp.where(finished_ok, top_scores / length, NEG_INF)
        new_pool_tokens, new_pool_scores = merge(pool_tokens, pool_scores, grown, finished_scores)
        live = jnp.argsort(is_eos.astype(jnp.int32), axis=1, stable=True)[:, :K]
        new_scores = take(top_scores, live)
        new_rows = take(source_row, live)
        new_tokens = take(grown, live)
        now_done = (new_pool_scores[:, -1] > NEG_INF) & (new_scores[:, 0] / length <= new_pool_scores[:, -1])
        keep = done[:, None]
        scores = jnp.where(keep, scores, new_scores)
        pool_scores = jnp.where(keep, pool_scores, new_pool_scores)
        pool_tokens = jnp.where(keep[:, :, None], pool_tokens, new_pool_tokens)
        tokens = jnp.where(keep[:, :, None], tokens.reshape(B, K, L1), new_tokens).reshape(B * K, L1)
        if new_cache is not None:
            new_cache = new_cache.reorder(jnp.where(keep, image_row + jnp.arange(K), new_rows).reshape(-1))
        return t + 1, tokens, scores, pool_tokens, pool_scores, done | now_done, new_cache

    def cond(state):
        return (state[0] < max_length) & ~jnp.all(state[5])

    state = (jnp.zeros((), jnp.int32), tokens, scores, pool_tokens, pool_scores, jnp.zeros((B,), bool), cache)
    _, tokens, scores, pool_tokens, pool_scores, done, _ = jax.lax.while_loop(cond, body, state)
    last = jnp.where(done[:, None], NEG_INF, scores / jnp.float32(max_length) ** length_penalty)
    pool_tokens, pool_scores = merge(pool_tokens, pool_scores, tokens.reshape(B, K, L1), last)
    return take(pool_tokens, jnp.argmax(pool_scores, axis=1))


@functools.partial(jax.jit, static_argnames=("model", "max_length", "num_beams", "do_sample", "top_k",
                                             "use_cache"))
def _compiled_generate(model, variables, images, max_length, num_beams, do_sample, top_k, use_cache,
                       temperature, length_penalty, min_length, uniforms):
    return model.apply(variables, images, max_length, num_beams, do_sample, temperature, top_k, length_penalty,
                       min_length, uniforms, use_cache, method=ImageCaptioningModel.generate)


def generate(model: ImageCaptioningModel, variables, images, max_length: int = 50, num_beams: int = 1,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, length_penalty: float = 1.0,
             min_length: int = 0, uniforms=None, rng=None, use_cache: bool = True):
    """`model.generate` compiled once per (model, batch size, max_length, num_beams, do_sample,
    top_k, use_cache): new images, weights, temperature, length penalty, min_length and draws reuse
    it. Sampling draws `uniforms` (B, max_length) from `jax.random.uniform(rng, (B, max_length))`
    when not given."""
    config = model.text_decoder.config
    check_generation_args(max_length, config.max_positions, num_beams, do_sample, temperature, top_k, min_length,
                          length_penalty)
    B = images.shape[0]
    if do_sample:
        if uniforms is None:
            if rng is None:
                raise ValueError("do_sample=True needs `uniforms` (B, max_length) or an `rng` key")
            uniforms = jax.random.uniform(rng, (B, max_length))
        if tuple(uniforms.shape) != (B, max_length):
            raise ValueError(f"uniforms must be (B, max_length) = {(B, max_length)}; got {tuple(uniforms.shape)}")
        uniforms = jnp.asarray(uniforms, jnp.float32)
    else:
        uniforms = None
    return _compiled_generate(model, variables, images, max_length, num_beams, do_sample, top_k, use_cache,
                              jnp.float32(temperature), jnp.float32(length_penalty), jnp.int32(min_length),
                              uniforms)


def generate_caption(model: ImageCaptioningModel, variables, image, max_length: int = 50) -> np.ndarray:
    """The source's `generate_caption` for one (H, W, C) image: (1, n) ids, `bos` first, ending at
    `eos` or after `max_length` generated tokens (greedy, compiled, with the cache)."""
    if image.ndim != 3:
        raise ValueError(f"generate_caption takes one (H, W, C) image; got shape {tuple(image.shape)}")
    row = np.asarray(generate(model, variables, image[None], max_length))[0]
    ends = np.flatnonzero(row[1:] == model.text_decoder.config.eos_token_id)
    return row[None, : 2 + ends[0] if ends.size else len(row)]


def Captioner(image_size=224, patch_size=16, in_channels=3, vision_width=768, vision_layers=12,
              vision_heads=12, vocab_size=50257, max_positions=1024, width=768, layers=12, heads=12,
              mlp_ratio=4, dropout=0.0, bos_token_id=None, eos_token_id=None, pad_token_id=0,
              attention_impl="xla"):
    """An `ImageCaptioningModel` of a ViT image tower (`num_classes=0`, all its tokens) and a
    `TextDecoder`, from plain config values (the presets' entry point); `attention_impl` is Flax
    only (see `layers.attend`)."""
    image = VisionTransformer(image_size, patch_size, in_channels, 0, vision_width, vision_layers,
                              vision_heads, mlp_ratio, dropout, attention_impl, parent=None)
    text = TextDecoder(vocab_size, max_positions, width, layers, heads, vision_width, mlp_ratio, dropout,
                       bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                       attention_impl=attention_impl, parent=None)
    return ImageCaptioningModel(image, text)
