"""Data: images from disk and named offline sets, corruptions, test streams."""
from .corruptions import corrupt_images, corruption_names  # noqa: F401
from .images import ImageList, fit_to_size, load_image, open_images  # noqa: F401
from .cifar_c import CIFARC  # noqa: F401
from .corruption_cache import CorruptedDataset  # noqa: F401
from .dense import ADE20K, NYUv2Depth  # noqa: F401
from .imagenet_c import imagenet_c_items, imagenet_variant_items  # noqa: F401
from .streams import SETTINGS, Domain, iterate_stream  # noqa: F401
from .subsample import per_class_indices  # noqa: F401
from .zeroshot import ZEROSHOT_SETS, open_zeroshot  # noqa: F401
