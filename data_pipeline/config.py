"""The data pipeline's typed config (YAML + dotted overrides via llmforge.common.typed_config.load_config).

Contract keys (others rely on them): ``input.paths``, ``input.text_key``, ``output_dir``, ``workers``,
``tokenizer.vocab_size``. Every other key has a published default; ``python -m data_pipeline keys`` lists them.
"""
from __future__ import annotations

import dataclasses

from llmforge.common.typed_config import ConfigError, check_ranges, load_config, opt  # noqa: F401  (re-exported for the CLI)

STEP_NAMES = ("clean", "url_filter", "pii", "length", "lang", "gopher_repetition", "gopher_quality", "c4", "fineweb",
              "decontaminate", "quality_classifier")


@dataclasses.dataclass
class InputConfig:
    paths: list[str] = opt([], "input files, folders or globs (jsonl[.gz|.zst], parquet, txt/md/rst, html, "
                               "or a datasets save_to_disk folder)")
    text_key: str = opt("text", "field holding the document text (jsonl, parquet, HF datasets)")
    id_key: str = opt("", "field copied into the output metadata as source_id (ids stay file:line)")
    metadata_keys: list[str] = opt([], "fields carried along with each document (e.g. source, license, url)")
    url_key: str = opt("url", "field holding the document's URL, read (into meta) when url_filter.enabled")
    format: str = opt("auto", "auto (by extension) | jsonl | parquet | text | html | hf_json | hf_parquet | hf_disk")
    hf_dataset: str = opt("", "Hugging Face Hub dataset name, read with datasets.load_dataset (needs network)")
    hf_config: str = opt("", "Hub dataset config name")
    hf_split: str = opt("train", "split for hf_dataset / load_from_disk DatasetDicts")
    hf_streaming: bool = opt(True, "stream hf_dataset instead of downloading it first")
    on_error: str = opt("fail", "fail: stop at a bad record naming file:line | skip: count it under 'read_errors'")
    max_doc_chars: int = opt(5_000_000, "a document longer than this is a bad record (on_error decides)", ge=1)
    min_doc_chars: int = opt(1, "shorter documents (after reading) are dropped and counted as 'empty'", ge=0)
    task_mb: float = opt(32.0, "with tasks=0: one task per this many MB of a plain jsonl or parquet file (split "
                               "by byte range / row group), plus one per other file; at most 64", gt=0)


@dataclasses.dataclass
class CleanConfig:
    enabled: bool = opt(True, "Unicode NFC, control characters removed, whitespace normalised")
    normalization: str = opt("NFC", "unicodedata form: NFC | NFKC | none")
    max_blank_lines: int = opt(1, "collapse runs of blank lines to at most this many", ge=0)


@dataclasses.dataclass
class URLFilterConfig:
    enabled: bool = opt(False, "drop documents whose URL (input.url_key) has a blocklisted domain or a banned word "
                               "(documents without a URL are kept)")
    blocklist: list[str] = opt([], "files of domains, one a line (# comments, blank lines); a domain also blocks its "
                                   "subdomains (rule url_filter.blocklist)")
    banned_words: list[str] = opt([], "words matched case-insensitively against the URL's words, split at "
                                      "non-alphanumerics (rule url_filter.banned_words)")


@dataclasses.dataclass
class PIIConfig:
    enabled: bool = opt(False, "redact emails and public IP addresses (as datatrove's PIIFormatter; the document is "
                               "kept, stats count the redactions)")
    emails: bool = opt(True, "replace email addresses with email_replacement")
    ips: bool = opt(True, "replace global IPv4/IPv6 addresses (not private, reserved, loopback, ... nor version "
                          "numbers) with ip_replacement")
    email_replacement: str = opt("email@example.com", "placeholder of every redacted email")
    ip_replacement: str = opt("22.214.171.124", "placeholder of every redacted IP address")


@dataclasses.dataclass
class LengthConfig:
    enabled: bool = opt(True, "drop documents outside character / word bounds")
    min_chars: int = opt(200, "fewer characters -> removed (rule length.min_chars)", ge=0)
    max_chars: int = opt(1_000_000, "more characters -> removed (rule length.max_chars)", ge=1)
    min_words: int = opt(0, "fewer whitespace words -> removed (0: off)", ge=0)


