"""llmforge against torchtitan 0.3.0 on the same model dimensions, batch and GPUs, in the same run: tokens/s/GPU and
the ratio llmforge / torchtitan (> 1: llmforge is faster).

Both sides: Llama 3 1B (tied embeddings) or 8B, FSDP (ZeRO-3) over all local GPUs, bf16, no activation
recomputation, micro batch ``--micro`` x ``--seq-len`` per GPU, torch.compile ``--compile``. llmforge runs through
bench/train_step_gpu.py (random tokens); torchtitan through its own trainer (``torchtitan.train``) with the model
config built below (``--module torchtitan_compare --config llmforge_llama_1b|8b``) and its per-step ``tps`` log,
median after ``--warmup`` steps. torchtitan needs its tokenizer assets (``--hf-assets``: a Llama 3 tokenizer
folder) and a local text dataset (``--dataset-path``: e.g. tests/assets/c4_test from the torchtitan repo): the GPU
machine is offline.

  pip install torchtitan==0.3.0
  python bench/torchtitan_compare.py --hf-assets DIR --dataset-path DIR [--presets llama-1b,llama-8b]
         [--seq-len 2048] [--micro 1] [--steps 30] [--warmup 10] [--compile off]
Without CUDA GPUs or torchtitan it stops with one line and exit status 2. Not yet run: no GPU so far.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import ROOT, device_name, emit, median  # noqa: E402

FLAVORS = {"llama-1b": "1B", "llama-8b": "8B"}


# ---------------------------------------------------------------------------------------- torchtitan's side
def _titan_config(flavor: str):
    """torchtitan's llama3_8b trainer config with the model flavor swapped and the extras (profiling,
    TensorBoard, checkpoints, validation, activation checkpointing) off: the same work as llmforge's step."""
    from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss
    from torchtitan.models.common.config_utils import decoder_vocab_size
    from torchtitan.models.llama3 import model_registry
    from torchtitan.models.llama3.config_registry import llama3_8b
    cfg = llama3_8b()
    spec = model_registry(flavor)
    cfg.model_spec = spec
    cfg.loss = ChunkedLossWrapper.Config(loss_fn=CrossEntropyLoss.Config(global_vocab_size=decoder_vocab_size(spec)))
    cfg.profiler.enable_profiling = False
    cfg.metrics.enable_tensorboard = False
    cfg.metrics.log_freq = 1
    cfg.checkpoint.enable = False
    cfg.validator.enable = False
    ac_type = type(cfg).__dataclass_fields__["activation_checkpoint"].default_factory
    cfg.activation_checkpoint = ac_type()  # the default: no recomputation
    return cfg


def llmforge_llama_1b():
    return _titan_config("1B")


def llmforge_llama_8b():
    return _titan_config("8B")


def run_torchtitan(preset: str, n: int, a) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m",
           "torchtitan.train", "--module", "torchtitan_compare", "--config", f"llmforge_{preset.replace('-', '_')}",
           "--training.local_batch_size", str(a.micro), "--training.seq_len", str(a.seq_len),
           "--training.steps", str(a.warmup + a.steps), "--parallelism.data_parallel_shard_degree", str(n),
           "--hf_assets_path", a.hf_assets, "--dataloader.dataset", "c4_test",
           "--dataloader.dataset_path", a.dataset_path]
    if a.compile == "on":
        cmd += ["--compile.enable"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.abspath(__file__)), ROOT]))
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    log = re.sub(r"\x1b\[[0-9;]*m", "", p.stdout + p.stderr)  # torchtitan colours its log
    tps = [float(x.replace(",", "")) for x in re.findall(r"tps: ([\d,]+)", log)]
    mem = [float(x) for x in re.findall(r"memory: +([\d.]+)GiB", log)]
    if p.returncode != 0 or len(tps) <= a.warmup:
        return {"error": f"torchtitan exit status {p.returncode}, {len(tps)} steps logged: " + log[-600:]}
    return {"tokens_per_sec_per_gpu": median(tps[a.warmup:]), "peak_reserved_gib": max(mem) if mem else None}


def run_llmforge(preset: str, n: int, a) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           os.path.join(ROOT, "bench", "train_step_gpu.py"), "--worker", "--preset", preset, "--compile", a.compile,
           "--out", out, "--seq-len", str(a.seq_len), "--micro", str(a.micro), "--steps", str(a.steps),
           "--warmup", str(a.warmup)]
    rc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT)).returncode
    if rc != 0 or not os.path.getsize(out):
        return {"error": f"llmforge exit status {rc}"}
    return json.load(open(out))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="llama-1b,llama-8b")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--micro", type=int, default=1)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--compile", choices=["off", "on"], default="off")
    ap.add_argument("--hf-assets", help="torchtitan tokenizer assets folder (Llama 3 tokenizer)")
    ap.add_argument("--dataset-path", help="local dataset for torchtitan's c4_test loader")
    a = ap.parse_args()
    import torch
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        print("error: bench/torchtitan_compare.py needs CUDA GPUs (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    try:
        import torchtitan  # noqa: F401
    except ImportError:
        print("error: torchtitan is not installed: pip install torchtitan==0.3.0", file=sys.stderr)
        return 2
    for flag, value in (("--hf-assets", a.hf_assets), ("--dataset-path", a.dataset_path)):
        if not value or not os.path.isdir(value):
            print(f"error: {flag} must name an existing folder (torchtitan cannot download on this machine)",
                  file=sys.stderr)
            return 2
    n = torch.cuda.device_count()
    rows = []
    for preset in a.presets.split(","):
        if preset not in FLAVORS:
            print(f"error: --presets: {preset!r} has no torchtitan counterpart; choose from {sorted(FLAVORS)}",
                  file=sys.stderr)
            return 2
        ours, theirs = run_llmforge(preset, n, a), run_torchtitan(preset, n, a)
        row = {"preset": preset, "compile": a.compile == "on", "gpus": n, "llmforge": ours, "torchtitan": theirs}
        if "error" not in ours and "error" not in theirs:
            row["ratio_llmforge_vs_torchtitan"] = round(ours["tokens_per_sec_per_gpu"] /
                                                        theirs["tokens_per_sec_per_gpu"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    emit("torchtitan_compare", {"device": device_name(), "gpus": n, "seq_len": a.seq_len, "micro_batch": a.micro,
                                "configs": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
