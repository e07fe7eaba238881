"""Parity of the captioning twins: forward, gradients, an AdamW trajectory, the source's class, and
generation (greedy, beam search, sampling) token for token between the backends, cached against
uncached, compiled once.

A tiny captioner (16x16 images, 5 image tokens 32 wide projected to a decoder 24 wide, vocabulary
12: pad 0, bos 10, eos 11). Generation tests use "spread" weights (unit-scale, `spread`): GPT-2's
0.02 initialisation gives near-uniform logits whose argmax the two frameworks' rounding may decide
differently; the tests also check the margins the decisions rest on against the forward error.
"""

from __future__ import annotations

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import bridge
import jax_models
import torch_reference
from jax_models import captioning as J
from parity_tests import harness, source_captioning
from twin_models.presets import get_preset, with_overrides
from torch_reference import captioning as T
from torch_reference.vit import VisionTransformer

TINY = dict(image_size=16, patch_size=8, vision_width=32, vision_layers=1, vision_heads=2, vocab_size=12,
            max_positions=8, width=24, layers=2, heads=4)
PAD, BOS, EOS, V = 0, 10, 11, 12
MAX_LENGTH = 7


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The tiny twins gain nothing from a second thread, and on a shared 2-core machine two
    OpenMP threads that wait for each other made 20 torch AdamW steps 12x slower (34 s vs 2.8 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_preset(**overrides):
    return dataclasses.replace(with_overrides(get_preset("caption-scenes"), **{**TINY, **overrides}), image_size=16)


def spread(model: torch.nn.Module, seed: int) -> None:
    """Unit-scale weights: Linear N(0, 1/fan_in), positions and class token N(0, 1), norms
    1 +- 0.1, biases N(0, 0.1^2); the tied token embedding N(0, 0.3^2), so that a token's own
    embedding does not outweigh the blocks (greedy would repeat it). Logits spread over units."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            module = name.split(".")[-2] if "." in name else ""
            if name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif module.startswith(("ln_", "norm")):
                p.copy_(1 + 0.1 * noise)
            elif module == "wte":
                p.copy_(0.3 * noise)
            elif module == "wpe" or name.endswith(("cls_token", "pos_embed")):
                p.copy_(noise)
            else:
                p.copy_(noise / np.sqrt(p[0].numel()))


def images(n, seed):
    x = np.random.RandomState(seed).standard_normal((n, 3, 16, 16)).astype(np.float32)
    return torch.from_numpy(x), jnp.asarray(x.transpose(0, 2, 3, 1))


def captions(rs, n, length=MAX_LENGTH):
    """bos, 1..length-2 words (ids 1..9), eos, then pad."""
    out = np.full((n, length), PAD, np.int64)
    for row in out:
        k = rs.randint(1, length - 1)
        row[: k + 2] = [BOS, *rs.randint(1, BOS, size=k), EOS]
    return out


def batches(n, batch_size, seed):
    rs = np.random.RandomState(seed)
    tb, fb = [], []
    for i in range(n):
        xt, xf = images(batch_size, seed * 100 + i)
        c = captions(rs, batch_size)
        tb.append((xt, torch.from_numpy(c)))
        fb.append((xf, jnp.asarray(c, jnp.int32)))
    return tb, fb


def twins(seed=0, spread_seed=None, **overrides):
    preset = tiny_preset(**overrides)
    torch.manual_seed(seed)
    tm = torch_reference.create_model(preset).eval()
    if spread_seed is not None:
        spread(tm, spread_seed)
    fm = jax_models.create_model(preset)
    _, fb = batches(1, 2, 0)
    variables = bridge.torch_to_flax(tm.state_dict(), fm, *fb[0])
    return tm, fm, variables


def losses(fm):
    apply = jax.jit(fm.apply)   # one compiled forward (and backward) instead of op by op

    def torch_loss(model, batch):
        x, c = batch
        return T.caption_loss(model(x, c), c, PAD)

    def flax_loss(params, variables, batch):
        x, c = batch
        return J.caption_loss(apply({**variables, "params": params}, x, c), c, PAD)

    return torch_loss, flax_loss


def test_forward_and_cached_decoder():
    """Logits of both twins agree; in each, the decoder fed one token at a time through its cache
    gives the logits of the whole sequence at once."""
    tm, fm, variables = twins()
    (tbatch,), (fbatch,) = batches(1, 4, 1)
    err = harness.forward_error(tm, types.SimpleNamespace(apply=jax.jit(fm.apply)), variables, tbatch, fbatch)
    print(f"forward rel err {err:.2e}")
    assert err <= harness.FORWARD_TOL

    xt, ct = tbatch
    with torch.no_grad():
        enc = tm.encode_images(xt)
        whole = tm.text_decoder(ct, enc)
        cache = tm.text_decoder.init_cache(enc, MAX_LENGTH)
        steps = torch.cat([tm.text_decoder(ct[:, i:i + 1], past_key_values=cache).logits
                           for i in range(MAX_LENGTH)], 1)
    assert whole.past_key_values is None and cache.index == MAX_LENGTH
    t_err = harness.rel_err(whole.logits.numpy(), steps.numpy())

    xf, cf = fbatch
    dec, decode = fm.text_decoder, jax.jit(fm.text_decoder.apply)
    enc_f = fm.apply(variables, xf, method=J.ImageCaptioningModel.encode_images)
    dvars = {"params": variables["params"]["text_decoder"]}
    cache = dec.apply(dvars, enc_f, MAX_LENGTH, method=J.TextDecoder.init_cache)
    outs = []
    for i in range(MAX_LENGTH):
        out = decode(dvars, cf[:, i:i + 1], past_key_values=cache)
        outs.append(out.logits)
        cache = out.past_key_values
    assert int(cache.index) == MAX_LENGTH
    f_err = harness.rel_err(decode(dvars, cf, enc_f).logits, jnp.concatenate(outs, 1))
    print(f"cached vs whole-sequence logits: torch {t_err:.2e}, jax {f_err:.2e}")
    assert t_err <= harness.FORWARD_TOL and f_err <= harness.FORWARD_TOL


@pytest.mark.slow
def test_gradients():
    """The twins' gradients (slow: test_presets.py holds every gradient leaf of caption-scenes, float32
    and float64, in the default run)."""
    tm, fm, variables = twins()
    (tbatch,), (fbatch,) = batches(1, 4, 2)
    errs, loss_t, loss_f = harness.gradient_errors(tm, fm, variables, *losses(fm), tbatch, fbatch)
    worst = max(errs, key=errs.get)
    print(f"loss {loss_t:.4f} vs {loss_f:.4f}; worst gradient {worst} {errs[worst]:.2e} of {len(errs)} leaves")
    assert abs(loss_t - loss_f) <= harness.FORWARD_TOL * abs(loss_t)
    assert errs[worst] <= harness.GRAD_TOL, f"gradient of {worst} rel err {errs[worst]:.3e}"


@pytest.mark.parametrize("float64", [False, True], ids=["float32", "float64"])
def test_adamw_trajectory(float64):
    """20 AdamW steps over 4 fixed batches: losses agree in float32, final weights in float64."""
    tm, fm, variables = twins()
    tb, fb = batches(4, 8, 3)
    harness.check_trajectory(tm, fm, variables, losses(fm), tb * 5, fb * 5,
                             f"captioner ({'float64' if float64 else 'float32'})", lr=1e-3, weight_decay=0.05,
                             float64=float64, falls=True)


def test_names_follow_gpt2_and_round_trip_is_bit_exact():
    """Decoder keys are HF GPT-2's (a rename and a transpose away), the LM head is `wte` itself,
    `image_proj` exists only when the image width differs, and torch -> flax -> torch is exact."""
    tm, _, variables = twins()
    sd = {k: v.numpy() for k, v in tm.state_dict().items()}
    back = bridge.flax_to_torch(variables)
    assert set(back) == set(sd) and all(np.array_equal(back[k], sd[k]) for k in sd)
    dec = {k[len("text_decoder."):] for k in sd if k.startswith("text_decoder.")}
    block = {f"h.0.{m}.{p}" for m in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_cross_attn",
                                      "crossattention.q_attn", "crossattention.c_attn",
                                      "crossattention.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
             for p in ("weight", "bias")}
    top = {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias", "image_proj.weight", "image_proj.bias"}
    assert dec == top | block | {k.replace("h.0.", "h.1.") for k in block}
    assert sd["text_decoder.h.0.crossattention.c_attn.weight"].shape == (48, 24)   # fused k, v
    same = T.TextDecoder(V, 8, 32, 1, 4, image_width=32)
    assert not any(k.startswith("image_proj") for k in same.state_dict())


def test_twins_take_the_same_arguments():
    """Every module class has its twin, with the same constructor arguments and defaults (Flax
    adds only `attention_impl`, last), and the factories agree."""
    import inspect

    for name in ("CausalSelfAttention", "CrossAttention", "MLP", "Block", "TextDecoder", "ImageCaptioningModel"):
        torch_args = [(k, p.default) for k, p in inspect.signature(getattr(T, name)).parameters.items()]
        fields = [f for f in dataclasses.fields(getattr(J, name)) if f.name not in ("parent", "name")]
        flax_args = [(f.name, f.default if f.default is not dataclasses.MISSING else inspect.Parameter.empty)
                     for f in fields if f.name != "attention_impl"]
        assert torch_args == flax_args, name
        assert all(f.name != "attention_impl" for f in fields) or fields[-1].name == "attention_impl", name
    torch_factory = list(inspect.signature(T.Captioner).parameters.items())
    flax_factory = list(inspect.signature(J.Captioner).parameters.items())
    assert torch_factory == flax_factory[:-1] and flax_factory[-1][0] == "attention_impl"


def test_source_class_loads_strictly_and_its_uncached_decode_agrees():
    """The source's ImageCaptioningModel over our ViT (asked for its tokens) and TextDecoder: our
    state dict loads with strict=True, the logits are equal, and its uncached `generate_caption`
    (the whole prefix re-run each step) gives the tokens of our cached one."""
    class TokenViT(VisionTransformer):
        def forward(self, x):
            return super().forward(x, return_tokens=True)

    tm, _, _ = twins(spread_seed=5)
    src = source_captioning.ImageCaptioningModel(TokenViT(16, 8, 3, 0, 32, 1, 2, dropout=0.0),
                                                 T.TextDecoder(V, 8, 24, 2, 4, image_width=32)).eval()
    src.load_state_dict(tm.state_dict(), strict=True)
    (xt, ct), = batches(1, 4, 4)[0]
    with torch.no_grad():
        torch.testing.assert_close(src(xt, ct), tm(xt, ct), rtol=0, atol=0)
        lengths = []
        for x in xt:
            ours, theirs = tm.generate_caption(x, MAX_LENGTH), src.generate_caption(x, MAX_LENGTH)
            assert torch.equal(ours, theirs)
            lengths.append(ours.shape[1])
    print(f"caption lengths {lengths}")


def margins(tm, xt, tokens, finished_before, temperature=None, top_k=0, uniforms=None):
    """Over the decisions that made `tokens` (torch logits of the whole sequence, uncached), the
    smallest gap relative to the largest logit: top-1 minus top-2 (greedy) or, for sampling, the
    distance of u * cdf[-1] to the nearest cdf value."""
    with torch.no_grad():
        logits = tm(xt, tokens[:, :-1]).double()
    gaps = []
    for b in range(tokens.shape[0]):
        for t in range(tokens.shape[1] - 1):
            if finished_before[b, t]:
                continue
            row = logits[b, t]
            if uniforms is None:
                top2 = row.topk(2).values
                gaps.append(float(top2[0] - top2[1]) / float(row.abs().max()))
            else:
                scaled = row / temperature
                if top_k:
                    scaled = torch.where(scaled >= scaled.topk(top_k).values[-1], scaled, -torch.inf)
                cdf = scaled.softmax(-1).cumsum(-1)
                gaps.append(float((cdf - uniforms[b, t] * cdf[-1]).abs().min()))
    return min(gaps)


def ended(tokens):
    """(B, L) bool: True where the sequence had ended before that step's token (eos earlier)."""
    seen = np.cumsum(np.asarray(tokens)[:, 1:] == EOS, axis=1)
    return np.concatenate([np.zeros((len(seen), 1), int), seen[:, :-1]], 1) > 0


