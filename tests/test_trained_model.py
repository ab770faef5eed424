"""The embedded trained digits model: shipped weights load with diffusers' own from_pretrained, its
20-step samples are recognised by a digits classifier (random weights are not), its packing is
FluxPipeline's, and training is deterministic."""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("sklearn")

import torch  # noqa: E402
from compact_hooks.integrations.diffusers import trained  # noqa: E402
from compact_hooks.integrations.diffusers.digits_check import digits_classifier, sample_accuracy  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@pytest.fixture(scope="module")
def classifier():
    return digits_classifier()


@pytest.fixture(scope="module", autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_shipped_weights_are_small_and_load_with_from_pretrained():
    from diffusers import FluxPipeline, FluxTransformer2DModel

    files = {p.name: p.stat().st_size for p in trained.WEIGHTS_DIR.iterdir()}
    assert {"config.json", "diffusion_pytorch_model.safetensors", trained.EMBEDDINGS_FILE} <= set(files)
    assert sum(files.values()) < 5_000_000
    model = FluxTransformer2DModel.from_pretrained(trained.WEIGHTS_DIR, local_files_only=True)
    assert {k: model.config[k] for k in trained.MODEL_CONFIG} == {
        k: list(v) if isinstance(v, tuple) else v for k, v in trained.MODEL_CONFIG.items()}
    pipe = trained.load_trained_pipeline()
    assert isinstance(pipe, FluxPipeline) and type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"


def test_trained_samples_are_recognised_and_random_ones_are_not(classifier):
    acc, images, labels = sample_accuracy(trained.load_trained_pipeline(), per_class=3, steps=20,
                                          classifier=classifier)
    assert images.shape == (30, 1, trained.IMAGE_SIZE, trained.IMAGE_SIZE) and labels.shape == (30,)
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    assert acc >= 0.8, f"trained model: only {acc:.0%} of its samples look like the asked digit"
    random_acc = sample_accuracy(trained.load_trained_pipeline(random_weights=True), per_class=3, steps=20,
                                 classifier=classifier)[0]
    assert random_acc <= 0.35, f"random weights pass the check ({random_acc:.0%}): the check is too weak"


def test_classifier_recognises_held_out_real_digits():
    from sklearn.linear_model import LogisticRegression

    x, y = trained.digits_images()
    feats = trained.to_digits_scale((x + 1) / 2).numpy()
    clf = LogisticRegression(max_iter=1000).fit(feats[:1400], y[:1400].numpy())
    assert clf.score(feats[1400:], y[1400:].numpy()) >= 0.9


def test_sampling_is_seeded_and_prompt_picks_the_class(classifier):
    from compact_hooks.integrations.diffusers.digits_check import classify

    pipe = trained.load_trained_pipeline()
    pipe.set_progress_bar_config(disable=True)
    a = pipe("7 7 1", num_inference_steps=20, generator=torch.Generator().manual_seed(5)).images
    b = pipe(["7", 7, "1"], num_inference_steps=20, generator=torch.Generator().manual_seed(5)).images
    assert torch.equal(a, b)
    assert classify(a, classifier).tolist().count(7) >= 1
    pil = pipe("3", num_inference_steps=4, output_type="pil").images
    assert pil[0].size == (trained.IMAGE_SIZE, trained.IMAGE_SIZE)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 9), min_size=1, max_size=6))
def test_labels_of_reads_every_prompt_form(labels):
    assert trained.labels_of(" ".join(map(str, labels))) == labels
    assert trained.labels_of([str(c) for c in labels]) == labels
    assert trained.labels_of(labels[0]) == labels[:1]


@pytest.mark.parametrize("prompt", ["", "10", "seven", [-1], "3 x"])
def test_labels_of_rejects_what_the_model_does_not_know(prompt):
    with pytest.raises(ValueError, match="0..9|class label"):
        trained.labels_of(prompt)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 4), st.integers(1, 8), st.integers(1, 8))
def test_pack_and_ids_are_flux_pipelines(batch, h2, w2):
    from diffusers import FluxPipeline

    x = torch.randn(batch, 1, 2 * h2, 2 * w2)
    assert torch.equal(trained.pack(x), FluxPipeline._pack_latents(x, batch, 1, 2 * h2, 2 * w2))
    ref_ids = FluxPipeline._prepare_latent_image_ids(batch, h2, w2, "cpu", torch.float32)
    assert torch.equal(trained.image_ids(2 * h2, 2 * w2), ref_ids)
    assert torch.equal(FluxPipeline._unpack_latents(trained.pack(x), 2 * h2, 2 * w2, 1), x)


def test_training_is_deterministic_and_saves_a_loadable_model(tmp_path, capsys):
    from compact_hooks.integrations.diffusers.train_tiny import train

    a = train(tmp_path / "a", steps=2, batch=4, log_every=1)
    b = train(tmp_path / "b", steps=2, batch=4, log_every=1)
    assert a["losses"] == b["losses"] and len(a["losses"]) == 2
    assert "step     2  loss" in capsys.readouterr().out
    da = (tmp_path / "a" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert da == (tmp_path / "b" / "diffusion_pytorch_model.safetensors").read_bytes()
    pipe = trained.load_trained_pipeline(tmp_path / "a")
    assert pipe("1", num_inference_steps=2).images.shape == (1, 1, 16, 16)


def test_missing_weights_say_how_to_make_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_tiny|train-tiny"):
        trained.load_trained_pipeline(tmp_path)

