"""CLI (console script ``llmforge-data``):

  python -m data_pipeline run CONFIG.yaml [key=value ...]   raw text -> <output_dir>/{shards,tokenizer.model,stats.json,config.yaml}
  python -m data_pipeline merge OUT_PREFIX IN_PREFIX... [--force]   concatenate .bin/.idx shards (one tokenizer)
  python -m data_pipeline inspect PREFIX [--n 3]              decode documents back with the tokenizer
  python -m data_pipeline keys                                list every config key with its default
  python -m data_pipeline task CONFIG --stage S [--rank R]    one task (what a Slurm array element runs)
  python -m data_pipeline train-classifier --positive A.jsonl.. --negative B.jsonl.. --out model.bin
                                                              fastText quality classifier (+ model.bin.json card)

Errors print one line ``error: ...`` on stderr: exit 2 for config/usage errors, 1 for data errors.
"""
from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
import threading
import time

# Worker processes already use every core; BLAS threads on top only contend (langid is 3x slower with them).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _cmd_run(args) -> int:
    from . import config, pipeline, stats
    cfg = config.load(args.config, args.overrides)
    t0 = time.perf_counter()
    result = pipeline.run(cfg, args.config)
    if result:
        print(stats.summary(result["stats"], result["walls"], result["task_seconds"], time.perf_counter() - t0,
                            result["step_seconds"]))
        print(f"wrote {os.path.join(cfg.output_dir, 'shards')}/, tokenizer.model, stats.json, config.yaml")
    return 0


def _cmd_task(args) -> int:
    from . import config, pipeline
    cfg = config.load(args.config, [])
    rank = args.rank if args.rank is not None else int(os.environ.get("SLURM_ARRAY_TASK_ID", "0"))
    pipeline.run_single_task(cfg, args.stage, rank)
    return 0


def _cmd_merge(args) -> int:
    from .merge import merge  # refuses an existing OUT (unless --force) and inputs from different tokenizers
    merge(args.out, args.inputs, force=args.force)
    print(f"merged {len(args.inputs)} shards into {args.out}.bin/.idx")
    return 0


def _find_tokenizer(prefix: str) -> str:
    from llmforge.common.shards import find_tokenizer
    found = find_tokenizer([prefix])
    if found:
        return found
    raise FileNotFoundError(f"no tokenizer.model next to {prefix} or one folder up (pass --tokenizer)")


def _cmd_inspect(args) -> int:
    import sentencepiece as spm
    from .shards import IndexedShard
    prefix = args.prefix[:-4] if args.prefix.endswith((".bin", ".idx")) else args.prefix
    shard = IndexedShard(prefix)
    sp = spm.SentencePieceProcessor(model_file=args.tokenizer or _find_tokenizer(prefix))
    print(f"{prefix}: {len(shard)} documents, {shard.num_tokens} tokens, dtype {shard.dtype}")
    ids_file = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(prefix))), "doc_ids",
                            os.path.basename(prefix) + ".txt")
    doc_ids = open(ids_file, encoding="utf-8").read().splitlines() if os.path.isfile(ids_file) else []
    for i in range(min(args.n, len(shard))):
        ids = shard.doc(i).tolist()
        name = f" id={doc_ids[i]}" if i < len(doc_ids) else ""
        text = sp.decode(ids)
        print(f"--- doc {i}{name} ({len(ids)} tokens, ends with eos: {ids[-1] == sp.eos_id()})")
        print(text if len(text) <= args.chars else text[: args.chars] + " ...")
    return 0


def _cmd_keys(_args) -> int:
    from llmforge.common.typed_config import describe, key_ranges
    from .config import PipelineConfig
    ranges = key_ranges(PipelineConfig)  # the range a value is checked against (NaN and inf never pass)
    for key, tp, default, doc in describe(PipelineConfig):
        print(f"{key:<36} {tp:<10} {str(ranges.get(key, '')):<12} {default!r:<24} {doc}")
    return 0


