"""`python -m nuwa_core.eval IMAGE ...`: offline quality metrics (nuwa_core/evaluation/)."""
import sys

from .evaluation.cli import main

if __name__ == "__main__":
    sys.exit(main())
