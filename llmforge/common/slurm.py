"""Slurm job arrays as the data pipeline's executor and the scaling sweep submit them: the job script, the
sbatch argument list, submission and the squeue polling loop.

Nothing from a config is interpolated into shell text: sbatch gets an argument list and the job script only
execs the argv it is given.
"""
from __future__ import annotations

import os
import subprocess
import time

TASK_SCRIPT = "#!/bin/bash\n# Runs the argv it is given; nothing from the config is interpolated into shell text.\nexec \"$@\"\n"


def array_sbatch_args(job_name: str, indices: list[int], output: str, s, dependency: str | None = None) -> list[str]:
    """``sbatch --parsable --array=...`` for ``indices`` with the settings of a Slurm config section ``s``
    (partition, cpus_per_task, mem, time, max_parallel, extra_args and, where it has one, gpus_per_task).
    ``output``: the log path pattern (``%a`` = array index). The caller appends the script and its argv."""
    gpus = getattr(s, "gpus_per_task", 0)
    args = ["sbatch", "--parsable", f"--job-name={job_name}",
            f"--array={','.join(map(str, indices))}" + (f"%{s.max_parallel}" if s.max_parallel else ""),
            f"--output={output}", f"--chdir={os.getcwd()}", f"--cpus-per-task={s.cpus_per_task}"]
    args += [f"--partition={s.partition}"] * bool(s.partition) + [f"--mem={s.mem}"] * bool(s.mem)
    args += [f"--time={s.time}"] * bool(s.time) + [f"--gpus-per-task={gpus}"] * bool(gpus)
    args += list(s.extra_args)
    if dependency:
        args.append(f"--dependency=afterok:{dependency}")
    return args


def submit(args: list[str], error: type[Exception], what: str = "sbatch") -> str:
    """Run sbatch; return the job id (``--parsable`` prints ``id[;cluster]``) or raise ``error`` with its message."""
    out = subprocess.run(args, capture_output=True, text=True)
    if out.returncode != 0:
        raise error(f"{what} failed: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout.strip().split(";")[0]


def wait_for_jobs(job_ids: list[str], poll_s: float) -> list[str]:
    """Poll squeue until none of the jobs is queued or running; return the squeue lines of jobs left pending
    forever because a job they depend on failed (``DependencyNeverSatisfied``: the caller cancels them)."""
    ids = ",".join(job_ids)
    while True:
        q = subprocess.run(["squeue", "-h", "-j", ids, "-o", "%i %T %r"], capture_output=True, text=True)
        lines = [ln for ln in q.stdout.splitlines() if ln.strip()]
        if q.returncode == 0 and all("DependencyNeverSatisfied" in ln for ln in lines):
            return lines
        time.sleep(poll_s)
