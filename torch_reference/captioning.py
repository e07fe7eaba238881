"""Image captioning in PyTorch: a GPT-2-style text decoder with cross-attention to image tokens,
the second source's `ImageCaptioningModel`, and batched generation with a key-value cache.

Module names are Hugging Face GPT-2's (`GPT2LMHeadModel(add_cross_attention=True)` without the
`transformer.` prefix; its Conv1D weights are these Linear weights transposed). Images are NCHW.

Generation (twin of `jax_models/captioning.py`, token for token): sequences are (B, 1 + max_length)
ids, `bos` first, then up to `max_length` generated tokens; a sequence ends at `eos` and is padded
with `pad` after it. Greedy takes the argmax (the lowest id among equal logits). Sampling picks, for
the uniform draw u of its row and step, the smallest id i with cdf[i] > u * cdf[-1], the cdf over
the softmax of logits / temperature with all but the `top_k` largest set to -inf (ties: lower id
kept). Beam search (`beam_search`'s docstring) ranks candidates with ties to the lower flat index.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import attend, check_token_ids
from .vit import VisionTransformer


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


@dataclasses.dataclass
class DecoderOutput:
    logits: torch.Tensor                   # (B, T, vocab_size)
    past_key_values: KVCache | None = None


@dataclasses.dataclass
class KVCache:
    """Per layer, self-attention keys and values (B, heads, max_length, head_dim) filled up to
    `index`, and cross-attention keys and values (B, heads, image tokens, head_dim) computed once."""
    self_k: list
    self_v: list
    cross_k: list
    cross_v: list
    index: int = 0

    def write(self, layer, k, v):
        """Layer `layer`'s new keys and values (B, heads, T, head_dim) written at `index`; returns
        the layer's keys and values up to them."""
        end = self.index + k.shape[2]
        self.self_k[layer][:, :, self.index:end] = k
        self.self_v[layer][:, :, self.index:end] = v
        return self.self_k[layer][:, :, :end], self.self_v[layer][:, :, :end]

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep the self-attention rows `rows` (beam search); the cross keys are shared by the
        beams of an image, which never leave it."""
        self.self_k = [k.index_select(0, rows) for k in self.self_k]
        self.self_v = [v.index_select(0, rows) for v in self.self_v]


def linear(in_features, out_features, std=0.02):
    """GPT-2's Linear initialisation: weights N(0, std^2), zero bias."""
    layer = nn.Linear(in_features, out_features)
    nn.init.normal_(layer.weight, std=std)
    nn.init.zeros_(layer.bias)
    return layer


def split_heads(x, heads):
    """(B, T, W) -> (B, heads, T, W / heads)."""
    B, T, W = x.shape
    return x.reshape(B, T, heads, W // heads).transpose(1, 2)


def merge_heads(x):
    """(B, heads, T, head_dim) -> (B, T, heads * head_dim)."""
    B, H, T, D = x.shape
    return x.transpose(1, 2).reshape(B, T, H * D)


class CausalSelfAttention(nn.Module):
    """GPT-2's self-attention: fused `c_attn` (q, k, v), `c_proj`; causal. (B, T, W) -> (B, T, W).
    With a cache, the T new positions start at `cache.index` and see every position before them.
    `proj_std`: the initial spread of `c_proj` (GPT-2 scales it down with the depth)."""

    def __init__(self, width, heads, dropout=0.0, proj_std=0.02):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.c_attn = linear(width, 3 * width)
        self.c_proj = linear(width, width, proj_std)
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x, cache=None, layer=0):
        T = x.shape[1]
        q, k, v = (split_heads(t, self.heads) for t in self.c_attn(x).chunk(3, dim=-1))
        start = 0
        if cache is not None:
            start = cache.index
            k, v = cache.write(layer, k, v)
        query_pos = torch.arange(start, start + T, device=x.device)
        mask = torch.arange(start + T, device=x.device)[None, :] <= query_pos[:, None]
        out = attend(q, k, v, q.shape[-1] ** -0.5, mask=mask, dropout=self.attn_dropout)
        return self.resid_dropout(self.c_proj(merge_heads(out)))


