"""Hugging Face interop: one adapter per model family (``llama``, ``qwen3``, ``qwen3_moe``, ``gpt2``, chosen in
``adapter``, with the shape check), reading a folder into our names (``load``, also row by row, expert by expert
into a rank's shards) and writing one (``save``, ``chat`` for the chat template). The run-level
export (``python -m llmforge.export_hf``) is the entry module above this layer."""
from .adapter import SHAPE_KEYS, args_from_hf_config, from_hf, hf_config, llama_names, shape_diff, to_hf  # noqa: F401
from .load import (LlamaSafetensorsReader, check_hf_shape, full_shape_keys, hf_model_args, import_hf,  # noqa: F401
                   load_hf_into)
from .save import DTYPES, EXPORT_MARKER, check_export_dir, save_hf  # noqa: F401
