"""Data: images from disk and named offline sets, corruptions, test streams."""
from .corruptions import corrupt_images, corruption_names  # noqa: F401
from .images import ImageList, fit_to_size, load_image, open_images  # noqa: F401