def _cmd_train_classifier(args) -> int:
    from .filters.quality_classifier import train
    card = train(args.positive, args.negative, args.out, text_key=args.text_key, valid_fraction=args.valid_fraction,
                 epoch=args.epoch, lr=args.lr, word_ngrams=args.word_ngrams, dim=args.dim, bucket=args.bucket,
                 min_count=args.min_count, seed=args.seed)
    sz, sc = card["sizes"], card["scores"]
    print(f"trained on {sz['train']['hq']} hq + {sz['train']['lq']} lq documents; held out "
          f"{sz['valid']['hq']} hq + {sz['valid']['lq']} lq: precision {sc['precision']:.4f} recall "
          f"{sc['recall']:.4f} (hq at score >= {sc['threshold']})")
    print(f"wrote {args.out} and {args.out}.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_pipeline", description="llmforge data pipeline")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run (or resume) the pipeline")
    r.add_argument("config")
    r.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    t = sub.add_parser("task", help="run one task (used by Slurm arrays)")
    t.add_argument("config")
    t.add_argument("--stage", required=True)
    t.add_argument("--rank", type=int)
    m = sub.add_parser("merge", help="merge shards")
    m.add_argument("out")
    m.add_argument("inputs", nargs="+")
    m.add_argument("--force", action="store_true", help="replace an existing OUT.bin/.idx")
    i = sub.add_parser("inspect", help="decode documents of a shard")
    i.add_argument("prefix")
    i.add_argument("--n", type=int, default=3)
    i.add_argument("--tokenizer", default="")
    i.add_argument("--chars", type=int, default=600, help="print at most this many characters per document")
    sub.add_parser("keys", help="list config keys")
    c = sub.add_parser("train-classifier", help="train a fastText quality classifier (hq vs lq documents)")
    c.add_argument("--positive", nargs="+", required=True, help="high-quality documents (jsonl/parquet/text files)")
    c.add_argument("--negative", nargs="+", required=True, help="low-quality documents")
    c.add_argument("--out", required=True, help="the model file (.bin); the JSON card goes to OUT.json")
    c.add_argument("--text-key", default="text")
    c.add_argument("--valid-fraction", type=float, default=0.2, help="held out of each class for the scores")
    c.add_argument("--epoch", type=int, default=25)
    c.add_argument("--lr", type=float, default=0.1)
    c.add_argument("--word-ngrams", type=int, default=2)
    c.add_argument("--dim", type=int, default=64)
    c.add_argument("--bucket", type=int, default=100_000, help="hash buckets of the word n-grams (model size: "
                                                                "(words + bucket) x dim x 4 bytes)")
    c.add_argument("--min-count", type=int, default=1)
    c.add_argument("--seed", type=int, default=0)
    return p


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other error
        raise _UsageError(message)


class _Terminated(KeyboardInterrupt):
    """SIGTERM (Slurm preemption, ``kill``): stop like Ctrl-C, so the worker pool is torn down with the run, the
    output folder's lock is free at once and work/ stays for the rerun."""


def _on_sigterm(signum, _frame, main_pid=os.getpid()):
    if os.getpid() != main_pid:  # a forked worker: die as SIGTERM says (its parent handles the run)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise _Terminated()


def main(argv: list[str] | None = None) -> int:
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, functools.partial(_on_sigterm, main_pid=os.getpid()))
    try:
        return _main(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None = None) -> int:
    from llmforge.common.typed_config import ConfigError
    parser = build_parser()
    parser.__class__ = _Parser
    for action in parser._subparsers._group_actions[0].choices.values():
        action.__class__ = _Parser
    try:
        args = parser.parse_args(argv)
        handler = {"run": _cmd_run, "task": _cmd_task, "merge": _cmd_merge, "inspect": _cmd_inspect,
                   "keys": _cmd_keys, "train-classifier": _cmd_train_classifier}[args.cmd]
        return handler(args)
    except (ConfigError, _UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        term = isinstance(e, _Terminated)
        print(f"error: {'terminated (SIGTERM)' if term else 'interrupted'}; finished tasks are kept: rerun the same "
              "command to resume", file=sys.stderr)
        return 143 if term else 130
    except Exception as e:  # noqa: BLE001 - data errors: one line, no traceback
        from .executor import PipelineError
        from .readers import InputError
        if isinstance(e, (PipelineError, InputError, FileNotFoundError, ValueError)):
            print(f"error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
