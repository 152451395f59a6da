"""Diffusion judges behind one protocol (DiffusionJudge), and the Diffusion Classifier's scorer.

    judge = tta.generative.create_judge("pixel-unet:/path/to/judge")   # or dit:..., sd:..., map-unet:...
    x0 = judge.encode(images)                                   # once per image
    err = judge.denoising_error(x0, judge.condition(probs), t, noise)   # (B,), differentiable in probs
"""
from .base import JUDGES, DiffusionJudge, prepare_images, register_judge, replaced_outputs  # noqa: F401
from .sampling import (add_noise, per_sample_error, sample_noise, sample_pairs, sample_timesteps,  # noqa: F401
                       timestep_grid)
from . import pixel_unet, map_unet, dit, stable_diffusion  # noqa: F401  (registers the judges)
from .pixel_unet import PixelUNetJudge  # noqa: F401
from .map_unet import MapUNetJudge  # noqa: F401
from .dit import DiTJudge  # noqa: F401
from .stable_diffusion import StableDiffusionJudge  # noqa: F401
from .loading import JUDGE_SOURCES, create_judge, detect_kind, list_judges  # noqa: F401
from .classifier import PRUNING_PRESETS, DiffusionClassifier, fit_temperature  # noqa: F401
from .classifier_model import DiffusionClassifierModel  # noqa: F401  (registers the diffusion: model source)
# deprecated aliases, kept for existing code
BACKENDS, DiffusionBackend, register_backend = JUDGES, DiffusionJudge, register_judge
PixelUNetBackend, MapUNetBackend, DiTBackend = PixelUNetJudge, MapUNetJudge, DiTJudge
StableDiffusionBackend = StableDiffusionJudge
create_backend, list_backends = create_judge, list_judges
