"""The model layer, free of parallel code: ``blocks`` (attention, MLP, ModelArgs), ``transformer``, ``presets``
(named shapes and overrides), ``init`` (layout-independent initial values), ``lora`` (adapters, merge) and
``freeze`` (the fine-tuning transforms the model build applies before any parallelism)."""
