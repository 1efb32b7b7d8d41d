"""The data layer: what the trainer reads. ``streams`` (shards, the blended deterministic sample stream, the
validation split), ``sft`` (conversations with loss masks), ``megatron`` (data.backend=megatron through
Megatron-core's own datasets) and ``checks`` (shards against the model's vocabulary, a start's tokenizer)."""