@dataclasses.dataclass
class LangConfig:
    enabled: bool = opt(True, "language ID with langid (offline model from the PyPI package)")
    languages: list[str] = opt(["en"], "ISO 639-1 codes to keep (empty: keep all, only annotate)")
    min_score: float = opt(0.65, "normalised langid probability below this -> removed", ge=0, le=1)
    max_chars: int = opt(2000, "classify only this many leading characters (speed)", ge=1)


@dataclasses.dataclass
class GopherRepetitionConfig:
    enabled: bool = opt(True, "Gopher repetition rules (Rae et al. 2021, datatrove defaults)")
    words: str = opt("whitespace", "words of the n-gram rules: whitespace | datatrove (the words datatrove 0.10.1 "
                                   "counts, for identical decisions; see filters/word_split.py)")
    dup_line_frac: float = opt(0.30, "duplicate lines / lines", ge=0, le=1)
    dup_para_frac: float = opt(0.30, "duplicate paragraphs / paragraphs", ge=0, le=1)
    dup_line_char_frac: float = opt(0.20, "characters in duplicate lines / characters", ge=0, le=1)
    dup_para_char_frac: float = opt(0.20, "characters in duplicate paragraphs / characters", ge=0, le=1)
    top_n_grams: dict = opt({2: 0.20, 3: 0.18, 4: 0.16}, "n -> max character fraction of the top n-gram", ge=0, le=1)
    dup_n_grams: dict = opt({5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
                            "n -> max character fraction covered by duplicated n-grams", ge=0, le=1)


@dataclasses.dataclass
class GopherQualityConfig:
    enabled: bool = opt(True, "Gopher quality rules (Rae et al. 2021)")
    words: str = opt("whitespace", "words counted by the rules: whitespace | datatrove (the words datatrove 0.10.1 "
                                   "counts, for identical decisions; see filters/word_split.py)")
    min_words: int = opt(50, "fewer non-symbol words -> removed", ge=0)
    max_words: int = opt(100_000, "more non-symbol words -> removed", ge=0)
    min_avg_word_length: float = opt(3.0, "mean word length bounds", ge=0)
    max_avg_word_length: float = opt(10.0, "mean word length bounds", ge=0)
    max_symbol_word_ratio: float = opt(0.10, "'#' and ellipsis count / words", ge=0)
    max_bullet_lines_ratio: float = opt(0.90, "lines starting with a bullet / lines", ge=0, le=1)
    max_ellipsis_lines_ratio: float = opt(0.30, "lines ending with an ellipsis / lines", ge=0, le=1)
    min_alpha_words_ratio: float = opt(0.80, "words with an alphabetic character / words", ge=0, le=1)
    min_stop_words: int = opt(2, "at least this many distinct words of {the, be, to, of, and, that, have, with}", ge=0)


@dataclasses.dataclass
class C4Config:
    enabled: bool = opt(True, "C4 line rules + document rules (Raffel et al. 2020)")
    words: str = opt("whitespace", "sentence counting: whitespace (a period, ? or ! before a space) | datatrove "
                                   "(datatrove 0.10.1's spaCy sentencizer, for identical decisions)")
    terminal_punct: bool = opt(True, "drop lines not ending in . ? ! \" '")
    min_words_per_line: int = opt(3, "drop lines with fewer words", ge=0)
    max_word_length: int = opt(1000, "drop lines containing a longer word", ge=1)
    javascript: bool = opt(True, "drop lines mentioning javascript")
    policy: bool = opt(True, "drop cookie / privacy / terms-of-use lines")
    remove_citations: bool = opt(True, "strip [1], [edit], [citation needed]")
    lorem_ipsum: bool = opt(True, "drop documents containing 'lorem ipsum'")
    curly_bracket: bool = opt(True, "drop documents containing '{' (the published rule; it also removes most code)")
    min_sentences: int = opt(5, "drop documents with fewer sentences after line filtering", ge=0)


@dataclasses.dataclass
class FineWebConfig:
    enabled: bool = opt(True, "FineWeb quality rules (Penedo et al. 2024)")
    words: str = opt("datatrove", "words of new_line_ratio: datatrove (as FineWeb's reference implementation "
                                  "counts them) | whitespace (faster)")
    line_punct_thr: float = opt(0.12, "min fraction of lines ending in terminal punctuation", ge=0, le=1)
    short_line_length: int = opt(30, "a line this short or shorter counts as short", ge=0)
    short_line_thr: float = opt(0.67, "max fraction of short lines", ge=0, le=1)
    char_dup_ratio: float = opt(0.01, "max fraction of characters in duplicated lines", ge=0, le=1)
    new_line_ratio: float = opt(0.30, "max newlines per word", ge=0)


@dataclasses.dataclass
class QualityClassifierConfig:
    enabled: bool = opt(False, "score documents with a trained fastText classifier (python -m data_pipeline "
                               "train-classifier; filters/quality_classifier.py); the score goes to meta.quality_score")
    model_path: str = opt("", "the fastText model (.bin) written by train-classifier")
    label: str = opt("hq", "the score is the model's probability of __label__<label>")
    threshold: float = opt(0.5, "documents scoring below this are removed (when keep_fraction is 1)", ge=0, le=1)
    keep_fraction: float = opt(1.0, "below 1: keep this top share of each task's documents by score (ties: the "
                                    "earlier document) instead of a threshold; the step must then be the last",
                               gt=0, le=1)
    max_chars: int = opt(0, "score only this many leading characters (0: the whole document)", ge=0)


@dataclasses.dataclass
class DecontaminateConfig:
    enabled: bool = opt(False, "remove (or redact) training documents sharing a word n-gram with an evaluation "
                               "document (filters/decontaminate.py; datatrove's normalisation; the index costs "
                               "12 bytes per distinct n-gram of each file)")
    paths: list[str] = opt([], "evaluation files (jsonl[.gz|.zst], parquet, txt/md/rst) or folders of them, e.g. "
                               "llmforge/inference/eval_tasks/data; their content is part of the run's fingerprint")
    text_keys: list[str] = opt(["text", "context", "query", "question", "prompt", "target", "answer", "choices"],
                               "fields of a jsonl/parquet row forming its evaluation text (those present, in this "
                               "order; a list field gives each item), joined by line breaks")
    ngram: int = opt(13, "words per n-gram (13 as GPT-3; datatrove's default is 12); evaluation documents with "
                         "fewer words are ignored, as datatrove does", ge=1)
    mode: str = opt("remove", "remove: drop the document (rule decontaminate.contaminated) | redact: cut the shared "
                              "word spans out of its text (nothing left: rule decontaminate.redacted_empty)")


@dataclasses.dataclass
class ExactDedupConfig:
    enabled: bool = opt(True, "drop documents whose normalised content (lowercase, collapsed whitespace) hash repeats")


@dataclasses.dataclass
class MinHashConfig:
    enabled: bool = opt(True, "MinHash LSH near-duplicate removal (datasketch, xxh64, scheme affine64)")
    ngram: int = opt(5, "word n-gram shingle size", ge=1)
    bands: int = opt(14, "LSH bands (14 x 8: S-curve threshold ~0.72)", ge=1)
    rows: int = opt(8, "hashes per band", ge=1)
    seed: int = opt(1, "MinHash permutation seed", ge=0, le=2**32 - 1)
    verify: bool = opt(False, "drop candidate pairs whose exact shingle Jaccard < threshold (memory ~ candidates)")
    threshold: float = opt(0.7, "Jaccard threshold for verification and the precision estimate", ge=0, le=1)
    precision_sample: int = opt(200, "candidate pairs checked exactly to estimate LSH precision (0: off)", ge=0)


@dataclasses.dataclass
class DedupConfig:
    exact: ExactDedupConfig = opt(ExactDedupConfig(), "exact dedup")
    minhash: MinHashConfig = opt(MinHashConfig(), "near dedup")
    write_clusters: bool = opt(True, "write work/dedup/clusters.jsonl.zst (member ids per duplicate cluster)")
    cluster_tasks: int = opt(0, "bucket tasks, each a range of bucket keys (partitioned union-find, then one "
                                "merge); 0: one per dedup.cluster_task_mb of input, at most 64. No output depends on it",
                             ge=0)
    cluster_task_mb: float = opt(1000.0, "with cluster_tasks=0: MB of input (on disk) per bucket task", gt=0)


@dataclasses.dataclass
class TokenizerConfig:
    vocab_size: int = opt(4096, "sentencepiece vocabulary size (ids unk=0 bos=1 eos=2 pad=3)", ge=1)
    model_type: str = opt("bpe", "bpe | unigram")
    model_path: str = opt("", "use this existing .model instead of training one")
    sample_bytes: int = opt(20_000_000, "train on a deterministic sample of about this many bytes of kept text", ge=1)
    character_coverage: float = opt(0.9995, "sentencepiece character_coverage (byte_fallback covers the rest)",
                                    gt=0, le=1)
    max_sentence_length: int = opt(8192, "longer training lines are skipped by sentencepiece", ge=1)
    seed: int = opt(0, "seed of the training-sample hash", ge=0, le=2**32 - 1)
    encode_cache_words: int = opt(1 << 18, "tokenize stage: words whose ids each worker keeps (encoded once, "
                                           "then copied: data_pipeline/encode_cache.py; the ids are exactly "
                                           "sentencepiece's). About 150 B each (40 MB at the default); 0: "
                                           "sentencepiece on every document", ge=0)


@dataclasses.dataclass
class ShardConfig:
    target_mb: float = opt(256.0, "start a new .bin after about this many megabytes of tokens", gt=0)
    valid_fraction: float = opt(0.005, "documents whose id hashes below this fraction go to valid-*", ge=0, lt=1)
    split_seed: int = opt(0, "seed of the validation-split hash", ge=0, le=2**32 - 1)
    batch_docs: int = opt(256, "tokenize stage: documents encoded and written per batch", ge=1)


@dataclasses.dataclass
class SFTConfig:
    enabled: bool = opt(False, "supervised fine-tuning rows -> chat-template shards + loss_mask/ (data_pipeline/sft.py); "
                               "needs tokenizer.model_path")
    prompt_key: str = opt("prompt", "field of the prompt in {prompt, response} rows")
    response_key: str = opt("response", "field of the response in {prompt, response} rows")
    system_key: str = opt("system", "optional system-message field in {prompt, response} rows")
    messages_key: str = opt("messages", "field of [{role: system|user|assistant, content}] in chat rows")
    max_tokens: int = opt(0, "a conversation longer than this many tokens is a bad row (on_error) unless "
                             "truncation=right (0: no limit; use the trainer's data.seq_len + 1)", ge=0)
    truncation: str = opt("none", "none | right: cut at max_tokens (a row left without response tokens is bad)")


@dataclasses.dataclass
class SlurmConfig:
    partition: str = opt("", "sbatch --partition (empty: the cluster default)")
    cpus_per_task: int = opt(1, "sbatch --cpus-per-task", ge=1)
    mem: str = opt("", "sbatch --mem, e.g. 8G (empty: default)")
    time: str = opt("", "sbatch --time, e.g. 02:00:00 (empty: default)")
    max_parallel: int = opt(0, "array throttle %N (0: none)", ge=0)
    extra_args: list[str] = opt([], "more sbatch arguments, passed as separate argv items")
    python: str = opt("", "python interpreter for the tasks (empty: the one submitting)")
    wait: bool = opt(True, "poll until the jobs finish, then print the summary")
    poll_s: float = opt(2.0, "seconds between polls", gt=0)


@dataclasses.dataclass
class RayConfig:
    address: str = opt("", "Ray cluster: empty = RAY_ADDRESS, else a cluster started here by `ray start`, else a new "
                           "local instance with `workers` CPUs | auto (an existing cluster only) | HOST:6379 | "
                           "ray://HOST:10001 (Ray Client)")
    num_cpus_per_task: float = opt(1.0, "CPUs Ray reserves for each task (sets how many run at once)", gt=0)
    max_retries: int = opt(3, "Ray retries of a task whose worker died (tasks are idempotent)", ge=0)
    object_store_mb: int = opt(256, "object store of a local instance started here (tasks pass only small objects)",
                               ge=75)
    log_to_driver: bool = opt(False, "stream the Ray workers' stdout/stderr to this terminal")
    connect_timeout: float = opt(60.0, "seconds to wait for the Ray cluster at ray.address (or auto) to answer "
                                       "before the run fails in one line naming the address", gt=0)


@dataclasses.dataclass
class PipelineConfig:
    output_dir: str = opt("outputs/data", "where shards/, tokenizer.model, stats.json, config.yaml and work/ go")
    workers: int = opt(2, "local worker processes (does not change any output)", ge=1)
    tasks: int = opt(0, "input tasks, each a contiguous range of the input (big jsonl/parquet files are split); "
                        "0: automatic (input.task_mb, and at least `workers` when a file can be split). Outputs "
                        "do not depend on it", ge=0)
    executor: str = opt("local", "local | slurm | ray")
    steps: list[str] = opt(list(STEP_NAMES), "order of the per-document steps (each also has enabled)")
    keep_work_files: bool = opt(True, "keep work/prepared, signatures, dedup, tokens after success (false: delete "
                                      "them; markers stay, so a rerun is still a no-op)")
    write_rejects: bool = opt(False, "write work/rejects/*.jsonl.zst with the id and rule of every removed document")
    progress: bool = opt(True, "tqdm progress bars")
    input: InputConfig = opt(InputConfig(), "readers")
    clean: CleanConfig = opt(CleanConfig(), "normalisation")
    url_filter: URLFilterConfig = opt(URLFilterConfig(), "URL blocklist / banned-word filter")
    pii: PIIConfig = opt(PIIConfig(), "PII redaction (emails, IP addresses)")
    length: LengthConfig = opt(LengthConfig(), "length filter")
    lang: LangConfig = opt(LangConfig(), "language filter")
    gopher_repetition: GopherRepetitionConfig = opt(GopherRepetitionConfig(), "Gopher repetition filter")
    gopher_quality: GopherQualityConfig = opt(GopherQualityConfig(), "Gopher quality filter")
    c4: C4Config = opt(C4Config(), "C4 filter")
    fineweb: FineWebConfig = opt(FineWebConfig(), "FineWeb filter")
    decontaminate: DecontaminateConfig = opt(DecontaminateConfig(), "benchmark decontamination (n-gram overlap)")
    quality_classifier: QualityClassifierConfig = opt(QualityClassifierConfig(), "trained quality classifier")
    dedup: DedupConfig = opt(DedupConfig(), "deduplication")
    tokenizer: TokenizerConfig = opt(TokenizerConfig(), "tokenizer training")
    shards: ShardConfig = opt(ShardConfig(), "token shards")
    slurm: SlurmConfig = opt(SlurmConfig(), "Slurm executor")
    ray: RayConfig = opt(RayConfig(), "Ray executor (data_pipeline/ray_executor.py)")
    sft: SFTConfig = opt(SFTConfig(), "supervised fine-tuning data (chat rows, loss masks)")

    def validate(self) -> None:
        def need(ok, key, msg):
            if not ok:
                raise ConfigError(f"{key}: {msg}")
        check_ranges(self)  # every numeric key's declared range (opt(..., ge=...)): also for configs built in code
        need(bool(self.input.paths) or bool(self.input.hf_dataset), "input.paths", "no input given")
        need(self.executor in ("local", "slurm", "ray"), "executor", f"{self.executor!r} is not local, slurm or ray")
        need(0 < self.ray.connect_timeout < float("inf"), "ray.connect_timeout", "must be finite and > 0 (seconds)")
        for s in self.steps:
            need(s in STEP_NAMES, "steps", f"unknown step {s!r}; valid: {', '.join(STEP_NAMES)}")
        need(len(set(self.steps)) == len(self.steps), "steps", "a step is listed twice")
        for s in ("url_filter", "pii", "decontaminate"):  # off by default: enabling one a config's steps list leaves out does nothing
            need(not getattr(self, s).enabled or s in self.steps, f"{s}.enabled",
                 f"{s} is not in steps ({', '.join(self.steps)}): add it there")
        need(bool(self.input.url_key) or not self.url_filter.enabled, "input.url_key", "url_filter needs a URL field")
        need(self.input.on_error in ("fail", "skip"), "input.on_error", "must be fail or skip")
        need(self.input.format in ("auto", "jsonl", "parquet", "text", "html", "hf_json", "hf_parquet", "hf_disk"),
             "input.format", f"{self.input.format!r} is not a known format")
        need(self.tokenizer.model_type in ("bpe", "unigram"), "tokenizer.model_type", "must be bpe or unigram")
        need(self.tokenizer.vocab_size >= 300 or bool(self.tokenizer.model_path), "tokenizer.vocab_size",
             "must be >= 300 (256 byte-fallback pieces + specials)")
        for lo, hi in (("length.min_chars", "length.max_chars"), ("gopher_quality.min_words", "gopher_quality.max_words"),
                       ("gopher_quality.min_avg_word_length", "gopher_quality.max_avg_word_length")):
            lo_v, hi_v = (getattr(getattr(self, k.split(".")[0]), k.split(".")[1]) for k in (lo, hi))
            need(lo_v <= hi_v, lo, f"{lo_v} is above {hi}={hi_v}: the rule would remove every document")
        for name in ("top_n_grams", "dup_n_grams"):  # n -> fraction: the values have a range, the keys are sizes
            sizes = getattr(self.gopher_repetition, name)
            need(all(str(n).isdigit() and int(n) >= 1 for n in sizes), f"gopher_repetition.{name}",
                 f"keys are n-gram sizes >= 1, got {sorted(map(str, sizes))}")
        need(self.clean.normalization in ("NFC", "NFKC", "none"), "clean.normalization", "must be NFC, NFKC or none")
        for name in ("gopher_repetition", "gopher_quality", "c4", "fineweb"):
            words = getattr(self, name).words
            need(words in ("whitespace", "datatrove"), f"{name}.words", f"{words!r} is not whitespace or datatrove")
        need(not self.sft.enabled or bool(self.tokenizer.model_path), "tokenizer.model_path",
             "sft.enabled needs the pretraining tokenizer (tokenizer.model_path=.../tokenizer.model)")
        qc = self.quality_classifier
        need(not (qc.enabled and qc.keep_fraction < 1 and "quality_classifier" in self.steps
                  and self.steps[-1] != "quality_classifier"), "quality_classifier.keep_fraction",
             "a top share needs quality_classifier to be the last of steps (it is decided after the task's other steps)")
        need(not qc.enabled or "quality_classifier" in self.steps, "quality_classifier.enabled",
             "quality_classifier is not listed in steps")
        dc = self.decontaminate
        need(dc.mode in ("remove", "redact"), "decontaminate.mode", f"{dc.mode!r} is not remove or redact")
        need(not dc.enabled or bool(dc.paths), "decontaminate.paths", "decontaminate.enabled needs evaluation files")
        need(not dc.enabled or bool(dc.text_keys), "decontaminate.text_keys", "empty: no field holds the text")
        need(self.sft.truncation in ("none", "right"), "sft.truncation", "must be none or right")


def load(path: str | None, overrides: list[str] | None = None) -> PipelineConfig:
    import dataclasses
    import os
    cfg = load_config(PipelineConfig, path, overrides)
    # `output_dir: ~/x` in a YAML file: no shell expanded it (it was a folder named ~ in the cwd, an input not found);
    # a copy with the paths expanded, the validated object is left as it is
    ex = os.path.expanduser
    return dataclasses.replace(cfg, output_dir=ex(cfg.output_dir),
                               input=dataclasses.replace(cfg.input, paths=[ex(p) for p in cfg.input.paths]),
                               tokenizer=dataclasses.replace(cfg.tokenizer, model_path=ex(cfg.tokenizer.model_path)))
