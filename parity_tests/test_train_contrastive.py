"""train.contrastive: captions from templates, the pmap step with gathered features equals the jit
step on the whole batch, the torch step follows the JAX one, and short runs of both backends write
their summary, tokenizer and weights and resume."""


import jax
import numpy as np
import pytest

from twin_models.presets import get_preset
from twin_models.tokenizer import Tokenizer
from train.tasks import contrastive
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


TINY = dict(vision_layers=1, text_layers=1)


def _config(workdir, backend="jax", **kw):
    from train.loop import Config
    kw = {"steps": 4, **kw}
    return Config(preset="clip-digits", backend=backend, batch_size=32, log_every=1,
                  progress=False, workdir=str(workdir), model_overrides=TINY, **kw)


def test_setup_writes_the_tokenizer_and_data_without_captions_is_refused_first(tmp_path):
    from train.loop import resolve

    r = resolve(_config(tmp_path))
    r, entries = r.set_up()
    assert entries["tokenizer"] == str(tmp_path / "tokenizer.json")
    assert r.context["tokenizer"] == contrastive.digits_tokenizer(16)
    assert Tokenizer.load(tmp_path) == contrastive.digits_tokenizer(16)
    from PIL import Image
    for cls in ("a", "b"):
        (tmp_path / "c" / cls).mkdir(parents=True)
        for i in range(25):
            Image.new("L", (8, 8), color=i).save(tmp_path / "c" / cls / f"{i}.png")
    with pytest.raises(ValueError, match="has no captions"):   # refused before anything is written
        resolve(_config(tmp_path / "w", data=f"imagefolder:{tmp_path / 'c'}"))
    assert not (tmp_path / "w").exists()


def test_torch_and_jax_follow_the_same_steps(tmp_path):
    """The same 6 AdamW steps from the same weights, data and captions in both frameworks."""
    from train import torch_backend
    from train.jax_backend import make_state
    from train.loop import resolve

    r, _ = resolve(_config(tmp_path, steps=6)).set_up()
    state = make_state(r)
    trainer = torch_backend.build(r)
    step_fn = steps.jit_train_step(r.task.jax_training.step)
    jax_losses, torch_losses = [], []
    with jax.default_matmul_precision("highest"):
        for i, batch in r.batches_from(0):
            batch = r.task.batch(batch, i, r)
            state, m = step_fn(state, batch)
            jax_losses.append(float(m["loss"]))
            t = trainer.train_step(batch)
            torch_losses.append(t["loss"])
            assert t["logit_scale"] == pytest.approx(float(m["logit_scale"]), rel=1e-5)
    err = np.abs(np.array(jax_losses) - np.array(torch_losses)) / np.abs(torch_losses)
    print(f"clip-digits: torch vs jax over 6 steps, max relative loss error {err.max():.2e}")
    assert err.max() <= 1e-4, err
