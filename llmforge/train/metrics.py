"""Metrics: tokens/s, MFU from a FLOPs formula and a device peak table, memory; jsonl / console / wandb; loss plot."""
from __future__ import annotations

import json
import math
import os

import torch
from llmforge.common.atomic import save_figure, write_text

# Dense bf16 peak TFLOP/s per device (no sparsity), from the vendors' data sheets.
PEAK_BF16_TFLOPS = {
    "H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0,
    "H100": 989.0, "GH200": 989.0, "B200": 2250.0, "A100": 312.0, "A10G": 125.0, "L40S": 362.0, "L4": 121.0,
    "MI300X": 1307.0, "MI250X": 383.0,
}


# Dense float8 peak (e4m3, no sparsity): twice bf16 on the GPUs with float8 tensor cores.
PEAK_FP8_TFLOPS = {k: 2 * v for k, v in PEAK_BF16_TFLOPS.items() if k.startswith(("H", "GH", "B", "L", "MI300"))}


def _lookup(table: dict, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(table, key=len, reverse=True):
        if key in name:
            return table[key] * 1e12
    return None


def device_peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of this device, or None when unknown (then no MFU is reported)."""
    return _lookup(PEAK_BF16_TFLOPS, device)


def blended_peak(bf16_peak: float | None, fp8_peak: float | None, fp8_fraction: float) -> float | None:
    """The peak a step could reach when ``fp8_fraction`` of its FLOPs run in float8 (train.float8's linears) and
    the rest in bf16: the time-weighted (harmonic) blend of the two peaks."""
    if not bf16_peak or not fp8_fraction:
        return bf16_peak
    if not fp8_peak:
        return None
    return 1.0 / ((1.0 - fp8_fraction) / bf16_peak + fp8_fraction / fp8_peak)


def mfu(tokens_per_sec_per_device: float, flops_per_token: float, peak: float | None) -> float | None:
    if not peak:
        return None
    value = tokens_per_sec_per_device * flops_per_token / peak
    if value > 1.0:
        raise RuntimeError(f"MFU {value:.1%} > 100%: the FLOP count or the peak table is wrong")
    return value


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
    except Exception:  # noqa: BLE001 - memory is informative only
        return None


class StepMetrics:
    """Builds the metrics.jsonl row of a training step (the same keys for every engine)."""

    def __init__(self, global_batch: int, seq_len: int, n_devices: int, flops_per_token: float, device,
                 fp8_flops_per_token: float = 0.0):
        self.tokens_per_step, self.seq_len, self.n_devices = global_batch * seq_len, seq_len, n_devices
        self.fpt, self.device = flops_per_token, device
        fraction = fp8_flops_per_token / flops_per_token if flops_per_token else 0.0
        self.peak = blended_peak(device_peak_flops(device), _lookup(PEAK_FP8_TFLOPS, device), fraction)

    def row(self, step: int, loss: float, lr: float, grad_norm: float, samples: int, dt: float, skipped: bool) -> dict:
        tps = self.tokens_per_step / dt
        row = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_sec": tps,
               "tokens": samples * self.seq_len, "step_time_s": dt, "skipped": skipped}
        m = mfu(tps / self.n_devices, self.fpt, self.peak)
        if m is not None:
            row["mfu"] = m
        mem = peak_memory_gib(self.device)
        if mem is not None:
            row["peak_mem_gib"] = mem
        return row


class MetricsLogger:
    """Writes on rank 0 only. ``metrics.jsonl`` rows are appended and flushed each step."""

    def __init__(self, run_dir: str, rank: int, logging_cfg, config_dict: dict, resume_step: int = 0):
        self.rank, self.path = rank, os.path.join(run_dir, "metrics.jsonl")
        self.wandb = None
        if rank != 0:
            return
        truncate_metrics(self.path, resume_step)
        self.f = open(self.path, "a")
        if logging_cfg.wandb != "disabled":
            import wandb  # imported only when asked for; never online unless logging.wandb=online
            self.wandb = wandb.init(project=logging_cfg.wandb_project, mode=logging_cfg.wandb, dir=run_dir,
                                    config=config_dict, resume="allow")

    def log(self, row: dict, console: bool = True) -> None:
        if self.rank != 0:
            return
        row = {k: (round(v, 8) if isinstance(v, float) and k not in ("loss", "val_loss") else v) for k, v in row.items()}
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()
        if self.wandb is not None:
            self.wandb.log(row, step=row.get("step"))
        if console:
            parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()]
            print(" | ".join(parts), flush=True)

    def close(self) -> None:
        if self.rank == 0:
            self.f.close()
            if self.wandb is not None:
                self.wandb.finish()


def truncate_metrics(path: str, keep_until_step: int) -> None:
    """On resume from step N, drop rows logged after N by the interrupted run (so the file equals an
    uninterrupted run's)."""
    if not os.path.isfile(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line torn by a kill
            if row.get("step", 0) <= keep_until_step:
                kept.append(line if line.endswith("\n") else line + "\n")
    write_text(path, "".join(kept))


def plot_run(run_dir: str) -> str | None:
    """loss.png: training (and validation) loss and the learning rate against the step."""
    path = os.path.join(run_dir, "metrics.jsonl")
    rows = [json.loads(line) for line in open(path) if line.strip()]
    train = [r for r in rows if "loss" in r and math.isfinite(r["loss"])]
    if not train:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    val = [r for r in rows if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot([r["step"] for r in train], [r["lr"] for r in train], color="gray", alpha=0.5, label="lr")
    ax2.set_ylabel("lr")
    ax.legend(loc="upper right")
    return save_figure(fig, os.path.join(run_dir, "loss.png"))
