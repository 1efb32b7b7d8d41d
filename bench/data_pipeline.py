"""Data pipeline throughput per core, with baselines measured in the same run.

1. Per-step microbenchmarks, one process, one thread (= per core), on the bundled sample corpus
   (data_pipeline/sample_corpus) and on a larger synthetic mix built from it (paragraph-shuffled variants,
   exact and near duplicates, non-English and junk documents): read, clean, each filter, MinHash band keys,
   exact hash, tokenize -> MB/s and docs/s.
2. Our MinHash (data_pipeline.dedup.minhash.MinHasher) vs a plain datasketch loop (regex words, 5-gram
   shingles, 112 permutations, xxh64, scheme="affine64", a new MinHash per document) and the same loop with
   permutations reused; datatrove's MinhashDedupSignature only if it is importable (never installed here).
3. Our tokenize stage (data_pipeline.tokenizer.tokenize_task: read + encode + EOS + shard writer + ids) vs a
   plain ``sentencepiece.encode`` loop over the same documents (in memory) with the same model, on a synthetic
   input of --tokenize-mb in 8 files: RESULT's tokenize_ratio_per_worker (tasks in one process, one encode
   thread; goal >= 0.95) and tokenize_ratio_2_workers (the tasks over 2 processes; goal >= 1.8, on an idle
   machine). ``--tokenize-only`` runs just this part (RESULT saved as data_pipeline_tokenize).
4. The whole CLI (``python -m data_pipeline run``) on 2-3 growing synthetic inputs: wall seconds, MB/s and
   peak RSS (max over the process and its workers) -> how memory grows with the input.
5. The dedup cluster stage (bucket tasks over key ranges + merge) at 1x and 4x input: peak RSS and traced peak
   of its largest task, each task re-run alone in a fresh process.
6. The steps that are off by default (pii, url_filter, quality_classifier, decontaminate) on the sample corpus,
   one core each: RESULT's new_steps {step: {MBps, datatrove_MBps}} against datatrove's block (PIIFormatter,
   URLFilter, FastTextClassifierFilter, NGramsDecontFilter on an index of the same hashes) when datatrove is
   importable (datatrove_MBps null otherwise). ``--new-steps-only`` runs just this part (saved as
   data_pipeline_steps).

  python bench/data_pipeline.py [--synthetic-mb 12] [--rss-mb 3 6 12] [--workers 2] [--tokenize-only]
                                [--new-steps-only]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import ROOT, device_name, emit  # noqa: E402

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

SAMPLE = os.path.join(ROOT, "data_pipeline", "sample_corpus")


def read_docs(paths, cfg_overrides=()):
    from data_pipeline import config
    from data_pipeline.readers import Reader, expand_paths
    cfg = config.load(None, [f"input.paths=[{','.join(paths)}]", *cfg_overrides])
    st = Counter()
    r = Reader(cfg.input, st)
    docs = []
    t0 = time.perf_counter()
    for kind, path, rel in expand_paths(cfg.input):
        docs.extend(r.read(kind, path, rel))
    return cfg, docs, time.perf_counter() - t0


def nbytes(docs):
    return sum(len(d["text"].encode("utf-8")) for d in docs)


def make_synthetic(out_dir, sample_docs, target_mb, seed=0, n_files=4):
    """A mix built from the sample corpus: variants (paragraphs shuffled/dropped, words swapped), exact
    duplicates, near duplicates, and junk/non-English documents. jsonl.zst files, deterministic."""
    import zstandard
    rng = random.Random(seed)
    texts = [d["text"] for d in sample_docs if len(d["text"]) > 200]
    vocab = re.findall(r"[A-Za-z]{3,12}", " ".join(texts[:200]))
    os.makedirs(out_dir, exist_ok=True)
    writers = [open(os.path.join(out_dir, f"synth-{i:02d}.jsonl.zst"), "wb") for i in range(n_files)]
    comps = [zstandard.ZstdCompressor(level=3).stream_writer(w) for w in writers]
    total, i, recent = 0, 0, []
    while total < target_mb * 1e6:
        kind = rng.random()
        if kind < 0.08 and recent:
            text = rng.choice(recent)  # exact duplicate
        elif kind < 0.18 and recent:
            words = rng.choice(recent).split(" ")
            for _ in range(max(1, len(words) // 50)):
                words[rng.randrange(len(words))] = rng.choice(vocab)
            text = " ".join(words)  # near duplicate
        elif kind < 0.23:
            text = " ".join(rng.choice(vocab) for _ in range(rng.randint(20, 400)))  # word salad
        else:
            paras = rng.choice(texts).split("\n\n")
            rng.shuffle(paras)
            paras = paras[: max(1, int(len(paras) * rng.uniform(0.5, 1.0)))]
            text = "\n\n".join(paras) + f"\n\nVariant {i} notes: " + " ".join(rng.choice(vocab) for _ in range(30)) + "."
        recent = (recent + [text])[-50:]
        rec = json.dumps({"text": text, "id": f"s{i}", "source": "synthetic"}) + "\n"
        comps[i % n_files].write(rec.encode())
        total += len(text.encode())
        i += 1
    for c in comps:
        c.close()
    return i, total


def per_step(cfg, docs):
    """Seconds for each per-document step over ``docs`` (each step sees the survivors of the previous ones, as
    in the pipeline, but to measure every filter on the full set each is also timed on all documents)."""
    from data_pipeline.dedup.exact import content_hash
    from data_pipeline.dedup.minhash import MinHasher
    from data_pipeline.filters import get_step
    from data_pipeline.prepare import prepare_warmup

    class _Ctx:  # prepare_warmup needs only cfg
        pass
    c = _Ctx()
    c.cfg = cfg
    prepare_warmup(c)
    out = {}
    work = [dict(d) for d in docs]
    for name in cfg.steps:
        fn, scfg = get_step(name), getattr(cfg, name)
        if not scfg.enabled:
            continue
        copies = [dict(d) for d in work]
        b = nbytes(copies)
        t0 = time.perf_counter()
        removed = sum(1 for d in copies if fn(d, scfg))
        dt = time.perf_counter() - t0
        out[name] = {"s": dt, "docs": len(copies), "bytes": b, "removed": removed}
        if name == "clean":
            work = copies  # later steps see cleaned text, like the pipeline
    m = cfg.dedup.minhash
    hasher = MinHasher(m.ngram, m.bands, m.rows, m.seed)
    b = nbytes(work)
    t0 = time.perf_counter()
    for d in work:
        hasher.band_keys(d["text"])
    out["minhash"] = {"s": time.perf_counter() - t0, "docs": len(work), "bytes": b}
    t0 = time.perf_counter()
    for d in work:
        content_hash(d["text"])
    out["exact_hash"] = {"s": time.perf_counter() - t0, "docs": len(work), "bytes": b}
    return out, work


def minhash_baselines(texts, ngram=5, num_perm=112, seed=1):
    import xxhash
    from datasketch import MinHash
    word = re.compile(r"\w+", re.UNICODE)

    def shingles(t):
        ws = word.findall(t.lower())
        return {" ".join(ws[i:i + ngram]) for i in range(max(1, len(ws) - ngram + 1))}

    t0 = time.perf_counter()
    for t in texts:  # what a datasketch user writes
        mh = MinHash(num_perm=num_perm, seed=seed, hashfunc=xxhash.xxh64_intdigest, scheme="affine64")
        mh.update_batch([s.encode("utf-8") for s in shingles(t)])
        mh.hashvalues
    plain = time.perf_counter() - t0
    tmpl = MinHash(num_perm=num_perm, seed=seed, hashfunc=xxhash.xxh64_intdigest, scheme="affine64")
    t0 = time.perf_counter()
    for t in texts:
        mh = MinHash(num_perm=num_perm, hashfunc=xxhash.xxh64_intdigest, scheme="affine64",
                     permutations=tmpl.permutations)
        mh.update_batch([s.encode("utf-8") for s in shingles(t)])
    reuse = time.perf_counter() - t0
    res = {"plain_datasketch_s": plain, "datasketch_reused_perms_s": reuse}
    try:
        from datatrove.data import Document
        from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
        sig = MinhashDedupSignature(output_folder=tempfile.mkdtemp(), config=MinhashConfig())
        docs = [Document(text=t, id=str(i)) for i, t in enumerate(texts)]
        t0 = time.perf_counter()
        for d in docs:
            sig.get_signature(d.text)
        res["datatrove_s"] = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - optional baseline
        res["datatrove"] = f"not measured ({type(e).__name__}: {str(e)[:80]})"
    return res


def _timed(fn, docs):
    """Seconds of ``fn(doc)`` over copies of ``docs`` (the copies are made before the clock starts)."""
    copies = [{**d, "meta": dict(d.get("meta", {}))} for d in docs]
    t0 = time.perf_counter()
    for d in copies:
        fn(d)
    return time.perf_counter() - t0


def _datatrove_blocks(tmp, domains, model, index):
    """datatrove's equivalents of the new steps, as {step: callable(doc dict)}; raises ImportError without it."""
    from datatrove.data import Document
    from datatrove.pipeline.decont import NGramsDecontConfig, NGramsDecontFilter
    from datatrove.pipeline.filters import FastTextClassifierFilter, URLFilter
    from datatrove.pipeline.formatters import PIIFormatter
    os.makedirs(os.path.join(tmp, "dt-index"), exist_ok=True)
    index[0].astype("<u8").tofile(os.path.join(tmp, "dt-index", "tasks.index.hashes"))
    blocks = {"pii": PIIFormatter(), "url_filter": URLFilter(extra_domains=domains, use_integrated_lists=False),
              "quality_classifier": FastTextClassifierFilter(model, keep_labels=[("hq", 0.5)]),
              "decontaminate": NGramsDecontFilter(os.path.join(tmp, "dt-index"), NGramsDecontConfig(n_grams=13))}

    def call(block, d):
        doc = Document(text=d["text"], id=d["id"], metadata=dict(d.get("meta", {})))
        return block.format(doc.text) if hasattr(block, "format") else block.filter(doc)
    return {k: (lambda d, b=b: call(b, d)) for k, b in blocks.items()}


