"""Diffusion judges behind one protocol (DiffusionBackend), and the Diffusion Classifier's scorer.

    backend = tta.generative.create_backend("pixel-unet:/path/to/judge")   # or dit:..., sd:..., map-unet:...
    x0 = backend.encode(images)                                   # once per image
    err = backend.denoising_error(x0, backend.condition(probs), t, noise)   # (B,), differentiable in probs
"""
from .base import BACKENDS, DiffusionBackend, prepare_images, register_backend, replaced_outputs  # noqa: F401
from .sampling import (add_noise, per_sample_error, sample_noise, sample_pairs, sample_timesteps,  # noqa: F401
                       timestep_grid)
from . import pixel_unet, map_unet, dit, stable_diffusion  # noqa: F401  (registers the backends)
from .pixel_unet import PixelUNetBackend  # noqa: F401
from .map_unet import MapUNetBackend  # noqa: F401
from .dit import DiTBackend  # noqa: F401
from .stable_diffusion import StableDiffusionBackend  # noqa: F401
from .loading import JUDGE_SOURCES, create_backend, detect_kind, list_backends  # noqa: F401
from .classifier import PRUNING_PRESETS, DiffusionClassifier, fit_temperature  # noqa: F401
from .classifier_model import DiffusionClassifierModel  # noqa: F401  (registers the diffusion: model source)
