"""torchrun for llmforge, single or multi node, with checks before anything starts.

    python -m launch.torchrun --nproc-per-node 8 CONFIG.yaml [key=value ...]                      # one node
    python -m launch.torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 \\
        --rdzv-endpoint head:29500 --max-restarts 3 CONFIG.yaml [key=value ...]                   # each node

It prints the exact ``torchrun`` command, then runs torchrun's agent in this same process (launch/agent.py), so
signals reach the agent directly, which is what Slurm preemption needs. SIGTERM/SIGUSR1 to it: the workers finish
the step, save and exit 75, and so does this command, with one line (plain torchrun exits 1 with a
SignalException traceback there); the workers get ``--shutdown-timeout`` seconds (default 120, torchrun's own
default is 30) before they are killed. One node without ``--rdzv-endpoint`` gets a free loopback port. Restarts
(``--max-restarts``) rely on the trainer's auto-resume from ``run_dir/checkpoints``.
Refused with one ``error:`` line (exit 2): a busy rendezvous port, ``--node-rank`` outside ``--nnodes``,
several nodes without an endpoint, a world size that does not fit the config's parallel.* sizes.
"""
from __future__ import annotations

import argparse
import errno
import os
import shlex
import socket
import sys


# SIGUSR1 too (torchrun's default list lacks it): forwarded to the workers, whose graceful stop it is, instead of
# killing the agent and leaving them to be stopped by their parent-death signal with nobody waiting for them
SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