@pytest.mark.parametrize("num_beams", [1, 3], ids=["greedy", "beam3"])
def test_decodes_equal_across_backends_and_with_without_cache(num_beams):
    """Greedy and beam search: the same tokens in torch and JAX, cached and uncached."""
    tm, fm, variables = twins(spread_seed=2)
    xt, xf = images(6, 7)
    kw = dict(num_beams=num_beams, length_penalty=0.8)
    got = {"torch": tm.generate(xt, MAX_LENGTH, **kw).numpy(),
           "torch uncached": tm.generate(xt, MAX_LENGTH, use_cache=False, **kw).numpy(),
           "jax": np.asarray(J.generate(fm, variables, xf, MAX_LENGTH, **kw)),
           "jax uncached": np.asarray(J.generate(fm, variables, xf, MAX_LENGTH, use_cache=False, **kw))}
    ref = got["torch"]
    print(f"num_beams={num_beams}:\n{ref}")
    for name, tokens in got.items():
        np.testing.assert_array_equal(tokens, ref, err_msg=name)
    assert ref.shape == (6, MAX_LENGTH + 1) and (ref[:, 0] == BOS).all()
    after_eos = ended(ref)
    assert (ref[:, 1:][after_eos] == PAD).all()
    assert 0 < (ref == EOS).any(1).sum() < 6, "some captions should end early and some run to max_length"
    if num_beams == 1:
        gap = margins(tm, xt, torch.from_numpy(ref), after_eos)
        print(f"smallest top-1 - top-2 logit gap / max |logit|: {gap:.2e}")
        assert gap > 10 * harness.FORWARD_TOL
    else:
        greedy = tm.generate(xt, MAX_LENGTH).numpy()
        assert (greedy != ref).any(), "beam search should differ from greedy on some image"


