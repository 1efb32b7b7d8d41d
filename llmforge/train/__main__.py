"""``python -m llmforge.train CONFIG.yaml [key=value ...]`` (also under torchrun, ``deepspeed --module`` and srun)."""
from llmforge.core.distributed import exit_without_teardown
from llmforge.train import main

if __name__ == "__main__":
    exit_without_teardown(main())
