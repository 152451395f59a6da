"""The `diffusion:` model source: the Diffusion Classifier (tta.generative.classifier) as an ImageModel, so
`tta.create_model("diffusion:<kind>@<folder or hub id>")` is a zero-shot classifier like any other model. The
method `diffusion_classifier` (tta.methods.diffusion_classifier) is the same scorer behind the Adapter interface."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..models.sources import MODEL_SOURCES
from ..models.wrapper import ImageModel, check_images
from .base import JUDGES
from .classifier import CLASSIFIER_OPTIONS, DiffusionClassifier
from .loading import create_judge


@MODEL_SOURCES.register("diffusion")
def diffusion_model(name: str, pretrained: bool = True, weights=None, class_names: Optional[Sequence[str]] = None,
                    **kwargs) -> ImageModel:
    """`diffusion:<kind>@<folder or hub id>` (or `diffusion:<folder>`, kind read from its files): the Diffusion
    Classifier as a model. Classifier options (preset, keep, samples, loss, temperature, micro_batch, n_trials,
    seed, autocast) and judge options (prompt, torch_dtype, ...) are keyword arguments."""
    if not pretrained or weights is not None:
        raise ValueError("the diffusion source loads a trained judge from its folder or hub id "
                         "(diffusion:<kind>@<path>); pretrained=False and weights= do not apply")
    kind, sep, path = name.partition("@")
    spec = f"{kind}:{path}" if sep and kind in JUDGES else name
    options = {k: kwargs.pop(k) for k in CLASSIFIER_OPTIONS if k in kwargs}
    judge_options = {"class_names": class_names} if class_names is not None else {}
    judge = create_judge(spec, **judge_options, **kwargs)
    classifier = DiffusionClassifier(judge, **options)
    c = judge.image_channels
    return DiffusionClassifierModel(classifier, (0.0,) * c, (1.0,) * c, judge.class_names,
                                    (c, *judge.image_size), name=f"diffusion:{name}")


class DiffusionClassifierModel(ImageModel):
    """What the `diffusion:` source returns: an ImageModel over a DiffusionClassifier, with the classifier's
    temperature and its calibration on the model itself."""
    one_example_per_call = True  # it scores image by image anyway (see Adapter.one_example_per_call)

    @property
    def temperature(self) -> float:
        return self.net.temperature

    def calibrate(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 16) -> float:
        """Fit and set the temperature of the logits (-error / temperature) on held-out labelled [0, 1] images, so
        softmax(logits) are calibrated probabilities; returns it. Predictions (the argmax) do not change. Refused
        with a ValueError, the temperature unchanged, when the fit is degenerate: fewer than
        MIN_CALIBRATION_IMAGES images, or every image already classified right (tta.generative.fit_temperature)."""
        check_images(images, self.input_size[0])
        return self.net.calibrate(self.normalize(images), labels, batch_size)
