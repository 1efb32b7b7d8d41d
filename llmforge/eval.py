"""``python -m llmforge.eval RUN_DIR [key=value ...] [--tasks ...]``: a run's validation loss and perplexity
(``RUN_DIR/eval.json``) and lm-eval benchmarks; the work is llmforge.inference.eval's."""
from llmforge.core.distributed import exit_without_teardown
from llmforge.inference.eval import main  # noqa: F401  (the console script llmforge-eval)

if __name__ == "__main__":
    exit_without_teardown(main())
