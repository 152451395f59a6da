"""Discriminative model sources; every model takes images in [0, 1] and normalises itself."""
from .sources import MODEL_SOURCES, create_model, list_models  # noqa: F401
from .weights import find_offline_weights, load_weights, read_state_dict  # noqa: F401
from .wrapper import ImageModel, check_images, wrap_model  # noqa: F401
