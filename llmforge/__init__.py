"""llmforge: a trainer whose parallelism composes, in layers that import only downwards (ARCHITECTURE.md at the
repository root lists them; tests/test_module_graph.py keeps them so): core ← model ← hf ← data ← parallel ←
checkpoint ← inference ← train ← tools (dryrun, scaling, the entry modules eval / generate / export_hf)."""
