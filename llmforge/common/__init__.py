"""What both halves share, so that they never import each other: the data pipeline imports ``llmforge.common``
(its config machinery too: ``typed_config``); ``llmforge`` never imports ``data_pipeline``.

- ``shards``: the Megatron-compatible .bin/.idx format (written by the pipeline, read by the trainer).
- ``atomic``: temp-name + rename writes used everywhere a file must never be seen half-written.
- ``chat``: the chat template shared by the SFT data stage, training, generation and the HF export.
- ``typed_config``: dataclass configs from YAML + dotted overrides (both halves' schemas use it).
- ``ranges``: the documented range of every numeric config key, checked at validation.
- ``tokenizers``: a tokenizer's vocabulary in id order and its hash (what its ids mean).
- ``slurm``: sbatch job arrays (job script, arguments, polling) for the data executor and the scaling sweep.
"""
