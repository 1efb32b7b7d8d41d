"""``python -m llmforge.generate RUN_DIR --prompt TEXT``: sample from a run; the work is
llmforge.inference.generate's."""
import sys

from llmforge.inference.generate import main  # noqa: F401  (the console script llmforge-generate)

if __name__ == "__main__":
    sys.exit(main())
