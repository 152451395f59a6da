"""The small model zoo of the offline default: Fashion-MNIST models trained by this project.

Each member has a seeded recipe in code (`tta zoo train NAME` reproduces its checkpoint and prints training
metrics) and a committed checkpoint under tta/zoo/checkpoints/. Classifiers load with
`tta.create_model("zoo:<name>")`; diffusion judges are folders passed to the diffusion judges.
"""
from .registry import ZOO, checkpoint_path, list_zoo, train  # noqa: F401
from . import fmnist, scenes  # noqa: F401  (registers the members)
