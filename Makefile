# The README's two commands are `make quickstart` and `make test`. Both are idempotent.
PYTHON ?= python
PIP ?= $(PYTHON) -m pip
NPROC ?= 2
DATA_OUT ?= outputs/sample
RUN_DIR ?= runs/quickstart
# torch==2.13.0 first: it is the CPU wheel on this kind of machine; an unpinned torch pulls a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: install install-test quickstart finetune test test-fast readme-keys

install:
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e .

# DeepSpeed's CPU ops (shm comm, cpu_adam) are compiled once here so tests never spend minutes JIT-compiling.
install-test: install
	$(PIP) install -q -e ".[dev]"
	$(PYTHON) -c "import deepspeed" 2>/dev/null || DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 DS_BUILD_CPU_ADAM=1 \
		$(PIP) install -q --no-build-isolation deepspeed==0.19.8

# Sample corpus -> tokenizer + shards -> 2-process data-parallel training -> eval -> a generated sample.
quickstart: install
	$(PYTHON) -m data_pipeline run configs/data/sample.yaml output_dir=$(DATA_OUT) workers=$(NPROC)
	$(PYTHON) -m torch.distributed.run --standalone --nproc_per_node $(NPROC) -m llmforge.train \
		configs/train/tiny-cpu.yaml data.paths=[$(DATA_OUT)] run_dir=$(RUN_DIR)
	$(PYTHON) -m llmforge.eval $(RUN_DIR)
	$(PYTHON) -m llmforge.generate $(RUN_DIR) --prompt "The function" --max-new-tokens 40 --seed 0
	@echo "results: shards + tokenizer in $(DATA_OUT)/, run in $(RUN_DIR)/ (metrics.jsonl, loss.png, eval.json, checkpoints/)"

# Fine-tune the quickstart model (made first when missing) on the bundled instruction set
# (data_pipeline/sample_instructions, CC0): SFT shards with the quickstart tokenizer -> response-only training.
SFT_DATA ?= outputs/sample-sft
SFT_RUN ?= runs/finetune
finetune: install
	@test -f $(DATA_OUT)/tokenizer.model -a -d $(RUN_DIR)/checkpoints || $(MAKE) quickstart
	$(PYTHON) -m data_pipeline run configs/data/sft.yaml input.paths=[data_pipeline/sample_instructions/instructions.jsonl] \
		output_dir=$(SFT_DATA) tokenizer.model_path=$(DATA_OUT)/tokenizer.model workers=$(NPROC)
	$(PYTHON) -m llmforge.train configs/train/sft-tiny.yaml train.init_from=$(RUN_DIR) data.paths=[$(SFT_DATA)] \
		run_dir=$(SFT_RUN)
	$(PYTHON) -m llmforge.eval $(SFT_RUN)
	$(PYTHON) -m llmforge.generate $(SFT_RUN) --prompt "How do I list the installed Python packages?" --greedy \
		--max-new-tokens 40
	@echo "results: SFT shards in $(SFT_DATA)/, fine-tuned run in $(SFT_RUN)/ (eval.json: response-only loss)"

# Unbuffered, with a per-test limit: a hung test fails with its stack in the log instead of eating CI's time.
test: install-test
	PYTHONUNBUFFERED=1 $(PYTHON) -m pytest tests -q -rs --durations=15 --timeout=900

test-fast: install-test
	$(PYTHON) -m pytest tests -q -m "not slow"

# Regenerate the README's config reference tables from the dataclasses (tests/test_docs.py keeps them in sync).
readme-keys:
	$(PYTHON) -c "import re; from llmforge.core.config import RunConfig, markdown_keys; \
	from data_pipeline.config import PipelineConfig; from llmforge.scaling.sweep import SweepConfig; r = open('README.md').read().split('\n## Configuration reference')[0]; \
	r += '\n## Configuration reference\n\nGenerated from the dataclasses (\`make readme-keys\`).\n\n### Trainer keys\n\n' \
	+ markdown_keys(RunConfig) + '\n\n### Data pipeline keys\n\n' + markdown_keys(PipelineConfig) \
	+ '\n\n### Scaling sweep keys\n\nThe \`sweep:\` section of \`python -m llmforge.scaling sweep CONFIG\`.\n\n' \
	+ markdown_keys(SweepConfig) + '\n'; \
	open('README.md', 'w').write(r)"