def new_steps(docs, tmp):
    """MB/s of pii, url_filter, quality_classifier and decontaminate on one core, and of datatrove's blocks."""
    from data_pipeline.config import DecontaminateConfig, PIIConfig, QualityClassifierConfig, URLFilterConfig
    from data_pipeline.filters import get_step
    from data_pipeline.filters.decontaminate import DecontaminateStep, build_index
    from data_pipeline.filters.quality_classifier import train
    docs = [{**d, "meta": {**d.get("meta", {}), "url": f"https://www.site{i % 500}.org/page/{i}"}}
            for i, d in enumerate(docs)]
    domains = [f"site{i}.org" for i in range(0, 500, 7)]
    block = os.path.join(tmp, "block.txt")
    with open(block, "w") as f:
        f.write("".join(x + "\n" for x in domains))
    pos = os.path.join(tmp, "pos.jsonl")
    neg = os.path.join(tmp, "neg.jsonl")
    rng = random.Random(0)
    vocab = [w for d in docs[:100] for w in d["text"].split()[:50]]
    with open(pos, "w") as f, open(neg, "w") as g:
        for d in docs[:300]:
            f.write(json.dumps({"text": d["text"][:2000]}) + "\n")  # long documents make fastText's SGD diverge
            g.write(json.dumps({"text": " ".join(rng.choice(vocab) for _ in range(200))}) + "\n")
    model = os.path.join(tmp, "quality.bin")
    train([pos], [neg], model, dim=32, bucket=50_000, epoch=5, lr=0.05)
    dc = DecontaminateConfig(enabled=True, paths=[os.path.join(ROOT, "llmforge", "inference", "eval_tasks", "data")])
    index = build_index(dc)
    ours = {"pii": lambda d, c=PIIConfig(enabled=True): get_step("pii")(d, c, Counter()),
            "url_filter": lambda d, c=URLFilterConfig(enabled=True, blocklist=[block]): get_step("url_filter")(d, c),
            "quality_classifier": lambda d, c=QualityClassifierConfig(enabled=True, model_path=model):
                get_step("quality_classifier")(d, c),
            "decontaminate": lambda d, s=DecontaminateStep(index[0], index[1], len(index[2]), "remove"): s(d, dc)}
    try:
        theirs, why = _datatrove_blocks(tmp, domains, model, index), None
    except Exception as e:  # noqa: BLE001 - datatrove or one of its optional dependencies missing
        theirs, why = {}, f"not measured ({type(e).__name__}: {str(e)[:80]})"
    b = nbytes(docs)
    out = {"docs": len(docs), "MB": round(b / 1e6, 2), "decontaminate_index_ngrams": int(len(index[0]))}
    for name, fn in ours.items():
        fn(dict(docs[0], meta=dict(docs[0]["meta"])))  # warm: model / blocklist loaded outside the clock
        row = {"MBps": round(b / _timed(fn, docs) / 1e6, 2), "datatrove_MBps": None}
        if name in theirs:
            theirs[name](docs[0])
            row["datatrove_MBps"] = round(b / _timed(theirs[name], docs) / 1e6, 2)
        out[name] = row
    if why:
        out["datatrove"] = why
    return out


