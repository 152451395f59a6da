"""One file per method; importing a file registers its adapter under the file's name."""
from . import source, norm, tent, eata, sar, cotta, memo  # noqa: F401
from . import it3, slow_inference, ttt_mae  # noqa: F401
from . import diffusion_tta, diffusion_classifier  # noqa: F401
