"""One file per method; importing a file registers its adapter under the file's name."""
from . import source, norm, tent  # noqa: F401
