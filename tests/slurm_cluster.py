"""A real one-node Slurm (slurmctld + slurmd + its own munged) in a temp dir, for tests.

Own free ports, own munge socket/key, own state/spool/log/pid files, so it
can run next to another test cluster on the default ports. Installs slurm-wlm and munge with apt-get when
missing; ``SlurmUnavailable`` says why when that is impossible (the caller skips with that reason).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time



def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class SlurmUnavailable(RuntimeError):
    pass


def ensure_installed() -> None:
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "sbatch", "srun", "scontrol")):
        return
    if not shutil.which("apt-get"):
        raise SlurmUnavailable("slurm-wlm/munge are not installed and apt-get is unavailable")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    lock = ["-o", "DPkg::Lock::Timeout=600"]
    for cmd in (["apt-get", *lock, "update"], ["apt-get", *lock, "install", "-y", "slurm-wlm", "munge"]):
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
        if r.returncode:
            raise SlurmUnavailable(f"{' '.join(cmd)} failed: {r.stderr.strip()[-300:]}")


class SlurmCluster:
    def __init__(self, root: str, cpus: int = 2):
        self.root, self.cpus = root, cpus
        self.host = socket.gethostname().split(".")[0]
        self.conf = os.path.join(root, "slurm.conf")
        self.munge_sock = os.path.join(root, "munge", "munge.sock")
        self.pidfiles = {n: os.path.join(root, f"{n}.pid") for n in ("munged", "slurmctld", "slurmd")}
        self.env = dict(os.environ, SLURM_CONF=self.conf)
        for k in [k for k in self.env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
            del self.env[k]  # never inherit an outer allocation

    def _log(self, name: str) -> str:
        return os.path.join(self.root, f"{name}.log")

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
                        f"--pid-file={self.pidfiles['munged']}", f"--log-file={self._log('munged')}",
                        f"--seed-file={os.path.join(self.root, 'munge', 'seed')}"], check=True,
                       capture_output=True, timeout=30)
        with open(self.conf, "w") as f:
            f.write(f"""ClusterName=llmforgetest
SlurmctldHost={self.host}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_sock},cred_expire=10
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool
SlurmctldPidFile={self.pidfiles['slurmctld']}
SlurmdPidFile={self.pidfiles['slurmd']}
SlurmctldLogFile={self._log('slurmctld')}
SlurmdLogFile={self._log('slurmd')}
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
NodeName={self.host} CPUs={self.cpus} RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
""")
        for daemon in ("slurmctld", "slurmd"):
            r = subprocess.run([daemon, "-f", self.conf], env=self.env, capture_output=True, text=True, timeout=60)
            if r.returncode:
                raise RuntimeError(f"{daemon} failed to start: {r.stderr.strip()} (log {self._log(daemon)})")
        deadline = time.time() + 60
        while time.time() < deadline:
            r = self.run(["sinfo", "-h", "-o", "%T"], check=False)
            if r.returncode == 0 and r.stdout.strip() in ("idle", "mixed", "allocated"):
                return self
            time.sleep(0.5)
        raise RuntimeError(f"node not idle after 60 s: {r.stdout.strip()} {r.stderr.strip()}; "
                           f"see {self._log('slurmctld')} and {self._log('slurmd')}")

    def run(self, cmd, check=True, timeout=120, cwd=None, env=None):
        r = subprocess.run(cmd, env=dict(self.env, **(env or {})), capture_output=True, text=True,
                           timeout=timeout, cwd=cwd)
        if check and r.returncode:
            raise RuntimeError(f"{' '.join(cmd)}: exit {r.returncode}: {r.stderr.strip()}")
        return r

    def job_state(self, job_id: str) -> str:
        r = self.run(["scontrol", "show", "job", job_id], check=False)
        for tok in r.stdout.split():
            if tok.startswith("JobState="):
                return tok.split("=", 1)[1]
        return "UNKNOWN"

    def wait(self, job_id: str, timeout: float = 300, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                              "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            s = self.job_state(job_id)
            if s in states:
                return s
            time.sleep(1)
        raise TimeoutError(f"job {job_id} still {self.job_state(job_id)} after {timeout} s")

    def stop(self) -> None:
        for name in ("slurmd", "slurmctld", "munged"):
            path = self.pidfiles[name]
            try:
                pid = int(open(path).read().strip())
            except (OSError, ValueError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)
