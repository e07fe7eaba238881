"""train.contrastive: captions from templates, the pmap step with gathered features equals the jit
step on the whole batch, and a short run writes its summary, tokenizer and weights."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from presets import get_preset
from tokenizer import Tokenizer
from train import contrastive
from train import data as data_lib
from train import steps


def test_captions_use_every_template_and_fit_the_vocabulary():
    labels = np.arange(200) % 10
    texts = contrastive.caption_texts(labels, np.random.default_rng(0))
    assert len(texts) == 200 and any("seven" in t for t in texts) and any(t.endswith(" 7") for t in texts)
    tok = contrastive.digits_tokenizer(16)
    assert tok.vocab_size <= get_preset("clip-digits").kwargs["vocab_size"]
    ids = tok(texts)
    assert not (ids == tok.unk_id).any() and (ids == tok.eot_id).sum() == 200
    batch = contrastive.with_captions({"label": labels[:4]}, tok, 0, 5)
    again = contrastive.with_captions({"label": labels[:4]}, tok, 0, 5)
    assert batch["tokens"].dtype == np.int32 and np.array_equal(batch["tokens"], again["tokens"])


@pytest.mark.skipif(jax.local_device_count() < 8, reason="needs 8 (fake) devices")
def test_pmap_step_on_8_shards_equals_jit_on_whole_batch():
    """One `contrastive_step` under pmap (8 devices x 2 pairs, features gathered) and under jit
    (16 pairs). SGD makes each weight's change its gradient (rate 100, so that the change dwarfs
    the float32 spacing of a weight near 1, e.g. a norm scale); AdamW's first step
    divides every gradient element by its own magnitude, so elements near zero turn rounding
    noise into changes of the order of the rate (see `harness.adamw_trajectories`)."""
    import optax

    import jax_models

    preset = get_preset("clip-digits")
    model = jax_models.create_model(preset)
    tok = contrastive.digits_tokenizer(preset.kwargs["context_length"])
    rs = np.random.RandomState(0)
    batch = contrastive.with_captions({"image": rs.standard_normal((16, 32, 32, 1)).astype(np.float32),
                                       "label": rs.randint(0, 10, 16).astype(np.int32)}, tok, 0, 0)
    batch = {k: batch[k] for k in ("image", "tokens")}
    variables = model.init(jax.random.key(0), batch["image"][:1], batch["tokens"][:1])
    state = steps.create_state(model, variables, optax.sgd(100.0), jax.random.key(1))
    jit_state, jit_m = steps.jit_train_step(contrastive.contrastive_step)(
        jax.tree_util.tree_map(jnp.copy, state), batch)
    pmap_state, pmap_m = steps.pmap_train_step(contrastive.contrastive_step)(
        steps.replicate(state), data_lib.shard(batch, 8))

    def rel(old, a, b):
        change = np.abs(np.asarray(a) - np.asarray(old)).max()
        return float(np.abs(np.asarray(a) - np.asarray(b[0])).max() / max(change, 1e-12))

    err = jax.tree_util.tree_map(rel, state.params, jit_state.params, pmap_state.params)
    worst = max(jax.tree_util.tree_leaves(err))
    print(f"contrastive step, pmap(8) vs jit: worst relative weight-change error {worst:.2e}")
    assert worst <= 1e-5, err
    for k in ("loss", "grad_norm", "logit_scale"):
        np.testing.assert_allclose(pmap_m[k], float(jit_m[k]), rtol=1e-5)
    replicas = jax.tree_util.tree_leaves(pmap_state.params)
    assert all(float(jnp.abs(x - x[0]).max()) == 0.0 for x in replicas)


def test_short_run_writes_summary_tokenizer_and_weights(tmp_path):
    from bridge import load_safetensors

    s = contrastive.train("clip-digits", str(tmp_path), steps_=3, batch_size=32, log_every=1,
                          model_overrides=dict(vision_layers=1, text_layers=1))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary == pytest.approx(s)
    for k in ("zero_shot_accuracy", "image_to_text_recall@1", "text_to_image_recall@1"):
        assert 0.0 <= summary[k] <= 1.0
    assert summary["count"] == 360 and summary["steps"] == 3
    assert Tokenizer.load(tmp_path) == contrastive.digits_tokenizer(16)
    assert "logit_scale" in load_safetensors(tmp_path / "model.safetensors")
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
