"""Are a digits model's samples recognisable? A classifier trained on the real digits labels them.

The classifier (scikit-learn ``LogisticRegression``, about 97% on held-out real digits) sees the samples
pooled back to 8x8 on the digits' 0..16 scale, the same round trip the real digits take. A trained model's
class-conditional samples are classified as the asked class; a random model's are not (chance is 10%).
"""

from __future__ import annotations

from typing import Any

import torch

from .trained import IMAGE_SIZE, NUM_CLASSES, digits_images, to_digits_scale


def digits_classifier() -> Any:
    """A fitted ``LogisticRegression`` on all 1797 digits after the upsample -> pool round trip."""
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the digits check needs scikit-learn: pip install 'compact-hooks[quality]'") from exc
    x, y = digits_images(IMAGE_SIZE)
    return LogisticRegression(max_iter=1000).fit(to_digits_scale((x + 1) / 2).numpy(), y.numpy())


def classify(images: torch.Tensor, classifier: Any = None) -> torch.Tensor:
    """Predicted labels of ``[N, 1, H, W]`` images in [0, 1]."""
    clf = classifier if classifier is not None else digits_classifier()
    return torch.as_tensor(clf.predict(to_digits_scale(images).numpy()))


def sample_accuracy(pipe: Any, per_class: int = 4, steps: int = 20, seed: int = 0,
                    classifier: Any = None) -> tuple[float, torch.Tensor, torch.Tensor]:
    """``(accuracy, images [N, 1, H, W], asked labels [N])`` of ``per_class`` samples of every class."""
    labels = torch.arange(NUM_CLASSES).repeat(per_class)
    pipe.set_progress_bar_config(disable=True)
    images = pipe([str(int(c)) for c in labels], num_inference_steps=steps,
                  generator=torch.Generator().manual_seed(seed)).images
    pred = classify(images, classifier)
    return float((pred == labels).float().mean()), images, labels
