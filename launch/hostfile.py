"""DeepSpeed hostfile from a Slurm node list, and its checks.

    python -m launch.hostfile --slots 8 [--nodelist 'gpu[01-04]'] [-o hostfile]   # default: $SLURM_JOB_NODELIST
    python -m launch.hostfile --check hostfile [--hosts a,b | --nodelist LIST]      # every node has an entry

Writes ``host slots=N`` lines (the format of ``deepspeed --hostfile``), atomically. Node lists are expanded
with ``scontrol show hostnames`` when it is available, else by the same rules in Python (``a[1-3,07],b``).
Every problem is one ``error: ...`` line and exit status 2.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from llmforge.common.atomic import write_text


class HostfileError(ValueError):
    """A node list or hostfile that cannot be used."""


def _split_top(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise HostfileError(f"node list {text!r}: unbalanced ']'")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if depth:
        raise HostfileError(f"node list {text!r}: unbalanced '['")
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def expand_nodelist(text: str) -> list[str]:
    """Pure-Python ``scontrol show hostnames``: ``gpu[01-03,7],cpu1`` → gpu01 gpu02 gpu03 gpu7 cpu1."""
    hosts: list[str] = []
    for item in _split_top(text):
        m = re.match(r"^([^\[\]]*)\[([^\[\]]+)\](.*)$", item)
        if not m:
            if "[" in item or "]" in item:
                raise HostfileError(f"node list entry {item!r}: cannot parse")
            hosts.append(item)
            continue
        head, ranges, tail = m.groups()
        for r in ranges.split(","):
            if "-" in r:
                lo, hi = r.split("-", 1)
                if not (lo.isdigit() and hi.isdigit()) or int(lo) > int(hi):
                    raise HostfileError(f"node list entry {item!r}: bad range {r!r}")
                width = len(lo)
                for i in range(int(lo), int(hi) + 1):
                    hosts.extend(expand_nodelist(f"{head}{i:0{width}d}{tail}"))
            else:
                if not r.isdigit():
                    raise HostfileError(f"node list entry {item!r}: bad number {r!r}")
                hosts.extend(expand_nodelist(f"{head}{r}{tail}"))
    return hosts


def slurm_hosts(nodelist: str | None = None) -> list[str]:
    nodelist = nodelist or os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        raise HostfileError("no node list: SLURM_JOB_NODELIST is not set (run inside a Slurm allocation "
                            "or pass --nodelist)")
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()
    return expand_nodelist(nodelist)


def write_hostfile(path: str, hosts: list[str], slots: int) -> None:
    if slots < 1:
        raise HostfileError(f"--slots must be >= 1, got {slots}")
    if len(set(hosts)) != len(hosts):
        raise HostfileError(f"duplicate hosts in node list: {hosts}")
    write_text(path, "".join(f"{h} slots={slots}\n" for h in hosts))


def read_hostfile(path: str) -> dict[str, int]:
    """``host slots=N`` lines (comments and blank lines ignored) → {host: slots}; errors name the line."""
    if not os.path.isfile(path):
        raise HostfileError(f"hostfile not found: {path}")
    out: dict[str, int] = {}
    for n, line in enumerate(open(path), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.match(r"^(\S+)\s+slots\s*=\s*(\d+)$", line)
        if not m:
            raise HostfileError(f"{path}:{n}: expected 'HOST slots=N', got {line!r}")
        if m.group(1) in out:
            raise HostfileError(f"{path}:{n}: host {m.group(1)} listed twice")
        out[m.group(1)] = int(m.group(2))
    if not out:
        raise HostfileError(f"{path}: no hosts")
    return out


def check_hostfile(path: str, hosts: list[str], slots: int | None = None) -> dict[str, int]:
    """Every host of the allocation has an entry (and, if given, ``slots`` slots)."""
    entries = read_hostfile(path)
    missing = [h for h in hosts if h not in entries]
    if missing:
        raise HostfileError(f"hostfile {path} has no entry for host {', '.join(missing)} "
                            f"(it lists {', '.join(entries)}); regenerate it with python -m launch.hostfile")
    if slots is not None:
        bad = [f"{h} slots={entries[h]}" for h in hosts if entries[h] != slots]
        if bad:
            raise HostfileError(f"hostfile {path}: expected slots={slots} for every host, got {', '.join(bad)}")
    return entries


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.hostfile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--slots", type=int, default=None, help="processes per node (GPUs per node)")
    ap.add_argument("--nodelist", default=None, help="Slurm node list (default: $SLURM_JOB_NODELIST)")
    ap.add_argument("--hosts", default=None, help="comma-separated hosts instead of a node list")
    ap.add_argument("-o", "--output", default="hostfile", help="hostfile to write (default: ./hostfile)")
    ap.add_argument("--check", metavar="HOSTFILE", default=None, help="check an existing hostfile instead")
    args = ap.parse_args(argv)
    try:
        hosts = args.hosts.split(",") if args.hosts else slurm_hosts(args.nodelist)
        if args.check:
            entries = check_hostfile(args.check, hosts, args.slots)
            print(f"hostfile {args.check}: {len(hosts)} hosts, {sum(entries[h] for h in hosts)} slots: ok")
            return 0
        if args.slots is None:
            raise HostfileError("--slots is required to write a hostfile (processes per node)")
        write_hostfile(args.output, hosts, args.slots)
        print(f"wrote {args.output}: {len(hosts)} hosts x {args.slots} slots ({', '.join(hosts)})")
        return 0
    except HostfileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
