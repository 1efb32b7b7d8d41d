"""Every path under ``<output_dir>/work/``, the one place that knows the work folder's layout. Tests and tools
that look inside a work folder find the same names here (stages never join work paths themselves).

```
work/
  fingerprint.json  config.yaml  input_hashes.json  manifest.json  manifest/   the run's identity and ownership
  markers/<stage>/NNNNN.json     a task's result; its presence is "done" (resume skips it)
  timings/<stage>-NNNNN.json     seconds per task (apart from markers, so those stay byte-reproducible)
  decontaminate/index-{hashes,files}.npy   the n-gram index of decontaminate.paths (sorted hashes, file numbers)
  prepared/NNNNN.jsonl.zst       documents that passed the steps       signatures/NNNNN.{keys,order}.npy
  rejects/NNNNN.jsonl.zst        (input.write_rejects)                  rejects/dedup.jsonl.zst
  dedup/part-NNNNN.npz  dedup/remove-NNNNN.npy  dedup/clusters.jsonl.zst
  tokens/<split>-NNNNN.{bin,idx,ids}  tokens/loss_mask/<split>-NNNNN    per-task shards before resharding
  slurm/task.sh  slurm/logs/<stage>-<rank>.out
```
"""
from __future__ import annotations

import os

WORK = "work"
BULKY = ("prepared", "signatures", "dedup", "tokens", "decontaminate")  # removed after a finished run unless keep_work_files
MANIFEST = os.path.join(WORK, "manifest.json")          # relative to the output folder
MANIFEST_LOG = os.path.join(WORK, "manifest")
HASH_CACHE = "input_hashes.json"


def work_dir(out: str) -> str:
    return os.path.join(out, WORK)


def fingerprint_file(work: str) -> str:
    return os.path.join(work, "fingerprint.json")


def config_file(work: str) -> str:
    """The resolved config Slurm tasks load."""
    return os.path.join(work, "config.yaml")


def hash_cache_file(work: str) -> str:
    return os.path.join(work, HASH_CACHE)


def marker_path(work: str, stage: str, rank: int) -> str:
    return os.path.join(work, "markers", stage, f"{rank:05d}.json")


def timing_path(work: str, name: str, rank: int) -> str:
    return os.path.join(work, "timings", f"{name}-{rank:05d}.json")


def decontaminate_index_paths(work: str) -> tuple[str, str]:
    base = os.path.join(work, "decontaminate", "index")
    return base + "-hashes.npy", base + "-files.npy"


def prepared_path(work: str, rank: int) -> str:
    return os.path.join(work, "prepared", f"{rank:05d}.jsonl.zst")


def signature_paths(work: str, rank: int) -> tuple[str, str]:
    base = os.path.join(work, "signatures", f"{rank:05d}")
    return base + ".keys.npy", base + ".order.npy"


def rejects_path(work: str, name: str) -> str:
    """Rejected documents of a prepare task (``NNNNN``) or of dedup (``dedup``)."""
    return os.path.join(work, "rejects", f"{name}.jsonl.zst")


def part_path(work: str, p: int) -> str:
    return os.path.join(work, "dedup", f"part-{p:05d}.npz")


def remove_path(work: str, rank: int) -> str:
    return os.path.join(work, "dedup", f"remove-{rank:05d}.npy")


def clusters_path(work: str) -> str:
    return os.path.join(work, "dedup", "clusters.jsonl.zst")


def task_shard_prefix(work: str, split: str, rank: int) -> str:
    return os.path.join(work, "tokens", f"{split}-{rank:05d}")


def mask_prefix(work: str, split: str, rank: int) -> str:
    return os.path.join(work, "tokens", "loss_mask", f"{split}-{rank:05d}")


def slurm_script(work: str) -> str:
    return os.path.join(work, "slurm", "task.sh")


def slurm_log_dir(work: str) -> str:
    return os.path.join(work, "slurm", "logs")


def slurm_log(work: str, stage: str, rank) -> str:
    return os.path.join(slurm_log_dir(work), f"{stage}-{rank}.out")
