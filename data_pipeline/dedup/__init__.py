"""Deduplication: exact (normalised content hash) and MinHash LSH, run as task-parallel stages
(signatures per input task -> one bucket task per band -> one clustering task -> filtered at tokenization)."""