def test_beam_search_is_exhaustive_with_enough_beams():
    """With V**2 beams and max_length 2, every sequence is a hypothesis: beam search returns the
    sequence of the best sum of log-probs / length ** length_penalty over all of them."""
    tm, fm, variables = twins(spread_seed=2)
    xt, xf = images(2, 8)
    lp = 0.5
    K = V * V
    got_t = tm.generate(xt, 2, num_beams=K, length_penalty=lp).numpy()
    got_f = np.asarray(J.generate(fm, variables, xf, 2, num_beams=K, length_penalty=lp))
    np.testing.assert_array_equal(got_f, got_t)
    with torch.no_grad():
        for b in range(2):
            first = tm(xt[b:b + 1], torch.tensor([[BOS]])).double().log_softmax(-1)[0, 0]
            scored = {(EOS,): float(first[EOS])}
            for w in range(V):
                if w != EOS:
                    second = tm(xt[b:b + 1], torch.tensor([[BOS, w]])).double().log_softmax(-1)[0, 1]
                    scored.update({(w, u): float(first[w] + second[u]) / 2 ** lp for u in range(V)})
            ranked = sorted(scored, key=scored.get, reverse=True)
            best = [BOS, *ranked[0]] + [PAD] * (2 - len(ranked[0]))
            print(f"image {b}: best {ranked[0]} {scored[ranked[0]]:.4f}, next {scored[ranked[1]]:.4f}")
            assert scored[ranked[0]] - scored[ranked[1]] > 1e-4
            assert got_t[b].tolist() == best