class LaunchArgsError(ValueError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_busy(host: str, port: int) -> bool | None:
    """True if (host, port) is local and taken, False if local and free, None if the host is not this machine."""
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise LaunchArgsError(f"--rdzv-endpoint host {host!r} does not resolve ({e.strerror})") from None
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # like the c10d TCPStore server: SO_REUSEADDR, so only a live listener (not TIME_WAIT leftovers of a
        # previous run on this port) counts as busy
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(infos[0][4])
            s.listen(1)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return True
            if e.errno == errno.EADDRNOTAVAIL:
                return None
            raise
    return False


def parse_endpoint(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise LaunchArgsError(f"--rdzv-endpoint {text!r} is not HOST:PORT (e.g. node001:29500)")
    return host, int(port)


def check_world(config: str, overrides: list[str], world: int) -> None:
    """The config's parallel.* sizes must multiply to the world size (same check as the trainer)."""
    from llmforge.core.config import RunConfig, load_config
    from llmforge.parallel import resolve_dims
    cfg = load_config(RunConfig, config, overrides)
    if cfg.engine == "deepspeed":  # DeepSpeed: pp stages x data parallel (ZeRO shards within dp)
        from llmforge.train.engines.deepspeed import ds_dims
        ds_dims(cfg, world)
        return
    resolve_dims(cfg.parallel, world, None, cfg.train)


def build_command(args, config: str, overrides: list[str]) -> list[str]:
    if args.nnodes < 1 or args.nproc_per_node < 1:
        raise LaunchArgsError(f"--nnodes ({args.nnodes}) and --nproc-per-node ({args.nproc_per_node}) must be >= 1")
    if not 0 <= args.node_rank < args.nnodes:
        raise LaunchArgsError(f"--node-rank {args.node_rank} is outside --nnodes {args.nnodes} (valid: 0..{args.nnodes - 1})")
    if args.max_restarts < 0:
        raise LaunchArgsError("--max-restarts must be >= 0")
    if args.shutdown_timeout < 1 or args.rdzv_timeout < 0:
        raise LaunchArgsError(f"--shutdown-timeout ({args.shutdown_timeout}) must be >= 1 and --rdzv-timeout "
                              f"({args.rdzv_timeout}) >= 0 seconds")
    if args.rdzv_endpoint:
        host, port = parse_endpoint(args.rdzv_endpoint)
        if args.node_rank == 0:  # node 0 hosts the c10d store: its port must be free here
            busy = port_busy(host, port)
            if busy:
                raise LaunchArgsError(f"rendezvous port {port} on {host} is busy (another job or torchrun uses it); "
                                      f"pick another --rdzv-endpoint port, e.g. {host}:{free_port()}")
            if busy is None and args.nnodes == 1:
                raise LaunchArgsError(f"--rdzv-endpoint host {host} is not this machine, but --nnodes is 1")
    else:
        if args.nnodes > 1:
            raise LaunchArgsError(f"--nnodes {args.nnodes} needs --rdzv-endpoint HEAD_HOST:PORT (the same on every node)")
        host, port = "127.0.0.1", free_port()
    if not os.path.isfile(config):
        raise LaunchArgsError(f"config file not found: {config}")
    if not args.skip_checks:
        check_world(config, overrides, args.nnodes * args.nproc_per_node)
    rdzv_id = args.rdzv_id or os.environ.get("SLURM_JOB_ID") or "llmforge"
    cmd = [sys.executable, "-m", "torch.distributed.run",
           f"--nnodes={args.nnodes}", f"--nproc-per-node={args.nproc_per_node}",
           f"--node-rank={args.node_rank}", "--rdzv-backend=c10d", f"--rdzv-endpoint={host}:{port}",
           f"--rdzv-id={rdzv_id}", f"--max-restarts={args.max_restarts}",
           f"--shutdown-timeout={args.shutdown_timeout}", f"--signals-to-handle={SIGNALS}"]
    if args.rdzv_timeout:
        cmd.append(f"--rdzv-conf=join_timeout={args.rdzv_timeout}")
    if args.log_dir:
        cmd.append(f"--log-dir={args.log_dir}")
    return cmd + ["-m", args.module, config, *overrides]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.torchrun", description=__doc__.split("\n\n")[0],
                                 usage="python -m launch.torchrun [options] CONFIG.yaml [key=value ...]")
    ap.add_argument("--nproc-per-node", type=int, default=1, help="processes (GPUs) per node")
    ap.add_argument("--nnodes", type=int, default=1)
    ap.add_argument("--node-rank", type=int, default=0)
    ap.add_argument("--rdzv-endpoint", default=None, help="HEAD_HOST:PORT, the same on every node")
    ap.add_argument("--rdzv-id", default=None, help="job id shared by all nodes (default $SLURM_JOB_ID or 'llmforge')")
    ap.add_argument("--rdzv-timeout", type=int, default=0, help="seconds to wait for all nodes (0: torchrun default)")
    ap.add_argument("--max-restarts", type=int, default=0, help="restart the workers this many times (auto-resume)")
    ap.add_argument("--log-dir", default=None, help="torchrun per-rank log dir")
    ap.add_argument("--shutdown-timeout", type=int, default=120,
                    help="seconds the workers get to save after a SIGTERM/SIGUSR1 before they are killed")
    ap.add_argument("--module", default="llmforge.train", help="python module to run (default llmforge.train)")
    ap.add_argument("--dry-run", action="store_true", help="print the command and exit")
    ap.add_argument("--skip-checks", action="store_true", help="do not check the config against the world size")
    args, rest = ap.parse_known_args(argv)
    unknown = [a for a in rest if a.startswith("--")]
    if unknown:
        print(f"error: unknown option {unknown[0]} (see python -m launch.torchrun --help)", file=sys.stderr)
        return 2
    if not rest:
        print("error: missing CONFIG.yaml; " + ap.format_usage().strip(), file=sys.stderr)
        return 2
    try:
        cmd = build_command(args, rest[0], rest[1:])
    except (LaunchArgsError, ValueError) as e:  # ConfigError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("+ " + shlex.join(cmd), flush=True)
    if args.dry_run:
        return 0
    from launch.agent import run_agent
    return run_agent(cmd[3:], args.shutdown_timeout)  # cmd[:3] is "python -m torch.distributed.run"


if __name__ == "__main__":
    sys.exit(main())
