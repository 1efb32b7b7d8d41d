"""The inference layer: a run dir loaded for use (``run_loading``: config, model with the newest verified
checkpoint, tokenizer), validation loss / perplexity (``eval``), sampling with a KV cache (``generate``),
lm-eval benchmarks (``benchmarks``, ``lm_eval_adapter``, the bundled ``eval_tasks/``)."""