class CrossAttention(nn.Module):
    """GPT-2's cross-attention: queries `q_attn` from the text, fused keys and values `c_attn` from
    the image tokens, `c_proj`. (B, T, W), (B, N, W) -> (B, T, W)."""

    def __init__(self, width, heads, dropout=0.0, proj_std=0.02):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.q_attn = linear(width, width)
        self.c_attn = linear(width, 2 * width)
        self.c_proj = linear(width, width, proj_std)
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)

    def key_values(self, encoder_hidden_states):
        """(B, N, W) -> keys and values, each (B, heads, N, head_dim)."""
        k, v = self.c_attn(encoder_hidden_states).chunk(2, dim=-1)
        return split_heads(k, self.heads), split_heads(v, self.heads)

    def forward(self, x, encoder_hidden_states=None, key_values=None):
        k, v = self.key_values(encoder_hidden_states) if key_values is None else key_values
        q = split_heads(self.q_attn(x), self.heads)
        out = attend(q, k, v, q.shape[-1] ** -0.5, dropout=self.attn_dropout)
        return self.resid_dropout(self.c_proj(merge_heads(out)))


class MLP(nn.Module):
    """GPT-2's feed-forward: `c_fc`, tanh GELU, `c_proj`, dropout."""

    def __init__(self, width, hidden, dropout=0.0, proj_std=0.02):
        super().__init__()
        self.c_fc = linear(width, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.c_proj = linear(hidden, width, proj_std)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm decoder block: x + attn(ln_1(x)), x + crossattention(ln_cross_attn(x), image),
    x + mlp(ln_2(x))."""

    def __init__(self, width, heads, mlp_ratio=4, dropout=0.0, layer_norm_eps=1e-5, proj_std=0.02):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=layer_norm_eps)
        self.attn = CausalSelfAttention(width, heads, dropout, proj_std)
        self.ln_cross_attn = nn.LayerNorm(width, eps=layer_norm_eps)
        self.crossattention = CrossAttention(width, heads, dropout, proj_std)
        self.ln_2 = nn.LayerNorm(width, eps=layer_norm_eps)
        self.mlp = MLP(width, int(width * mlp_ratio), dropout, proj_std)

    def forward(self, x, encoder_hidden_states=None, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), cache, layer)
        cross = None if cache is None else (cache.cross_k[layer], cache.cross_v[layer])
        x = x + self.crossattention(self.ln_cross_attn(x), encoder_hidden_states, cross)
        return x + self.mlp(self.ln_2(x))


class TextDecoder(nn.Module):
    """GPT-2 with cross-attention: (B, T) ids and (B, N, image_width) image tokens -> DecoderOutput
    with logits (B, T, vocab_size) from the tied token embedding `wte`. `image_proj` (Linear) maps
    the image tokens to `width` when `image_width` differs. With `past_key_values` (from
    `init_cache`) the ids continue the cached positions and the image tokens are not needed."""

    def __init__(self, vocab_size=50257, max_positions=1024, width=768, layers=12, heads=12,
                 image_width=None, mlp_ratio=4, dropout=0.0, layer_norm_eps=1e-5, bos_token_id=None,
                 eos_token_id=None, pad_token_id=0):
        super().__init__()
        self.config = decoder_config(vocab_size, max_positions, bos_token_id, eos_token_id, pad_token_id)
        self.width, self.heads = width, heads
        self.image_width = width if image_width is None else image_width
        self.wte = nn.Embedding(vocab_size, width)
        self.wpe = nn.Embedding(max_positions, width)
        nn.init.normal_(self.wte.weight, std=0.02)
        nn.init.normal_(self.wpe.weight, std=0.02)
        self.drop = nn.Dropout(dropout)
        proj_std = 0.02 / math.sqrt(2 * layers)
        self.h = nn.ModuleList([Block(width, heads, mlp_ratio, dropout, layer_norm_eps, proj_std)
                                for _ in range(layers)])
        self.ln_f = nn.LayerNorm(width, eps=layer_norm_eps)
        self.image_proj = linear(self.image_width, width) if self.image_width != width else None

    def project_image(self, encoder_hidden_states):
        """(B, N, image_width) -> (B, N, width)."""
        x = encoder_hidden_states
        if x.ndim != 3 or x.shape[-1] != self.image_width:
            raise ValueError(f"TextDecoder expects image tokens (B, N, {self.image_width}); "
                             f"got shape {tuple(x.shape)}")
        return x if self.image_proj is None else self.image_proj(x)

    def init_cache(self, encoder_hidden_states, max_length) -> KVCache:
        """An empty cache for `max_length` positions, with every layer's cross keys and values."""
        if not 1 <= max_length <= self.config.max_positions:
            raise ValueError(f"cache max_length must be in [1, {self.config.max_positions}]; got {max_length}")
        enc = self.project_image(encoder_hidden_states)
        B, D = enc.shape[0], self.width // self.heads
        cross = [block.crossattention.key_values(enc) for block in self.h]
        empty = lambda: enc.new_zeros(B, self.heads, max_length, D)
        return KVCache([empty() for _ in self.h], [empty() for _ in self.h],
                       [k for k, _ in cross], [v for _, v in cross])

    def forward(self, input_ids, encoder_hidden_states=None, past_key_values=None):
        cache = past_key_values
        start = 0 if cache is None else cache.index
        limit = self.config.max_positions if cache is None else cache.self_k[0].shape[2]
        if input_ids.ndim != 2 or input_ids.is_floating_point() or start + input_ids.shape[1] > limit:
            raise ValueError(f"TextDecoder expects (B, T) integer ids with {start} + T <= {limit} positions; "
                             f"got {input_ids.dtype} of shape {tuple(input_ids.shape)}")
        check_token_ids(input_ids, self.config.vocab_size, "TextDecoder")
        enc = None if cache is not None else self.project_image(encoder_hidden_states)
        pos = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
        x = self.drop(self.wte(input_ids) + self.wpe(pos))
        for i, block in enumerate(self.h):
            x = block(x, enc, cache, i)
        x = self.ln_f(x)
        if cache is not None:
            cache.index = start + input_ids.shape[1]
        return DecoderOutput(x @ self.wte.weight.t(), cache)


def caption_loss(logits, captions, pad_token_id):
    """Next-token cross-entropy: logits (B, T, V) at positions 0..T-2 against captions[:, 1:],
    averaged over the targets that are not `pad_token_id`."""
    targets = captions[:, 1:]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=pad_token_id)


