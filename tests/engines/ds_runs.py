"""Run several trainings one after another in the same processes (one launcher start for many runs).

    deepspeed --num_gpus 2 --no_local_rank tests/engines/ds_runs.py SPEC.json

SPEC.json: {"config": "configs/train/tiny-cpu.yaml", "common": [k=v ...], "runs": [[k=v ...], ...]}; each run's
overrides pick run_dir and engine. Exit status: 0 when every run returned 0.
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def main() -> int:
    spec = json.load(open(sys.argv[1]))
    from llmforge.config import RunConfig, load_config
    from llmforge.trainer import run_training
    for overrides in spec["runs"]:
        cfg = load_config(RunConfig, os.path.join(ROOT, spec["config"]), spec["common"] + overrides)
        rc = run_training(cfg)
        if rc:
            return rc
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
