"""One file per method; importing a file registers its adapter under the file's name."""
from . import source, norm, tent, eata, sar, cotta, memo  # noqa: F401