def stable_topk(x, k):
    """The k largest along the last axis, in descending order, equal values by lower index
    (as `jax.lax.top_k`; `torch.topk` promises no order among equal values)."""
    values, indices = torch.sort(x, dim=-1, descending=True, stable=True)
    return values[..., :k], indices[..., :k]


def sample_tokens(logits, uniforms, temperature=1.0, top_k=0):
    """(B, V) logits, (B,) uniforms in [0, 1) -> (B,) ids by the inverse CDF of
    softmax(logits / temperature) over the `top_k` largest (all when 0)."""
    scaled = logits / temperature
    if 0 < top_k < scaled.shape[-1]:
        _, keep = stable_topk(scaled, top_k)
        allowed = torch.zeros_like(scaled, dtype=torch.bool).scatter_(-1, keep, True)
        scaled = scaled.masked_fill(~allowed, float("-inf"))
    cdf = torch.cumsum(F.softmax(scaled, dim=-1), dim=-1)
    token = (cdf <= uniforms[:, None] * cdf[:, -1:]).sum(-1)
    return token.clamp(max=logits.shape[-1] - 1)


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
    """The second source's captioner: `forward(images, captions)` -> logits (B, T, vocab_size)
    with the decoder cross-attending to the image encoder's tokens (an encoder that takes
    `return_tokens` is asked for them), `generate_caption` for one image, batched `generate`."""

    def __init__(self, image_encoder, text_decoder):
        super().__init__()
        self.image_encoder = image_encoder
        self.text_decoder = text_decoder

    def encode_images(self, images):
        """(B, C, H, W) -> image tokens (B, N, image_width)."""
        if "return_tokens" in inspect.signature(self.image_encoder.forward).parameters:
            return self.image_encoder(images, return_tokens=True)
        x = self.image_encoder(images)
        return x[:, None] if x.ndim == 2 else x

    def forward(self, images, captions):
        image_features = self.encode_images(images)
        outputs = self.text_decoder(input_ids=captions, encoder_hidden_states=image_features)
        return outputs.logits

    @torch.no_grad()
    def generate_caption(self, image, max_length=50):
        """The source's greedy loop for one (C, H, W) image, with the cache: (1, n) ids, `bos`
        first, ending at `eos` or after `max_length` generated tokens."""
        config = self.text_decoder.config
        check_generation_args(max_length, config.max_positions)
        image_features = self.encode_images(image.unsqueeze(0))
        cache = self.text_decoder.init_cache(image_features, max_length)
        generated = torch.tensor([[config.bos_token_id]], device=image.device)
        for _ in range(max_length):
            outputs = self.text_decoder(input_ids=generated[:, -1:], past_key_values=cache)
            next_token = outputs.logits[:, -1, :].argmax(dim=-1, keepdim=True)
            generated = torch.cat([generated, next_token], dim=1)
            if next_token.item() == config.eos_token_id:
                break
        return generated

    @torch.no_grad()
    def generate(self, images, max_length=50, num_beams=1, do_sample=False, temperature=1.0, top_k=0,
                 length_penalty=1.0, min_length=0, uniforms=None, generator=None, use_cache=True):
        """(B, C, H, W) images -> (B, 1 + max_length) ids: greedy, beam search (`num_beams` > 1) or
        sampling (`do_sample`; `uniforms` (B, max_length) in [0, 1), else `torch.rand` from
        `generator`). `eos` is barred before `min_length` generated tokens. `use_cache=False`
        re-runs the decoder over the whole prefix at each step, as the source does. Dropout
        follows the module's mode, as in the source: call `.eval()` first."""
        config = self.text_decoder.config
        check_generation_args(max_length, config.max_positions, num_beams, do_sample, temperature, top_k,
                              min_length, length_penalty)
        B = images.shape[0]
        if do_sample:
            if uniforms is None:
                uniforms = torch.rand((B, max_length), generator=generator, device=images.device)
            if tuple(uniforms.shape) != (B, max_length):
                raise ValueError(f"uniforms must be (B, max_length) = {(B, max_length)}; "
                                 f"got {tuple(uniforms.shape)}")
        image_features = self.encode_images(images)
        if num_beams > 1:
            image_features = image_features.repeat_interleave(num_beams, dim=0)
        tokens = torch.full((image_features.shape[0], max_length + 1), config.pad_token_id,
                            dtype=torch.long, device=images.device)
        tokens[:, 0] = config.bos_token_id
        decoder = self.text_decoder
        cache = decoder.init_cache(image_features, max_length) if use_cache else None

        def next_logits(tokens, t):
            if cache is not None:
                return decoder(tokens[:, t:t + 1], past_key_values=cache).logits[:, -1].float()
            return decoder(tokens[:, :t + 1], image_features).logits[:, -1].float()

        if num_beams > 1:
            return beam_search(next_logits, tokens, B, num_beams, max_length, config, length_penalty,
                               min_length, cache)
        finished = torch.zeros(B, dtype=torch.bool, device=images.device)
        for t in range(max_length):
            logits = next_logits(tokens, t)
            if t < min_length:
                logits[:, config.eos_token_id] = float("-inf")
            if do_sample:
                token = sample_tokens(logits, uniforms[:, t], temperature, top_k)
            else:
                token = logits.argmax(dim=-1)
            token = torch.where(finished, config.pad_token_id, token)
            tokens[:, t + 1] = token
            finished |= token == config.eos_token_id
            if finished.all():
                break
        return tokens


