"""Stats: merge the per-task markers into stats.json (deterministic: no times in it) and print a summary
with throughput (times come from work/timings and this run's wall clock)."""
from __future__ import annotations

import os
from collections import Counter

from .atomic_io import read_json
from .executor import stage_results
from .work_dirs import timing_path


def _merge_steps(per_task: list[dict]) -> list[dict]:
    merged: dict[str, dict] = {}
    for task in per_task:
        for name, st in task["steps"].items():
            m = merged.setdefault(name, {"name": name, "docs_in": 0, "docs_out": 0, "bytes_in": 0, "bytes_out": 0,
                                         "removed": Counter()})
            for k in ("docs_in", "docs_out", "bytes_in", "bytes_out"):
                m[k] += st[k]
            m["removed"].update(st["removed"])
            if "counts" in st:  # only steps that count more than removals (pii) have them
                m.setdefault("counts", {k: 0 for k in st["counts"]})
                for k, v in st["counts"].items():
                    m["counts"][k] = m["counts"].get(k, 0) + v
    for m in merged.values():
        m["removed"] = dict(sorted(m["removed"].items()))
    return list(merged.values())


def collect(ctx) -> dict:
    """stats.json: what was read, what each step and dedup removed, the tokenizer, the output shards."""
    prep = ctx.prepare_stats
    read = Counter()
    for t in prep:
        read.update(t["read"])
    steps = _merge_steps(prep)
    order = {n: i for i, n in enumerate(ctx.cfg.steps)}
    steps.sort(key=lambda s: order[s["name"]])
    kept_docs = sum(t["kept_docs"] for t in prep)
    kept_bytes = sum(t["kept_bytes"] for t in prep)
    tok = stage_results(ctx.work, "tokenize", ctx.n_tasks)
    out = {s: {k: sum(t[s][k] for t in tok) for k in ("docs", "tokens", "bytes")} for s in ("train", "valid")}
    dedup = stage_results(ctx.work, "clusters", 1)[0] if ctx.n_dedup_cols else {}
    if dedup:
        dedup["docs_in"], dedup["bytes_in"] = kept_docs, kept_bytes
        dedup["docs_out"] = out["train"]["docs"] + out["valid"]["docs"]
        dedup["bytes_out"] = out["train"]["bytes"] + out["valid"]["bytes"]
    tokenizer = stage_results(ctx.work, "tokenizer", 1)[0]
    shards = stage_results(ctx.work, "shard", 1)[0]["shards"]
    removed = Counter({"read.empty": read.get("empty", 0), "read.errors": read.get("read_errors", 0)})
    for s in steps:
        removed.update(s["removed"])
    for kind in ("exact", "minhash"):
        if dedup.get(kind, {}).get("removed"):
            removed[f"dedup.{kind}"] = dedup[kind]["removed"]
    result = {
        "input": {"files": len(ctx.units), "tasks": ctx.n_tasks, "docs": read.get("docs", 0) + read.get("empty", 0),
                  "docs_read": read.get("docs", 0), "bytes": read.get("bytes", 0),
                  "empty": read.get("empty", 0), "read_errors": read.get("read_errors", 0)},
        "steps": steps,
        "filtered": {"docs": kept_docs, "bytes": kept_bytes},
        "dedup": dedup,
        "removed_by_rule": {k: v for k, v in sorted(removed.items()) if v},
        "tokenizer": tokenizer,
        "output": {"dtype": "uint16" if tokenizer["vocab_size"] < 65500 else "int32", **out,
                   "shards": shards, "documents_end_with_eos": True},
    }
    hists = [t["quality"] for t in prep if "quality" in t]
    if hists:  # quality_classifier enabled: its score histogram (quality.png is drawn from it)
        q = ctx.cfg.quality_classifier
        result["quality_classifier"] = {
            "label": q.label, "threshold": q.threshold if q.keep_fraction >= 1 else None,
            "keep_fraction": q.keep_fraction, "bins": len(hists[0]["kept"]),
            "kept": [sum(h["kept"][i] for h in hists) for i in range(len(hists[0]["kept"]))],
            "removed": [sum(h["removed"][i] for h in hists) for i in range(len(hists[0]["removed"]))]}
    if any("decontaminate" in t for t in prep):
        result["decontaminate"] = _decontaminate(ctx, prep)
    return result


def _decontaminate(ctx, prep: list[dict]) -> dict:
    """The evaluation files (documents, short ones ignored, distinct n-grams), the index size and the training
    documents each file contaminated (a document sharing n-grams with two files counts for both)."""
    index = stage_results(ctx.work, "decontaminate", 1)[0]
    by = [sum(t["decontaminate"]["contaminated_by"][i] for t in prep if "decontaminate" in t)
          for i in range(len(index["files"]))]
    step = next((s for s in _merge_steps(prep) if s["name"] == "decontaminate"), None)
    dc = ctx.cfg.decontaminate
    return {"mode": dc.mode, "ngram": dc.ngram, "files": index["files"], "index_entries": index["entries"],
            "index_bytes": index["index_bytes"],
            "contaminated_docs": (step["docs_in"] - step["docs_out"] if dc.mode == "remove"
                                  else step.get("counts", {}).get("redacted_docs", 0)) if step else 0,
            "contaminated_by": {f["path"]: n for f, n in zip(index["files"], by)}}


