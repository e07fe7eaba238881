"""What is CLIP's own: the sources' state dicts, the text tower's causality and pooling, the
tokenizer, zero-shot classification, and the loss gathered over devices (pmap and gloo). Forward,
gradients and trajectories of the presets are in `test_presets.py`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp
import jax_models
import torch_reference
from bridge.verify import build_twins
from jax_models import clip as jclip
from parity_tests import harness, source_architectures, source_multimodal
from twin_models.presets import get_preset, with_overrides
from twin_models.tokenizer import EOT, PAD, SOT, UNK, Tokenizer
from torch_reference import clip as tclip
from train.tasks import get_task

def clip_batches(preset, n, batch_size, seed=0):
    """`n` batches of N(0, 1) images and random token rows: (torch batches NCHW, flax batches NHWC)."""
    return get_task(preset).parity.batches(preset, n, batch_size, seed)


def twins(name, batch_size=4, seed=0, **overrides):
    preset = with_overrides(get_preset(name), **overrides)
    tm, fm, variables, tin, fin = build_twins(preset, seed, batch_size=batch_size)
    return preset, tm, fm, variables, tin, fin


def test_logits_are_symmetric_and_the_scale_starts_at_one_over_temperature():
    _, tm, fm, variables, tbatch, fbatch = twins("clip-digits")
    lpi, lpt = fm.apply(variables, *fbatch)
    np.testing.assert_array_equal(lpt, lpi.T)
    assert float(variables["params"]["logit_scale"]) == pytest.approx(np.log(1 / 0.07), rel=1e-7)
    assert {"logit_scale", "image_projection.weight", "text_projection.bias",
            "text_encoder.token_embedding.weight", "text_encoder.positional_embedding",
            "text_encoder.blocks.1.attn.qkv.weight", "text_encoder.ln_final.weight",
            "image_encoder.blocks.2.mlp.3.weight"} <= set(tm.state_dict())


def _encoders(preset):
    k = preset.kwargs
    image = torch_reference.vit.VisionTransformer(k["image_size"], k["patch_size"], k["in_channels"], 0,
                                                  k["vision_width"], k["vision_layers"], k["vision_heads"])
    text = tclip.TextTransformer(k["vocab_size"], k["context_length"], k["text_width"], k["text_layers"],
                                 k["text_heads"])
    return image, text


def test_source_state_dicts_load_strictly():
    """The sources' CLIPModel / CLIPFromScratch over our encoders: their state dicts load into ours
    with strict=True and give the same logits and loss."""
    preset = get_preset("clip-digits")
    (x, t), = clip_batches(preset, 1, 4)[0]
    src = source_architectures.CLIPModel(*_encoders(preset), embed_dim=64).eval()
    ours = torch_reference.create_model(preset).eval()
    ours.load_state_dict(src.state_dict(), strict=True)
    with torch.no_grad():
        for a, b in zip(ours(x, t), src(x, t)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(ours.contrastive_loss(x, t), src.contrastive_loss(x, t), rtol=0, atol=0)

    src = source_multimodal.CLIPFromScratch(*_encoders(preset), embed_dim=64).eval()
    scratch = tclip.CLIPFromScratch(*_encoders(preset), embed_dim=64).eval()
    scratch.load_state_dict(src.state_dict(), strict=True)
    ours.load_state_dict(src.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(scratch(x, t), src(x, t), rtol=0, atol=0)
        torch.testing.assert_close(ours.contrastive_loss(x, t), src(x, t), rtol=0, atol=0)


def test_encoders_with_only_output_dim_are_accepted():
    class Features(torch.nn.Module):
        output_dim = 5

        def forward(self, x):
            return x.flatten(1)[:, :5]

    model = tclip.CLIPModel(Features(), Features(), embed_dim=3)
    assert model.image_projection.in_features == 5
    lpi, lpt = model(torch.randn(2, 1, 4, 4), torch.randn(3, 7))
    assert lpi.shape == (2, 3) and lpt.shape == (3, 2)


def test_text_tower_is_causal_and_pools_at_end_of_text():
    """Tokens after the end-of-text token change nothing, in both frameworks, and a row shorter
    than the context gives the feature its padded twin gives."""
    _, tm, fm, variables, _, _ = twins("clip-digits")
    V = get_preset("clip-digits").kwargs["vocab_size"]
    t = np.array([[V - 2, 5, 9, V - 1, 0, 0, 0, 0], [V - 2, 7, V - 1, 0, 0, 0, 0, 0]])
    t2 = t.copy()
    t2[:, 4:] = 3
    variables_text = {"params": variables["params"]["text_encoder"]}
    ft = lambda a: np.asarray(fm.text_encoder.apply(variables_text, jnp.asarray(a, jnp.int32)))
    with torch.no_grad():
        tt = lambda a: tm.text_encoder(torch.from_numpy(a)).numpy()
        np.testing.assert_allclose(tt(t), tt(t2), rtol=0, atol=1e-6)
        full = np.zeros((2, 16), np.int64)
        full[:, :8] = t
        np.testing.assert_allclose(tt(t), tt(full), rtol=0, atol=1e-6)
        assert harness.rel_err(tt(t), ft(t)) <= harness.FORWARD_TOL
    np.testing.assert_allclose(ft(t), ft(t2), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="integer token ids"):
        tm.text_encoder(torch.zeros(2, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="integer token ids"):
        fm.text_encoder.apply(variables_text, jnp.zeros((2, 4)))


def test_tokenizer(tmp_path):
    tok = Tokenizer.from_texts(["a photo of the number seven", "a handwritten 7.", "the number 7"],
                               context_length=6)
    assert tok.vocab[:2] == [PAD, UNK] and tok.vocab[-2:] == [SOT, EOT]
    assert tok.eot_id == tok.vocab_size - 1 and tok.sot_id == tok.vocab_size - 2
    assert tok.vocab[2:5] == ["7", "a", "number"]          # most frequent first, ties alphabetical
    ids = tok(["a handwritten 7", "A Zebra!"])
    assert ids.shape == (2, 6) and ids.dtype == np.int64
    assert list(ids[0]) == [tok.sot_id, tok.ids["a"], tok.ids["handwritten"], tok.ids["7"], tok.eot_id, 0]
    assert list(ids[1]) == [tok.sot_id, tok.ids["a"], tok.unk_id, tok.unk_id, tok.eot_id, 0]
    long = tok("a photo of the number seven")[0]           # 6 words cut to 4, eot kept last
    assert list(long) == [tok.sot_id, *[tok.ids[w] for w in "a photo of the".split()], tok.eot_id]
    assert (ids.argmax(-1) == [4, 4]).all() and long.argmax() == 5
    assert tok.decode(ids[0]) == "a handwritten 7" and tok.decode(ids[1]) == f"a {UNK} {UNK}"
    path = tok.save(tmp_path)
    assert path.endswith("tokenizer.json")
    again = Tokenizer.load(tmp_path)
    assert again == tok and np.array_equal(again(["a zebra 7"]), tok(["a zebra 7"]))
    with pytest.raises(ValueError, match="special tokens"):
        Tokenizer(["cat", EOT])
    with pytest.raises(ValueError, match="no room"):
        Tokenizer(["cat"], context_length=1)


def test_zero_shot_classify_batched_with_prompt_ensembling():
    preset, tm, fm, variables, _, _ = twins("clip-digits")
    names = ["zero", "one", "two"]
    templates = ["a photo of the number {}", "a handwritten {}", "{}"]
    tok = Tokenizer.from_texts([t.format(n) for n in names for t in templates], context_length=16)
    images = torch.randn(7, 1, 32, 32)
    tm.eval()
    probs = tclip.zero_shot_classify(tm, images, names, templates, tokenizer=tok, batch_size=3)
    assert probs.shape == (7, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(7))
    whole = tclip.zero_shot_classify(tm, images, names, templates, tokenizer=tok, batch_size=100)
    torch.testing.assert_close(probs, whole, rtol=0, atol=1e-6)
    with torch.no_grad():   # the ensemble by hand: mean of each class's normalized prompt embeddings
        emb = torch.stack([tm.encode_text(torch.from_numpy(tok([t.format(n) for t in templates]))).mean(0)
                           for n in names])
        emb = emb / emb.norm(dim=-1, keepdim=True)
        ref = (tm.logit_scale.exp() * tm.encode_image(images) @ emb.t()).softmax(-1)
    torch.testing.assert_close(probs, ref, rtol=1e-5, atol=1e-6)
    flax_probs = jclip.zero_shot_classify(fm, variables, jnp.asarray(images.numpy().transpose(0, 2, 3, 1)),
                                          names, templates, tokenizer=tok, batch_size=4)
    assert harness.rel_err(probs.numpy(), flax_probs) <= harness.FORWARD_TOL


@pytest.mark.slow   # the default run holds one contrastive step on 8 devices equal to jit: test_parallel
@pytest.mark.skipif(jax.local_device_count() < 8, reason="needs 8 (fake) devices; conftest sets "
                    "XLA_FLAGS=--xla_force_host_platform_device_count=8")
def test_pmap_gathered_loss_and_gradients_equal_jit_on_whole_batch():
    """Each of 8 devices holds 2 pairs; with features gathered over the device axis the mean loss
    and the pmean of the gradients equal the loss and gradient of the 16-pair batch under jit.
    Without the gather (negatives from the device's own pairs only) they do not."""
    preset = get_preset("clip-digits")
    fm = jax_models.create_model(preset)
    (x, t), = clip_batches(preset, 1, 16, seed=3)[1]
    params = fm.init(jax.random.key(0), x[:1], t[:1])["params"]

    def loss(params, x, t, axis_name=None):
        return jclip.contrastive_loss(*fm.apply({"params": params}, x, t, method=jclip.CLIPModel.features),
                                      axis_name)

    def model_loss(params, x, t):
        return jclip.clip_loss(*fm.apply({"params": params}, x, t))

    def per_device(axis_name, gather=True):
        def fn(params, x, t):
            value, grads = jax.value_and_grad(loss)(params, x, t, axis_name if gather else None)
            return jax.lax.pmean((value, grads), axis_name)
        return jax.pmap(fn, axis_name=axis_name, in_axes=(None, 0, 0))

    shard = lambda a: a.reshape(8, 2, *a.shape[1:])
    jit_loss, jit_grads = jax.jit(jax.value_and_grad(loss))(params, x, t)
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(model_loss))(params, x, t)
    p_loss, p_grads = per_device("devices")(params, shard(x), shard(t))
    n_loss, _ = per_device("devices", gather=False)(params, shard(x), shard(t))

    def worst(a, b):
        errs = jax.tree_util.tree_map(lambda r, g: harness.rel_err(r, g), a, b)
        return max(jax.tree_util.tree_leaves(errs))

    assert float(jit_loss) == pytest.approx(float(ref_loss), rel=1e-6)
    assert worst(ref_grads, jit_grads) <= 1e-6
    assert np.all(np.asarray(p_loss) == p_loss[0])
    loss_err = abs(float(p_loss[0]) - float(jit_loss)) / float(jit_loss)
    grad_err = worst(jit_grads, jax.tree_util.tree_map(lambda g: g[0], p_grads))
    print(f"pmap(8) vs jit: loss rel err {loss_err:.2e}, worst gradient rel err {grad_err:.2e}")
    assert loss_err <= 1e-6 and grad_err <= 1e-5
    assert float(n_loss[0]) < float(jit_loss) - 0.5, "the gather should bring 14 more negatives per row"


