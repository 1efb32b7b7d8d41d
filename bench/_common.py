"""Shared by the benchmarks: repo on sys.path, device naming, RESULT line + bench/results/<name>-<device>.json."""
from __future__ import annotations

import json
import os
import platform
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
RESULTS = os.path.join(ROOT, "bench", "results")


def device_name() -> str:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu-{os.cpu_count()}core-{platform.machine()}"


def device_slug(name: str | None = None) -> str:
    return re.sub(r"[^a-z0-9]+", "-", (name or device_name()).lower()).strip("-")


def emit(name: str, result: dict) -> str:
    """Save ``result`` under bench/results/<name>-<device>.json (atomically) and print the RESULT line last."""
    result = {"bench": name, "device": result.get("device") or device_name(), **result}
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}-{device_slug(result['device'])}.json")
    tmp = path + f".tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)
    print(f"saved {os.path.relpath(path, ROOT)}", flush=True)
    print("RESULT " + json.dumps(result, separators=(",", ":")), flush=True)
    return path


def median(xs):
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])