def step_seconds(ctx) -> dict[str, float]:
    """Seconds per prepare step summed over the tasks this run or earlier runs timed."""
    out = Counter()
    for r in range(ctx.n_tasks):
        p = timing_path(ctx.work, "prepare-steps", r)
        if os.path.exists(p):
            out.update(read_json(p))
    return {k: round(v, 2) for k, v in out.items()}


def task_seconds(ctx, stages) -> dict[str, float]:
    out = {}
    for s in stages:
        total = 0.0
        for r in range(s.n_tasks):
            p = timing_path(ctx.work, s.name, r)
            total += read_json(p)["seconds"] if os.path.exists(p) else 0.0
        out[s.name] = round(total, 3)
    return out


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _step_lines(steps: list[dict]) -> list[str]:
    lines = []
    for s in steps:
        rm = ", ".join(f"{k.split('.', 1)[-1]}={v}" for k, v in s["removed"].items()) or "-"
        if s.get("counts"):
            rm += "; " + ", ".join(f"{k}={v}" for k, v in s["counts"].items())
        lines.append(f"{s['name']:<18}{s['docs_in']:>8} -> {s['docs_out']:<8} docs  {_mb(s['bytes_in']):>11} -> "
                     f"{_mb(s['bytes_out']):<11} removed: {rm}")
    return lines


def check_documents_left(ctx) -> None:
    """Before the tokenizer stage: if reading and the per-document steps left nothing, print the per-step table
    (what removed what) and fail in one line, instead of a tokenizer error or an empty dataset with exit 0."""
    from .executor import PipelineError
    prep = ctx.prepare_stats
    if sum(t["kept_docs"] for t in prep):
        return
    read = Counter()
    for t in prep:
        read.update(t["read"])
    steps = _merge_steps(prep)
    order = {n: i for i, n in enumerate(ctx.cfg.steps)}
    steps.sort(key=lambda s: order.get(s["name"], len(order)))
    print("\n".join([f"input     {read.get('docs', 0)} docs read, {read.get('empty', 0)} empty, "
                     f"{read.get('read_errors', 0)} read errors skipped"] + _step_lines(steps)), flush=True)
    worst = max(steps, key=lambda s: s["docs_in"] - s["docs_out"], default=None)
    hint = (f"; {worst['name']} removed {worst['docs_in'] - worst['docs_out']} (relax or disable it, e.g. "
            f"{worst['name']}.enabled=false)" if worst and worst["docs_in"] > worst["docs_out"] else "")
    raise PipelineError(f"no documents left to tokenize: {read.get('docs', 0)} read, every one removed by the "
                        f"per-document steps (table above){hint}")


def summary(stats: dict, walls: dict, task_secs: dict, total_wall: float, step_secs: dict | None = None) -> str:
    i, o = stats["input"], stats["output"]
    lines = [f"input     {i['files']} files, {i['tasks']} tasks: {i['docs']} docs, {_mb(i['bytes'])}"
             f" ({i['empty']} empty, {i['read_errors']} read errors skipped)"]
    lines += _step_lines(stats["steps"])
    d = stats.get("dedup") or {}
    if d:
        e, m = d["exact"], d["minhash"]
        lines.append(f"{'dedup':<18}{d['docs_in']:>8} -> {d['docs_out']:<8} docs  {_mb(d['bytes_in']):>11} -> "
                     f"{_mb(d['bytes_out']):<11} exact={e['removed']} ({e['clusters']} clusters), "
                     f"minhash={m['removed']} ({m['clusters']} clusters, largest {m['largest_cluster']}, "
                     f"{m['candidate_pairs']} candidate pairs, est. precision {m['precision_estimate']})")
    t = stats["tokenizer"]
    lines.append(f"tokenizer         vocab {t['vocab_size']}" + (f", trained on {t['sample_docs']} docs "
                 f"({_mb(t['sample_bytes'])})" if t.get("trained") else f" from {t.get('source')}"))
    for split in ("train", "valid"):
        lines.append(f"{split:<18}{o[split]['docs']} docs, {o[split]['tokens']} tokens ({o['dtype']}) in "
                     f"{len(o['shards'][split])} shard(s)")
    toks = o["train"]["tokens"] + o["valid"]["tokens"]
    if total_wall > 0:
        lines.append(f"throughput        {i['bytes'] / 1e6 / total_wall:.2f} MB/s input, {toks / total_wall:,.0f} "
                     f"tokens/s overall over {total_wall:.1f} s wall")
    if task_secs:
        lines.append("task seconds      " + ", ".join(f"{k}={v:.1f}" for k, v in task_secs.items()))
    if step_secs:
        lines.append("prepare seconds   " + ", ".join(f"{k}={v:.1f}" for k, v in step_secs.items()))
    return "\n".join(lines)