@pytest.mark.parametrize("top_k", [0, 4])
def test_sampling_equal_given_the_same_draws(top_k):
    tm, fm, variables = twins(spread_seed=3)
    xt, xf = images(6, 9)
    u = np.random.RandomState(top_k).uniform(size=(6, MAX_LENGTH)).astype(np.float32)
    kw = dict(do_sample=True, temperature=1.5, top_k=top_k)
    ref = tm.generate(xt, MAX_LENGTH, uniforms=torch.from_numpy(u), **kw).numpy()
    got = np.asarray(J.generate(fm, variables, xf, MAX_LENGTH, uniforms=jnp.asarray(u), **kw))
    uncached = tm.generate(xt, MAX_LENGTH, uniforms=torch.from_numpy(u), use_cache=False, **kw).numpy()
    print(f"top_k={top_k}:\n{ref}")
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(uncached, ref)
    gap = margins(tm, xt, torch.from_numpy(ref), ended(ref), 1.5, top_k, torch.from_numpy(u).double())
    print(f"smallest distance of a draw to a cdf step: {gap:.2e}")
    assert gap > 1e-5
    again = np.asarray(J.generate(fm, variables, xf, MAX_LENGTH, rng=jax.random.key(0), **kw))
    assert again.shape == ref.shape and (again[:, 0] == BOS).all()