def run_pipeline_cli(input_dir, out_dir, workers, extra=()):
    """The real CLI in a wrapper that reports peak RSS of itself and its (forked) workers."""
    code = ("import resource,subprocess,sys,json,time;t=time.perf_counter();"
            "p=subprocess.run([sys.executable,'-m','data_pipeline','run']+sys.argv[1:],capture_output=True,text=True);"
            "r=max(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,0);"
            "print(json.dumps({'rc':p.returncode,'wall':time.perf_counter()-t,'maxrss_kb':r,'err':p.stderr[-400:]}))")
    args = [sys.executable, "-c", code, os.path.join(ROOT, "configs", "data", "sample.yaml"),
            f"input.paths=[{input_dir}]", f"output_dir={out_dir}", f"workers={workers}", "progress=false",
            "tokenizer.vocab_size=2048", *extra]
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env)
    return json.loads(p.stdout.strip().splitlines()[-1])


def tokenize_compare(sample_docs, mb, tmp, reps=5):
    """Our tokenize stage (tokenize_task over every task: read the kept documents, encode in batches through the
    word cache, EOS, shard writer, ids) vs a plain ``sentencepiece.encode`` loop over the same documents, already
    in memory, with the same model: per worker (the tasks one after another in this process) and on 2 workers
    (the tasks over 2 forked processes, as the local executor runs them). Best of ``reps`` interleaved runs; every
    run of ours starts with an empty word cache, as a new worker does. The synthetic input repeats the sample
    corpus's words more than real text does, so ``cold_sample_corpus`` also times the word cache alone against the
    plain loop on the sample corpus, each document once (little repetition, a cold cache)."""
    import functools
    import multiprocessing as mp

    import sentencepiece as spm
    from data_pipeline import config
    from data_pipeline.pipeline import Context
    from data_pipeline import tokenizer
    from data_pipeline.tokenizer import kept_docs, model_path, tokenize_task
    src = os.path.join(tmp, "tokenize-input")
    make_synthetic(src, sample_docs, mb, seed=3, n_files=8)  # 8 similar tasks: 2 workers can share them evenly
    out = os.path.join(tmp, "tokenize-out")
    r = run_pipeline_cli(src, out, 2, ["steps=[clean]", "dedup.minhash.enabled=false", "dedup.exact.enabled=false"])
    if r["rc"] != 0:
        return {"error": r["err"]}
    cfg = config.load(os.path.join(out, "work", "config.yaml"), ["workers=2"])  # workers > 1: one encode thread
    ctx = Context(cfg)
    docs = [d["text"] for t in range(ctx.n_tasks) for d in kept_docs(ctx, t)]
    b = sum(len(x.encode("utf-8")) for x in docs)
    sp = spm.SentencePieceProcessor(model_file=model_path(ctx))

    def plain_loop():
        for x in docs:
            sp.encode(x)

    def plain_half(i):
        for x in docs[i::2]:
            sp.encode(x)

    def plain_2_procs():  # what 2 cores give at best here: the plain loop, its documents dealt to 2 processes
        procs = [mp.get_context("fork").Process(target=plain_half, args=(i,)) for i in (0, 1)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()

    def one_worker():
        tokenizer._ENCODER.clear()  # a new worker's empty word cache
        for t in range(ctx.n_tasks):
            tokenize_task(ctx, t)

    def two_workers():
        tokenizer._ENCODER.clear()  # the forked workers start with an empty word cache
        with mp.get_context("fork").Pool(2) as pool:
            pool.map(functools.partial(tokenize_task, ctx), range(ctx.n_tasks), chunksize=1)

    best, cpu = {}, {}
    for _ in range(reps):
        for name, fn in (("plain_encode_loop", plain_loop), ("ours_1_worker", one_worker),
                         ("plain_encode_loop_2_procs", plain_2_procs), ("ours_2_workers", two_workers)):
            # as in a first run: on ext4, renaming over an existing file flushes it to disk first
            shutil.rmtree(os.path.join(ctx.work, "tokens"), ignore_errors=True)
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
            cpu[name] = min(cpu.get(name, float("inf")), time.process_time() - c0)
    return {"docs": len(docs), "MB": round(b / 1e6, 2), "tasks": ctx.n_tasks, "vocab": sp.vocab_size(),
            **{f"{k}_MBps": round(b / v / 1e6, 2) for k, v in best.items()},
            "ratio_per_worker": round(best["plain_encode_loop"] / best["ours_1_worker"], 3),
            "ratio_2_workers": round(best["plain_encode_loop"] / best["ours_2_workers"], 3),
            # the machine's own ceiling for ratio_2_workers (shared caches, clocks, a noisy VM neighbour)
            "ratio_plain_loop_2_procs": round(best["plain_encode_loop"] / best["plain_encode_loop_2_procs"], 3),
            # CPU seconds of this process (its helper thread included): what a busy machine cannot distort
            "cpu_ratio_per_worker": round(cpu["plain_encode_loop"] / cpu["ours_1_worker"], 3),
            "cold_sample_corpus": word_cache_cold([d["text"] for d in sample_docs], sp, reps)}


def word_cache_cold(texts, sp, reps):
    """The word cache alone (a new one each run, batches of 256) vs the plain loop, on documents seen once."""
    import numpy as np
    from data_pipeline.encode_cache import CachedEncoder
    best, new = {}, 0
    for _ in range(reps):
        t0 = time.perf_counter()
        for x in texts:
            sp.encode(x)
        best["plain"] = min(best.get("plain", float("inf")), time.perf_counter() - t0)
        enc = CachedEncoder(sp, np.uint16, 1 << 18)
        t0 = time.perf_counter()
        for i in range(0, len(texts), 256):
            enc.encode(texts[i:i + 256])
        best["cache"] = min(best.get("cache", float("inf")), time.perf_counter() - t0)
        new = enc.stats["new_words"] / max(1, enc.stats["words"])
    return {"docs": len(texts), "MB": round(nbytes([{"text": t} for t in texts]) / 1e6, 2),
            "new_word_fraction": round(new, 3), "ratio": round(best["plain"] / best["cache"], 3)}


CLUSTER_PROBE = (  # one cluster-stage task in a fresh interpreter: its peak RSS and traced (numpy + Python) peak
    "import json,resource,sys,tracemalloc;from data_pipeline import config,pipeline;"
    "cfg=config.load(sys.argv[1],sys.argv[4:]);tracemalloc.start();pipeline.run_single_task(cfg,sys.argv[2],int(sys.argv[3]));"
    "hwm=[l for l in open('/proc/self/status') if l.startswith('VmHWM')];"  # ru_maxrss counts the forked parent
    "print(json.dumps({'rss_MB':int(hwm[0].split()[1])/1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024,"
    "'traced_MB':tracemalloc.get_traced_memory()[1]/2**20}))")


def cluster_memory(sample_docs, base_mb, workers, tmp):
    """Peak memory of the dedup cluster stage (every bucket task and the merge, each re-run alone in a fresh
    process) at 1x and 4x input, with the bucket-task count scaled with the input as dedup.cluster_task_mb does
    (2 -> 8), and at 4x with it left at 2 (what the growth would be without more tasks). Filters are off
    (steps=[clean]) so that every document reaches dedup and the runs stay short."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    out, sizes = {}, {}
    for name, scale, parts in (("1x", 1, 2), ("4x", 4, 8), ("4x_unscaled", 4, 2)):
        d = os.path.join(tmp, f"cluster-{scale}")
        if scale not in sizes:
            sizes[scale] = make_synthetic(d, sample_docs, base_mb * scale, seed=2)[1]
        b = sizes[scale]
        o = os.path.join(tmp, f"cluster-out-{name}")
        r = run_pipeline_cli(d, o, workers, ["steps=[clean]", f"dedup.cluster_tasks={parts}"])
        if r["rc"]:
            out[name] = {"error": r["err"]}
            continue
        cfg_path = os.path.join(o, "work", "config.yaml")
        rows = {}
        # the merge once more without the precision sample (its shingles are bounded by precision_sample, not
        # by the corpus): what is left is the union-find itself
        for label, stage, ranks, extra in (("buckets", "buckets", range(parts), []), ("clusters", "clusters", [0], []),
                                           ("clusters_nosample", "clusters", [0],
                                            ["dedup.minhash.precision_sample=0"])):
            for rank in ranks:
                os.remove(os.path.join(o, "work", "markers", stage, f"{rank:05d}.json"))
                p = subprocess.run([sys.executable, "-c", CLUSTER_PROBE, cfg_path, stage, str(rank), *extra],
                                   cwd=ROOT, env=env, capture_output=True, text=True)
                rows.setdefault(label, []).append(json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0
                                                  else {"error": p.stderr[-300:]})
        stats = json.load(open(os.path.join(o, "stats.json")))["dedup"]
        out[name] = {"input_MB": round(b / 1e6, 1), "docs": stats["docs_in"], "cluster_tasks": parts,
                     "removed": stats["exact"]["removed"] + stats["minhash"]["removed"],
                     **{f"{s}_{k}": round(max(x.get(k, 0) for x in v), 1) for s, v in rows.items()
                        for k in ("rss_MB", "traced_MB")}}
        shutil.rmtree(o, ignore_errors=True)
        print(f"cluster stage at {name}: {out[name]}", flush=True)
    if all("error" not in out.get(k, {"error": 1}) for k in ("1x", "4x")):
        out["ratios_4x_vs_1x"] = {k: round(out["4x"][k] / max(out["1x"][k], 1e-3), 2)
                                  for k in out["1x"] if k.endswith("_MB") and k != "input_MB"}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--synthetic-mb", type=float, default=12.0)
    ap.add_argument("--rss-mb", type=float, nargs="+", default=[3.0, 6.0, 12.0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--skip-cli", action="store_true", help="skip the whole-pipeline runs (parts 3 to 5)")
    ap.add_argument("--cluster-mb", type=float, default=6.0, help="1x input of the cluster-stage memory runs")
    ap.add_argument("--tokenize-mb", type=float, default=6.0, help="input of the tokenize-stage comparison")
    ap.add_argument("--tokenize-only", action="store_true", help="run only the tokenize-stage comparison (part 3)")
    ap.add_argument("--new-steps-only", action="store_true", help="run only the off-by-default steps (part 6)")
    a = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="bench-dp-")
    result = {"device": device_name(), "note": "per-step figures: one process, one thread = per core"}
    try:
        corpora = {}
        cfg, docs, read_s = read_docs([SAMPLE])
        corpora["sample"] = (cfg, docs, read_s)
        if a.tokenize_only:
            _tokenize_part(result, docs, a.tokenize_mb, tmp)
            return
        result["new_steps"] = new_steps(docs, tmp)
        print(f"new steps: {result['new_steps']}", flush=True)
        if a.new_steps_only:
            return
        synth_dir = os.path.join(tmp, "synth")
        n, b = make_synthetic(synth_dir, docs, a.synthetic_mb)
        print(f"synthetic mix: {n} documents, {b / 1e6:.1f} MB", flush=True)
        corpora["synthetic"] = read_docs([synth_dir])
        for name, (cfg, docs, read_s) in corpora.items():
            b = nbytes(docs)
            steps, kept = per_step(cfg, docs)
            rows = {"read": {"s": read_s, "docs": len(docs), "bytes": b}, **steps}
            table = {}
            for k, v in rows.items():
                table[k] = {"MBps": round(v["bytes"] / v["s"] / 1e6, 2), "docs_per_s": round(v["docs"] / v["s"], 1),
                            **({"removed": v["removed"]} if "removed" in v else {})}
            mh = minhash_baselines([d["text"] for d in kept])
            kb = nbytes(kept)
            mh_res = {"ours_MBps": table["minhash"]["MBps"],
                      "plain_datasketch_MBps": round(kb / mh["plain_datasketch_s"] / 1e6, 2),
                      "datasketch_reused_perms_MBps": round(kb / mh["datasketch_reused_perms_s"] / 1e6, 2),
                      "speedup_vs_plain_datasketch": round(mh["plain_datasketch_s"] / steps["minhash"]["s"], 2),
                      "speedup_vs_reused_perms": round(mh["datasketch_reused_perms_s"] / steps["minhash"]["s"], 2)}
            if "datatrove_s" in mh:
                mh_res["datatrove_MBps"] = round(kb / mh["datatrove_s"] / 1e6, 2)
                mh_res["speedup_vs_datatrove"] = round(mh["datatrove_s"] / steps["minhash"]["s"], 2)
            else:
                mh_res["datatrove"] = mh["datatrove"]
            result[name] = {"docs": len(docs), "MB": round(b / 1e6, 2), "per_step": table, "minhash": mh_res}
            result.setdefault("minhash_vs_plain_datasketch", {})[name] = mh_res["speedup_vs_plain_datasketch"]
            print(f"{name}: " + ", ".join(f"{k} {v['MBps']} MB/s" for k, v in table.items()), flush=True)
            print(f"{name}: minhash ours {mh_res['ours_MBps']} MB/s vs plain datasketch "
                  f"{mh_res['plain_datasketch_MBps']} MB/s (x{mh_res['speedup_vs_plain_datasketch']})", flush=True)
        if not a.skip_cli:
            _tokenize_part(result, corpora["sample"][1], a.tokenize_mb, tmp)
            growth = []
            for mb in a.rss_mb:
                d = os.path.join(tmp, f"rss-{mb}")
                n, b = make_synthetic(d, corpora["sample"][1], mb, seed=1)
                out = os.path.join(tmp, f"out-{mb}")
                r = run_pipeline_cli(d, out, a.workers)
                shutil.rmtree(out, ignore_errors=True)
                row = {"input_MB": round(b / 1e6, 2), "docs": n, "rc": r["rc"], "wall_s": round(r["wall"], 2),
                       "MBps_total": round(b / r["wall"] / 1e6, 3), "peak_rss_MB": round(r["maxrss_kb"] / 1024, 1)}
                if r["rc"]:
                    row["error"] = r["err"]
                growth.append(row)
                print(f"pipeline CLI on {row['input_MB']} MB: {row['wall_s']} s, peak RSS {row['peak_rss_MB']} MB",
                      flush=True)
            result["cli_growth"] = growth
            result["cluster_stage_memory"] = cluster_memory(corpora["sample"][1], a.cluster_mb, a.workers, tmp)
            if len(growth) >= 2 and growth[0]["peak_rss_MB"]:
                result["rss_growth_ratio"] = round(growth[-1]["peak_rss_MB"] / growth[0]["peak_rss_MB"], 3)
                result["input_growth_ratio"] = round(growth[-1]["input_MB"] / growth[0]["input_MB"], 3)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        emit("data_pipeline_tokenize" if a.tokenize_only else "data_pipeline_steps" if a.new_steps_only
             else "data_pipeline", result)


def _tokenize_part(result, sample_docs, mb, tmp):
    tok = tokenize_compare(sample_docs, mb, tmp)
    result["tokenize_vs_plain_encode_loop"] = tok
    # goals: ratio_per_worker >= 0.95, ratio_2_workers >= 1.8 (idle machine); the third is the machine's ceiling
    for k in ("ratio_per_worker", "ratio_2_workers", "ratio_plain_loop_2_procs"):
        result[f"tokenize_{k}"] = tok.get(k)
    print(f"tokenize: {tok}", flush=True)


if __name__ == "__main__":
    main()