def beam_search(next_logits, tokens, batch_size, num_beams, max_length, config, length_penalty=1.0,
                min_length=0, cache=None):
    """Beam search over K = `num_beams` rows per image (`tokens` (B*K, 1 + max_length), bos first):

    - Live beams carry the sum of their tokens' log-probs; at first only beam 0 (score 0) is live,
      the others score -inf.
    - Step t = 1..max_length: every live beam's score plus the log-softmax of its next logits
      gives K * V candidates, ranked by score with equal scores by the lower flat index
      (beam * V + token); the top 2K are kept.
    - An `eos` candidate ranked below K becomes a finished hypothesis scored
      sum / t ** length_penalty (t generated tokens, eos included). The pool keeps each image's K
      best finished hypotheses: the top K of (pool, new ones in rank order), earlier entries first
      among equal scores.
    - The first K candidates that are not `eos`, in rank order, are the next live beams.
    - An image is done when its pool holds K hypotheses and its best live beam's
      sum / t ** length_penalty is no better than the pool's worst; a done image changes no more.
      The loop stops when every image is done or after max_length steps.
    - Then the live beams of the images not done enter the pool, scored sum / max_length **
      length_penalty. Each image returns its pool's best (the lowest slot among equal scores),
      padded with `pad`.
    """
    B, K, L1 = batch_size, num_beams, tokens.shape[1]
    device = tokens.device
    eos, pad = config.eos_token_id, config.pad_token_id
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0
    pool_tokens = torch.full((B, K, L1), pad, dtype=torch.long, device=device)
    pool_scores = torch.full((B, K), float("-inf"), device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    image_row = torch.arange(B, device=device)[:, None] * K
    same_rows = torch.arange(B * K, device=device)

    def merge(pool_tokens, pool_scores, new_tokens, new_scores):
        order = stable_topk(torch.cat([pool_scores, new_scores], 1), K)[1]
        all_tokens = torch.cat([pool_tokens, new_tokens], 1)
        return all_tokens[torch.arange(B, device=device)[:, None], order], torch.gather(
            torch.cat([pool_scores, new_scores], 1), 1, order)

    for t in range(max_length):
        logp = F.log_softmax(next_logits(tokens, t), dim=-1)
        if t < min_length:
            logp[:, eos] = float("-inf")
        V = logp.shape[-1]
        candidates = (scores.reshape(-1, 1) + logp).reshape(B, K * V)
        top_scores, top_index = stable_topk(candidates, 2 * K)
        source_row = image_row + top_index // V                      # (B, 2K) rows of `tokens`
        token = top_index % V
        is_eos = token == eos
        grown = tokens[source_row]                                    # (B, 2K, L1)
        grown[:, :, t + 1] = token
        finished_ok = is_eos & (torch.arange(2 * K, device=device) < K)
        finished_scores = torch.where(finished_ok, top_scores / (t + 1) ** length_penalty,
                                      torch.tensor(float("-inf"), device=device))
        new_pool_tokens, new_pool_scores = merge(pool_tokens, pool_scores, grown, finished_scores)
        live = torch.sort(is_eos.int(), dim=1, stable=True)[1][:, :K]  # first K non-eos, rank order
        new_scores = torch.gather(top_scores, 1, live)
        new_rows = torch.gather(source_row, 1, live)
        new_tokens = grown[torch.arange(B, device=device)[:, None], live]
        now_done = ((new_pool_scores[:, -1] > float("-inf"))
                    & (new_scores[:, 0] / (t + 1) ** length_penalty <= new_pool_scores[:, -1]))
        keep = done[:, None]
        scores = torch.where(keep, scores, new_scores)
        pool_scores = torch.where(keep, pool_scores, new_pool_scores)
        pool_tokens = torch.where(keep[:, :, None], pool_tokens, new_pool_tokens)
        tokens = torch.where(keep[:, :, None], tokens.reshape(B, K, L1), new_tokens).reshape(B * K, L1)
        if cache is not None:
            cache.reorder(torch.where(keep.expand(B, K).reshape(-1), same_rows, new_rows.reshape(-1)))
        done = done | now_done
        if done.all():
            break
    if not done.all():
        last = torch.where(done[:, None], torch.tensor(float("-inf"), device=device),
                           scores / max_length ** length_penalty)
        pool_tokens, pool_scores = merge(pool_tokens, pool_scores, tokens.reshape(B, K, L1), last)
    best = pool_scores.argmax(dim=1)
    return pool_tokens[torch.arange(B, device=device), best]


def Captioner(image_size=224, patch_size=16, in_channels=3, vision_width=768, vision_layers=12,
              vision_heads=12, vocab_size=50257, max_positions=1024, width=768, layers=12, heads=12,
              mlp_ratio=4, dropout=0.0, bos_token_id=None, eos_token_id=None, pad_token_id=0):
    """An `ImageCaptioningModel` of a ViT image tower (`num_classes=0`, all its tokens) and a
    `TextDecoder`, from plain config values (the presets' entry point)."""
    image = VisionTransformer(image_size, patch_size, in_channels, 0, vision_width, vision_layers,
                              vision_heads, mlp_ratio, dropout)
    text = TextDecoder(vocab_size, max_positions, width, layers, heads, vision_width, mlp_ratio, dropout,
                       bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    return ImageCaptioningModel(image, text)