def test_sampling_draws_from_the_filtered_distribution():
    """One image, n evenly spaced draws, one step: each token is drawn n * p_i times to within one,
    p the softmax of logits / temperature over the top_k, in both backends."""
    tm, fm, variables = twins(spread_seed=4)
    n, temperature, top_k = 400, 0.7, 5
    xt, xf = images(1, 10)
    u = (np.arange(n) + 0.5) / n
    with torch.no_grad():
        logits = tm(xt, torch.tensor([[BOS]]))[0, 0].double() / temperature
    keep = logits.argsort(descending=True)[:top_k]
    p = torch.zeros(V, dtype=torch.float64)
    p[keep] = logits[keep].softmax(-1)
    kw = dict(do_sample=True, temperature=temperature, top_k=top_k)
    drawn_t = tm.generate(xt.expand(n, -1, -1, -1), 1, uniforms=torch.tensor(u[:, None], dtype=torch.float32),
                          **kw)[:, 1].numpy()
    drawn_f = np.asarray(J.generate(fm, variables, jnp.broadcast_to(xf, (n, 16, 16, 3)), 1,
                                    uniforms=jnp.asarray(u[:, None], jnp.float32), **kw))[:, 1]
    np.testing.assert_array_equal(drawn_f, drawn_t)
    counts = np.bincount(drawn_t, minlength=V)
    print(f"counts {counts.tolist()}, expected {np.round(n * p.numpy(), 1).tolist()}")
    assert np.all(np.abs(counts - n * p.numpy()) <= 1.0)
    assert (counts[p.numpy() == 0] == 0).all()
    assert (np.diff(drawn_t) >= 0).all(), "the inverse CDF is monotone in the draw"


def _sub_jaxprs(params):
    for v in params.values():
        for x in v if isinstance(v, (tuple, list)) else [v]:
            if isinstance(x, jax.extend.core.ClosedJaxpr):
                yield x.jaxpr
            elif isinstance(x, jax.extend.core.Jaxpr):
                yield x


def _eqns(jaxpr):
    for e in jaxpr.eqns:
        yield e
        for sub in _sub_jaxprs(e.params):
            yield from _eqns(sub)


def _loop_body_and_rest(jaxpr):
    """(equations inside the while loop's body, equations outside any while loop)."""
    inside, outside = [], []

    def walk(j, in_loop):
        for e in j.eqns:
            (inside if in_loop else outside).append(e)
            subs = [e.params["body_jaxpr"].jaxpr] if e.primitive.name == "while" else list(_sub_jaxprs(e.params))
            for sub in subs:
                walk(sub, in_loop or e.primitive.name == "while")

    walk(jaxpr, False)
    return inside, outside


def test_compiled_once_encoder_and_cross_keys_outside_the_loop():
    """New images and new weights reuse the compiled decode (no trace, no lowering); a new setting
    compiles once. The image encoder and the cross-attention keys and values run before the loop:
    no convolution and no projection of the image tokens inside its body (the uncached decode,
    which re-runs the decoder, has the projection there)."""
    tm, fm, v1 = twins(spread_seed=1)
    _, _, v2 = twins(seed=1, spread_seed=2)
    _, x1 = images(6, 11)
    _, x2 = images(6, 12)
    events = []

    def listen(name, *_, **__):
        if name in ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration"):
            events.append(name)

    J.generate(fm, v1, x1, MAX_LENGTH).block_until_ready()
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        a = J.generate(fm, v2, x2, MAX_LENGTH)
        b = J.generate(fm, v1, x2, MAX_LENGTH, min_length=3)
        c = J.generate(fm, v2, x1, MAX_LENGTH, length_penalty=2.0)
        jax.block_until_ready((a, b, c))
        reused = len(events)
        J.generate(fm, v1, x1, MAX_LENGTH, num_beams=2).block_until_ready()
        J.generate(fm, v2, x2, MAX_LENGTH, num_beams=2).block_until_ready()
        new_setting = events.count("/jax/core/compile/jaxpr_to_mlir_module_duration")
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    print(f"traces/lowerings for new images and weights: {reused}; lowerings for num_beams=2 (twice): {new_setting}")
    assert reused == 0 and new_setting == 1
    assert not (np.asarray(b)[:, 1:4] == EOS).any()

    def program(use_cache):
        return jax.make_jaxpr(lambda v, x: fm.apply(v, x, MAX_LENGTH, use_cache=use_cache,
                                                    method=J.ImageCaptioningModel.generate))(v1, x1).jaxpr

    def projects(eqns, widths):
        """A matmul of the 5 image tokens, raw (32 wide) or projected to the decoder (24)."""
        return any(e.primitive.name == "dot_general" and any(tuple(i.aval.shape[-2:]) in [(5, w) for w in widths]
                                                            for i in e.invars) for e in eqns)

    for use_cache in (True, False):
        inside, outside = _loop_body_and_rest(program(use_cache))
        assert any(e.primitive.name == "while" for e in outside)
        assert any(e.primitive.name == "conv_general_dilated" for e in outside)
        assert not any(e.primitive.name == "conv_general_dilated" for e in inside)
        assert projects(inside, (32, 24)) == (not use_cache)
        assert projects(outside, (24,)) == use_cache