def test_torch_distributed_gathered_loss_equals_whole_batch(tmp_path):
    """The torch twin on 4 gloo ranks of 2 pairs each: the mean loss and the all-reduced mean
    gradients equal the loss and gradients of the 8-pair batch in one process."""
    import torch.multiprocessing as mp

    from parity_tests import _clip_dist_worker

    preset, world = get_preset("clip-digits"), 4
    tm = torch_reference.create_model(preset)
    (x, t), = clip_batches(preset, 1, 2 * world, seed=5)[0]
    np.savez(tmp_path / "inputs.npz", images=x.numpy(), tokens=t.numpy(),
             **{f"kw_{k}": v for k, v in preset.kwargs.items()},
             **{f"sd_{k}": v.numpy() for k, v in tm.state_dict().items()})
    mp.spawn(_clip_dist_worker.run, nprocs=world, join=True,
             args=(world, str(tmp_path / "init"), str(tmp_path / "inputs.npz"), str(tmp_path)))
    got = np.load(tmp_path / "grads.npz")
    loss = tclip.clip_loss(*tm(x, t))
    loss.backward()
    loss_err = abs(float(got["loss"]) - loss.item()) / loss.item()
    errs = {k: harness.rel_err(p.grad.numpy(), got[k]) for k, p in tm.named_parameters()}
    worst = max(errs, key=errs.get)
    print(f"torch gloo({world}) vs one process: loss rel err {loss_err:.2e}, worst gradient {worst} "
          f"{errs[worst]:.2e}")
    assert loss_err <= 1e-6 and errs[worst] <= 1e-5
    assert tclip.contrastive_loss(*tm.features(x, t)).item() == pytest.approx(loss.item(), rel=1e-6)
