"""A private one-node Slurm for the data-pipeline test, following REFERENCE.md's recipe: its own munged
socket/key, free ports, state/spool/logs/pids in a temp dir (so it can run beside other test clusters).
Installs slurm-wlm and munge with apt-get when missing; ``SlurmUnavailable`` says why that is impossible."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time


class SlurmUnavailable(RuntimeError):
    pass


def ensure_installed() -> None:
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "sbatch", "squeue", "sinfo")):
        return
    if not shutil.which("apt-get"):
        raise SlurmUnavailable("slurm-wlm/munge are not installed and apt-get is unavailable")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    lock = ["-o", "DPkg::Lock::Timeout=600"]
    for cmd in (["apt-get", *lock, "update"], ["apt-get", *lock, "install", "-y", "slurm-wlm", "munge"]):
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
        if r.returncode:
            raise SlurmUnavailable(f"{' '.join(cmd)} failed: {r.stderr.strip()[-300:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class SlurmCluster:
    def __init__(self, root: str, cpus: int = 2):
        self.root, self.cpus = root, cpus
        self.host = socket.gethostname().split(".")[0]
        self.conf = os.path.join(root, "slurm.conf")
        self.munge_sock = os.path.join(root, "munge", "munge.sock")
        self.pids = {n: os.path.join(root, f"{n}.pid") for n in ("munged", "slurmctld", "slurmd")}
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # no outer allocation
        self.env["SLURM_CONF"] = self.conf

    def start(self) -> "SlurmCluster":
        ensure_installed()
        for d in ("munge", "state", "spool"):
            os.makedirs(os.path.join(self.root, d), exist_ok=True)
        os.chmod(os.path.join(self.root, "munge"), 0o700)
        key = os.path.join(self.root, "munge", "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        subprocess.run(["munged", "--force", f"--socket={self.munge_sock}", f"--key-file={key}",
                        f"--pid-file={self.pids['munged']}", f"--log-file={self.root}/munged.log",
                        f"--seed-file={self.root}/munge/seed"], check=True, capture_output=True, timeout=30)
        r = self.root
        with open(self.conf, "w") as f:
            f.write(f"""ClusterName=dptest
SlurmctldHost={self.host}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_sock}
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={self.pids['slurmctld']}
SlurmdPidFile={self.pids['slurmd']}
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd.log
InactiveLimit=0
KillWait=10
NodeName={self.host} CPUs={self.cpus} RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
""")
        for daemon in ("slurmctld", "slurmd"):
            p = subprocess.run([daemon, "-f", self.conf], env=self.env, capture_output=True, text=True, timeout=60)
            if p.returncode:
                raise RuntimeError(f"{daemon} failed to start: {p.stderr.strip()} (see {r}/{daemon}.log)")
        deadline = time.time() + 60
        while time.time() < deadline:
            p = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True)
            if p.returncode == 0 and p.stdout.strip() in ("idle", "mixed", "allocated"):
                return self
            time.sleep(0.5)
        raise RuntimeError(f"node not idle after 60 s ({p.stdout.strip()} {p.stderr.strip()}); see {r}/slurmctld.log")

    def stop(self) -> None:
        for name in ("slurmd", "slurmctld", "munged"):  # by pid file: only the daemons this cluster started
            try:
                pid = int(open(self.pids[name]).read().strip())
                os.kill(pid, signal.SIGTERM)
            except (OSError, ValueError):
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)
