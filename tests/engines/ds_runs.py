"""Run several trainings one after another in the same processes (one launcher start for many runs).

    deepspeed --num_gpus 2 --no_local_rank tests/engines/ds_runs.py SPEC.json

SPEC.json: {"config": "configs/train/tiny-cpu.yaml", "common": [k=v ...], "runs": [[k=v ...], ...]}; each run's
overrides pick run_dir and engine. Exit status: 0 when every run returned 0. With "keep_going": true a run that
stops with a one-line error (ConfigError, TrainingError) prints ``RUN_ERROR <run_dir>: <message>`` and the next
one starts; the exit status is then 2 if any stopped.
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def main() -> int:
    spec = json.load(open(sys.argv[1]))
    from llmforge.core.config import RunConfig, load_config
    from llmforge.train.engines.base import TrainingError
    from llmforge.train.trainer import run_training
    failed = 0
    for overrides in spec["runs"]:
        cfg = load_config(RunConfig, os.path.join(ROOT, spec["config"]), spec["common"] + overrides)
        try:
            rc = run_training(cfg)
        except (ValueError, TrainingError) as e:  # ConfigError is a ValueError
            if not spec.get("keep_going"):
                raise
            # one write per line: both ranks share the pipe, and print's separate "\n" write interleaves
            sys.stderr.write(f"RUN_ERROR {cfg.run_dir}: {e}\n")
            sys.stderr.flush()
            failed = 2
            continue
        if rc:
            return rc
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()
    return failed


if __name__ == "__main__":
    sys.exit(main())
