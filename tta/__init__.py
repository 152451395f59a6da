"""tta: test-time adaptation driven by generative feedback.

    adapter = tta.create_adapter("tent", model)   # model: any nn.Module, e.g. from tta.create_model("timm:resnet50")
    logits = adapter(images)                      # adapts on the batch, returns the prediction

`import tta` needs only torch; model sources import timm, torchvision, open_clip or smp when used.
"""
from .adapter import Adapter, AdapterConfig, create_adapter, list_adapters, register_adapter  # noqa: F401
from . import methods  # noqa: F401  (registers the methods)
from .models import create_model, list_models, wrap_model  # noqa: F401
from .generative import create_judge, list_judges  # noqa: F401
from . import zoo  # noqa: F401  (registers the zoo: model source)

__version__ = "0.1.0"

create_backend, list_backends = create_judge, list_judges  # deprecated aliases, kept for existing code
