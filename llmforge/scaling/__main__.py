"""``python -m llmforge.scaling fit | sweep | plan``: see llmforge/scaling/__init__.py and the README's
"How big a model?" section. Bad input prints one line and exits with status 2."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .law import ScalingError

PROG = "python -m llmforge.scaling"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would print the whole usage first)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog=PROG, description="Chinchilla scaling laws: fit, sweep, plan")
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fit", help="fit L(N, D) = E + A/N^alpha + B/D^beta to RESULTS.csv (params,tokens,loss)")
    f.add_argument("csv")
    f.add_argument("--out", help="write the law as JSON here (default: next to the CSV, <name>.law.json)")
    f.add_argument("--plot", help="iso-loss PNG (default: next to the law, <name>.png)")
    s = sub.add_parser("sweep", help="train a grid of small models and write RESULTS.csv")
    s.add_argument("config", help="trainer YAML, optionally with a sweep: section")
    s.add_argument("--sizes", nargs="+", default=[], help="target parameter counts (embeddings included)")
    s.add_argument("--tokens", nargs="+", default=[], help="training tokens per run")
    s.add_argument("--out-dir", help="sweep.out_dir")
    # trailing key=value: sweep keys (executor=slurm, slurm.partition=...) or trainer keys (data.paths=[...])
    p = sub.add_parser("plan", help="compute-optimal model + tokens + layout + config for a budget")
    p.add_argument("--flops", type=float, help="training budget in FLOPs (C = 6ND)")
    p.add_argument("--gpu-hours", type=float, help="budget in GPU-hours, summed over all GPUs")
    p.add_argument("--gpu", default="h100", help="h100 | h200 | a100 | a100-40gb | b200 (default h100)")
    p.add_argument("--gpus", type=int, help="GPUs to lay the model out on (default: the fewest that fit it)")
    p.add_argument("--mfu", type=float, default=None, help="model FLOPs utilisation to convert time to FLOPs "
                                                           "(default 0.4)")
    p.add_argument("--law", help="law JSON from `fit --out` (default: Besiroglu et al. 2024)")
    p.add_argument("--seq-len", type=int, help="training sequence length (default: the base config's)")
    p.add_argument("--vocab", type=int, help="vocabulary size (default: the base config's model or tokenizer)")
    p.add_argument("--base", default=None, help="trainer YAML the plan starts from (default "
                                                "configs/scaling/base.yaml)")
    p.add_argument("--out-dir", help="where config.yaml, plan.json and frontier.png go (default runs/plans/<name>)")
    # trailing key=value: trainer keys for the written config (data.paths=[...])
    t = sub.add_parser("task", help=argparse.SUPPRESS)  # one Slurm array task of a sweep
    t.add_argument("spec")
    return ap


def cmd_fit(a) -> int:
    from .law import fit, read_points
    from .plan import write_json
    from .plots import plot_fit
    params, tokens, loss = read_points(a.csv)
    law, stats = fit(params, tokens, loss)
    stem = os.path.splitext(a.out or a.csv)[0]
    out = a.out or stem + ".law.json"
    result = law.to_dict() | stats
    write_json(out, result)
    png = plot_fit(law, params, tokens, loss, a.plot or (stem if a.out else os.path.splitext(a.csv)[0]) + ".png")
    n, d = law.optimum(1e21)
    print(f"fit of {stats['points']} points: L(N, D) = {law.E:.4g} + {law.A:.4g} / N^{law.alpha:.4f} + "
          f"{law.B:.4g} / D^{law.beta:.4f}; rmse {stats['rmse_loss']:.4g}; at 1e21 FLOPs: N {n:.3g}, D {d:.3g}")
    print(f"wrote {out} and {png}")
    if stats["degenerate"]:
        print(f"warning: {' and '.join(stats['degenerate'])} fitted as ~0: the points show no gain from more "
              f"{' or '.join({'alpha': 'parameters', 'beta': 'tokens'}[k] for k in stats['degenerate'])}; "
              "widen the sweep (sizes and tokens over at least 10x each, runs long enough to learn)", file=sys.stderr)
    print(json.dumps(result | {"law": out, "plot": png}))
    return 0


def _numbers(flag: str, values: list[str], overrides: list[str]) -> list[float]:
    """--sizes/--tokens values; key=value items that argparse swept into the list go back to the overrides."""
    out = []
    for v in values:
        if "=" in v:
            overrides.append(v)
            continue
        try:
            out.append(float(v))
        except ValueError:
            raise ScalingError(f"{flag}: {v!r} is not a number") from None
    return out


def cmd_sweep(a) -> int:
    from .sweep import sweep_main
    args = list(a.overrides)
    sizes, tokens = _numbers("--sizes", a.sizes, args), _numbers("--tokens", a.tokens, args)
    if sizes:
        args.append("sizes=[" + ",".join(repr(x) for x in sizes) + "]")
    if tokens:
        args.append("tokens=[" + ",".join(repr(x) for x in tokens) + "]")
    if a.out_dir:
        args.append(f"out_dir={a.out_dir}")
    out = sweep_main(a.config, args)
    if out:
        print(f"SWEEP {json.dumps(out)}")
    return 0


def cmd_plan(a) -> int:
    from .law import load_law
    from .plan import DEFAULT_BASE, DEFAULT_MFU, budget_flops, make_plan, resolve_vocab, table, write_config, write_json
    from .plots import plot_frontier
    law = load_law(a.law)
    mfu = DEFAULT_MFU if a.mfu is None else a.mfu
    flops = budget_flops(a.flops, a.gpu_hours, a.gpu, mfu)
    base = a.base or DEFAULT_BASE
    if not os.path.isfile(base):
        raise ScalingError(f"--base {base}: no such file")
    vocab = resolve_vocab(base, a.overrides, a.vocab)
    seq_len = a.seq_len or _base_seq_len(base, a.overrides)
    if seq_len < 2:
        raise ScalingError(f"--seq-len must be >= 2, got {seq_len}")
    plan = make_plan(law, flops, vocab, seq_len, gpu=a.gpu, gpus=a.gpus, mfu=mfu)
    name = f"llama-{_tag(plan['params'])}-{_tag(plan['tokens'])}"
    out_dir = a.out_dir or os.path.join("runs", "plans", name)
    cfg_path = write_config(plan, base, os.path.join(out_dir, "config.yaml"), os.path.join("runs", name), a.overrides)
    png = plot_frontier(law, flops, plan["params"], plan["tokens"], os.path.join(out_dir, "frontier.png"))
    plan.update(config=cfg_path, plot=png)
    write_json(os.path.join(out_dir, "plan.json"), plan)
    print(table(plan))
    print(f"config  {cfg_path}\nplot    {png}\nrun it  python -m llmforge.train {cfg_path}  "
          f"(on {plan['gpus']} GPUs: torchrun / launch/slurm/train.sbatch)")
    print(f"PLAN {json.dumps(plan)}")
    return 0


def _tag(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _base_seq_len(base: str, overrides: list[str]) -> int:
    from llmforge.core.config import ConfigError, RunConfig, load_config
    try:
        return load_config(RunConfig, base, overrides).data.seq_len
    except ConfigError as e:
        raise ScalingError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    a, extra = parser.parse_known_args(argv)
    bad = [x for x in extra if x.startswith("-") or "=" not in x or a.cmd not in ("sweep", "plan")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (overrides are key=value)")
    a.overrides = extra
    from llmforge.core.config import ConfigError
    try:
        if a.cmd == "task":
            from .sweep import run_task
            return run_task(a.spec)
        return {"fit": cmd_fit, "sweep": cmd_sweep, "plan": cmd_plan}[a.cmd](a)
    except (ScalingError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a training run or sbatch failed: named in the message
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