def test_generate_caption_agrees_with_generate():
    """The torch twin's `generate_caption` (the source's loop, cached) and JAX's give the row of
    `generate` at batch 1, cut after eos."""
    tm, fm, variables = twins(spread_seed=2)
    xt, xf = images(4, 13)
    for b in range(4):
        row = tm.generate(xt[b:b + 1], MAX_LENGTH)[0].numpy()
        cap_t = tm.generate_caption(xt[b], MAX_LENGTH).numpy()
        cap_f = J.generate_caption(fm, variables, xf[b], MAX_LENGTH)
        n = cap_t.shape[1]
        np.testing.assert_array_equal(cap_f, cap_t)
        np.testing.assert_array_equal(cap_t[0], row[:n])
        assert (row[n:] == PAD).all() and (cap_t[0, -1] == EOS or n == MAX_LENGTH + 1)


def test_bad_input_is_a_clear_value_error():
    tm, fm, variables = twins()
    xt, xf = images(2, 14)
    bad_size_t, bad_size_f = torch.zeros(2, 3, 24, 24), jnp.zeros((2, 24, 24, 3))
    cases = [(dict(max_length=0), r"max_length must be an int in \[1, 8\]"),
             (dict(max_length=9), r"max_length must be an int in \[1, 8\]"),
             (dict(num_beams=0), "num_beams must be an int >= 1"),
             (dict(do_sample=True, temperature=0.0), "temperature must be a positive finite number"),
             (dict(top_k=-1), "top_k must be an int >= 0"),
             (dict(do_sample=True, num_beams=2), "beam sampling"),
             (dict(min_length=9), "min_length must be")]
    for kw, match in cases:
        kw = {"max_length": 4, **kw}
        with pytest.raises(ValueError, match=match):
            tm.generate(xt, **kw)
        with pytest.raises(ValueError, match=match):
            J.generate(fm, variables, xf, rng=jax.random.key(0), **kw)
    with pytest.raises(ValueError, match=r"\(B, 3, 16, 16\) floating-point images"):
        tm.generate(bad_size_t, 4)
    with pytest.raises(ValueError, match=r"\(B, 16, 16, 3\) floating-point images"):
        J.generate(fm, variables, bad_size_f, 4)
    with pytest.raises(ValueError, match=r"uniforms must be \(B, max_length\)"):
        tm.generate(xt, 4, do_sample=True, uniforms=torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"uniforms must be \(B, max_length\)"):
        J.generate(fm, variables, xf, 4, do_sample=True, uniforms=jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="integer ids"):
        tm.text_decoder(torch.zeros(2, 9, dtype=torch.long), torch.zeros(2, 5, 32))
    with pytest.raises(ValueError, match=r"image tokens \(B, N, 32\)"):
        tm.text_decoder(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 5, 24))
    dvars = {"params": variables["params"]["text_decoder"]}
    with pytest.raises(ValueError, match="integer ids"):
        fm.text_decoder.apply(dvars, jnp.zeros((2, 9), jnp.int32), jnp.zeros((2, 5, 32)))
    with pytest.raises(ValueError, match=r"image tokens \(B, N, 32\)"):
        fm.text_decoder.apply(dvars, jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 5, 24)))
    with pytest.raises(ValueError, match="eos_token_id 12 is not an id below vocab_size 12"):
        T.TextDecoder(V, 8, 24, 1, 4, eos_token_id=12)


def test_dropout_only_in_training_with_rng():
    """The decoder's dropout acts only with train=True and a 'dropout' rng (an "rbg" key: threefry's
    dropout masks took 16 s to compile here)."""
    _, fm, variables = twins(dropout=0.5)
    dec, dvars = fm.text_decoder, {"params": variables["params"]["text_decoder"]}
    c = jnp.asarray(captions(np.random.RandomState(0), 2), jnp.int32)
    enc = jnp.ones((2, 5, 32))
    apply = jax.jit(lambda *a, **k: dec.apply(*a, **k).logits, static_argnames="train")
    plain = apply(dvars, c, enc)
    a = apply(dvars, c, enc, train=True, rngs={"dropout": jax.random.key(1, impl="rbg")})
    b = apply(dvars, c, enc, train=True, rngs={"dropout": jax.random.key(2, impl="rbg")})
    np.testing.assert_array_equal(plain, apply(dvars, c, enc))
    assert not np.allclose(a, plain) and not np.allclose(a, b)
    with pytest.raises(Exception, match="dropout"):
        dec.apply(dvars, c, enc, train=True)
