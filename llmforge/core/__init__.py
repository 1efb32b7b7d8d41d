"""The bottom layer: the typed run config (``config``), process groups and device selection (``distributed``),
the training losses (``loss``: chunked and vocab-parallel cross-entropy, the masked SFT loss), the optimizers and
schedule (``optim``; ``muon``: Muon + AdamW) and tensors-only unpickling (``safe_pickle``). With ``llmforge.common`` (shared with
data_pipeline) it imports nothing else of llmforge."""
