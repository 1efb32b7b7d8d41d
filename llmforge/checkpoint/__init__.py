"""The checkpoint layer: DCP save / load / resume of the native engine (``checkpointer``), the integrity manifest
that every load verifies (``integrity``), the background writer of async saves (``writer``) and the reading of a
DeepSpeed run's shards (``deepspeed_weights``: consolidation and weights-only loading)."""
