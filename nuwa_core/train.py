"""`python -m nuwa_core.train STAGE ...`: the training command (stages in nuwa_core/training/)."""
import sys

from .training.cli import cli, main  # noqa: F401  (main: the same, returning the stage's result dict)

if __name__ == "__main__":
    sys.exit(cli())
