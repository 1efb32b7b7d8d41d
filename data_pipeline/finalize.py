"""The last two stages of every pipeline run: ``shard`` (the per-task token shards of work/tokens resharded, in task
order, into the final ``shards/`` and ``doc_ids/``) and ``finalize`` (``stats.json``, ``funnel.png`` / ``quality.png``
(plots.py) and the output's ``config.yaml``). Only these write the final outputs; everything before lives in ``work/``."""
from __future__ import annotations

import os
import shutil

from llmforge.common.typed_config import dump_config

from . import stats as stats_mod
from .atomic_io import write_bytes, write_json
from .manifest import install_dir
from .shards import IndexedShard, ShardWriter
from .work_dirs import task_shard_prefix


def shard_task(ctx, _rank: int) -> dict:
    """Concatenate the per-task shards, in task order, into ``shards/{train,valid}-NNNNN`` of about
    ``shards.target_mb`` each. Built in a temp folder and renamed into place as a whole."""
    tmp = os.path.join(ctx.out, f"shards.tmp{os.getpid()}")
    tmp_ids = os.path.join(ctx.out, f"doc_ids.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp_ids, exist_ok=True)
    target = ctx.cfg.shards.target_mb * 1e6
    out = {}
    for split in ("train", "valid"):
        names, k, writer, ids = [], 0, None, []
        for t in range(ctx.n_tasks):
            src = IndexedShard(task_shard_prefix(ctx.work, split, t))
            src_ids = open(task_shard_prefix(ctx.work, split, t) + ".ids", encoding="utf-8").read().splitlines()
            for i in range(len(src)):
                if writer is None:
                    name = f"{split}-{k:05d}"
                    writer, ids = ShardWriter(os.path.join(tmp, name), src.dtype), []
                    names.append(name)
                writer.add_document(src.doc(i))
                ids.append(src_ids[i])
                if writer.tokens * writer.dtype.itemsize >= target:
                    writer.close()
                    write_bytes(os.path.join(tmp_ids, names[-1] + ".txt"), "".join(x + "\n" for x in ids).encode())
                    writer, k = None, k + 1
            del src
        if writer is not None:
            writer.close()
            write_bytes(os.path.join(tmp_ids, names[-1] + ".txt"), "".join(x + "\n" for x in ids).encode())
        out[split] = names
    for final, src in (("shards", tmp), ("doc_ids", tmp_ids)):
        os.makedirs(src, exist_ok=True)
        install_dir(src, os.path.join(ctx.out, final))  # a user's file in shards/ stays
    return {"shards": out}


def finalize_task(ctx, _rank: int) -> dict:
    stats = stats_mod.collect(ctx)
    write_json(os.path.join(ctx.out, "stats.json"), stats)
    from .plots import draw_funnel, write_picture
    if "quality_classifier" in stats:  # the score histogram beside stats.json (atomic, like every output)
        from .filters.quality_classifier import draw_histogram
        write_picture(os.path.join(ctx.out, "quality.png"), draw_histogram, stats["quality_classifier"])
    write_picture(os.path.join(ctx.out, "funnel.png"), draw_funnel, stats)  # documents / bytes after each step
    dump_config(ctx.cfg, os.path.join(ctx.out, "config.yaml"))
    return {"ok": True}
