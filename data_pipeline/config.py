"""The data pipeline's typed config (YAML + dotted overrides via llmforge.config.load_config).

Contract keys (others rely on them): ``input.paths``, ``input.text_key``, ``output_dir``, ``workers``,
``tokenizer.vocab_size``. Every other key has a published default; ``python -m data_pipeline keys`` lists them.
"""
from __future__ import annotations

import dataclasses

from llmforge.config import ConfigError, load_config, opt  # noqa: F401  (re-exported for the CLI)

STEP_NAMES = ("clean", "length", "lang", "gopher_repetition", "gopher_quality", "c4", "fineweb")


@dataclasses.dataclass
class InputConfig:
    paths: list[str] = opt([], "input files, folders or globs (jsonl[.gz|.zst], parquet, txt/md/rst, html, "
                               "or a datasets save_to_disk folder)")
    text_key: str = opt("text", "field holding the document text (jsonl, parquet, HF datasets)")
    id_key: str = opt("", "field copied into the output metadata as source_id (ids stay file:line)")
    metadata_keys: list[str] = opt([], "fields carried along with each document (e.g. source, license, url)")
    format: str = opt("auto", "auto (by extension) | jsonl | parquet | text | html | hf_json | hf_parquet | hf_disk")
    hf_dataset: str = opt("", "Hugging Face Hub dataset name, read with datasets.load_dataset (needs network)")
    hf_config: str = opt("", "Hub dataset config name")
    hf_split: str = opt("train", "split for hf_dataset / load_from_disk DatasetDicts")
    hf_streaming: bool = opt(True, "stream hf_dataset instead of downloading it first")
    on_error: str = opt("fail", "fail: stop at a bad record naming file:line | skip: count it under 'read_errors'")
    max_doc_chars: int = opt(5_000_000, "a document longer than this is a bad record (on_error decides)")
    min_doc_chars: int = opt(1, "shorter documents (after reading) are dropped and counted as 'empty'")
    task_mb: float = opt(32.0, "with tasks=0: one task per this many MB of a plain jsonl or parquet file (split "
                               "by byte range / row group), plus one per other file; at most 64")


@dataclasses.dataclass
class CleanConfig:
    enabled: bool = opt(True, "Unicode NFC, control characters removed, whitespace normalised")
    normalization: str = opt("NFC", "unicodedata form: NFC | NFKC | none")
    max_blank_lines: int = opt(1, "collapse runs of blank lines to at most this many")


@dataclasses.dataclass
class LengthConfig:
    enabled: bool = opt(True, "drop documents outside character / word bounds")
    min_chars: int = opt(200, "fewer characters -> removed (rule length.min_chars)")
    max_chars: int = opt(1_000_000, "more characters -> removed (rule length.max_chars)")
    min_words: int = opt(0, "fewer whitespace words -> removed (0: off)")


@dataclasses.dataclass
class LangConfig:
    enabled: bool = opt(True, "language ID with langid (offline model from the PyPI package)")
    languages: list[str] = opt(["en"], "ISO 639-1 codes to keep (empty: keep all, only annotate)")
    min_score: float = opt(0.65, "normalised langid probability below this -> removed")
    max_chars: int = opt(2000, "classify only this many leading characters (speed)")


@dataclasses.dataclass
class GopherRepetitionConfig:
    enabled: bool = opt(True, "Gopher repetition rules (Rae et al. 2021, datatrove defaults)")
    words: str = opt("whitespace", "words of the n-gram rules: whitespace | datatrove (the words datatrove 0.10.1 "
                                   "counts, for identical decisions; see filters/word_split.py)")
    dup_line_frac: float = opt(0.30, "duplicate lines / lines")
    dup_para_frac: float = opt(0.30, "duplicate paragraphs / paragraphs")
    dup_line_char_frac: float = opt(0.20, "characters in duplicate lines / characters")
    dup_para_char_frac: float = opt(0.20, "characters in duplicate paragraphs / characters")
    top_n_grams: dict = opt({2: 0.20, 3: 0.18, 4: 0.16}, "n -> max character fraction of the top n-gram")
    dup_n_grams: dict = opt({5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
                            "n -> max character fraction covered by duplicated n-grams")


@dataclasses.dataclass
class GopherQualityConfig:
    enabled: bool = opt(True, "Gopher quality rules (Rae et al. 2021)")
    words: str = opt("whitespace", "words counted by the rules: whitespace | datatrove (the words datatrove 0.10.1 "
                                   "counts, for identical decisions; see filters/word_split.py)")
    min_words: int = opt(50, "fewer non-symbol words -> removed")
    max_words: int = opt(100_000, "more non-symbol words -> removed")
    min_avg_word_length: float = opt(3.0, "mean word length bounds")
    max_avg_word_length: float = opt(10.0, "mean word length bounds")
    max_symbol_word_ratio: float = opt(0.10, "'#' and ellipsis count / words")
    max_bullet_lines_ratio: float = opt(0.90, "lines starting with a bullet / lines")
    max_ellipsis_lines_ratio: float = opt(0.30, "lines ending with an ellipsis / lines")
    min_alpha_words_ratio: float = opt(0.80, "words with an alphabetic character / words")
    min_stop_words: int = opt(2, "at least this many distinct words of {the, be, to, of, and, that, have, with}")


@dataclasses.dataclass
class C4Config:
    enabled: bool = opt(True, "C4 line rules + document rules (Raffel et al. 2020)")
    words: str = opt("whitespace", "sentence counting: whitespace (a period, ? or ! before a space) | datatrove "
                                   "(datatrove 0.10.1's spaCy sentencizer, for identical decisions)")
    terminal_punct: bool = opt(True, "drop lines not ending in . ? ! \" '")
    min_words_per_line: int = opt(3, "drop lines with fewer words")
    max_word_length: int = opt(1000, "drop lines containing a longer word")
    javascript: bool = opt(True, "drop lines mentioning javascript")
    policy: bool = opt(True, "drop cookie / privacy / terms-of-use lines")
    remove_citations: bool = opt(True, "strip [1], [edit], [citation needed]")
    lorem_ipsum: bool = opt(True, "drop documents containing 'lorem ipsum'")
    curly_bracket: bool = opt(True, "drop documents containing '{' (the published rule; it also removes most code)")
    min_sentences: int = opt(5, "drop documents with fewer sentences after line filtering")


@dataclasses.dataclass
class FineWebConfig:
    enabled: bool = opt(True, "FineWeb quality rules (Penedo et al. 2024)")
    words: str = opt("datatrove", "words of new_line_ratio: datatrove (as FineWeb's reference implementation "
                                  "counts them) | whitespace (faster)")
    line_punct_thr: float = opt(0.12, "min fraction of lines ending in terminal punctuation")
    short_line_length: int = opt(30, "a line this short or shorter counts as short")
    short_line_thr: float = opt(0.67, "max fraction of short lines")
    char_dup_ratio: float = opt(0.01, "max fraction of characters in duplicated lines")
    new_line_ratio: float = opt(0.30, "max newlines per word")


@dataclasses.dataclass
class ExactDedupConfig:
    enabled: bool = opt(True, "drop documents whose normalised content (lowercase, collapsed whitespace) hash repeats")


@dataclasses.dataclass
class MinHashConfig:
    enabled: bool = opt(True, "MinHash LSH near-duplicate removal (datasketch, xxh64, scheme affine64)")
    ngram: int = opt(5, "word n-gram shingle size")
    bands: int = opt(14, "LSH bands (14 x 8: S-curve threshold ~0.72)")
    rows: int = opt(8, "hashes per band")
    seed: int = opt(1, "MinHash permutation seed")
    verify: bool = opt(False, "drop candidate pairs whose exact shingle Jaccard < threshold (memory ~ candidates)")
    threshold: float = opt(0.7, "Jaccard threshold for verification and the precision estimate")
    precision_sample: int = opt(200, "candidate pairs checked exactly to estimate LSH precision (0: off)")


@dataclasses.dataclass
class DedupConfig:
    exact: ExactDedupConfig = opt(ExactDedupConfig(), "exact dedup")
    minhash: MinHashConfig = opt(MinHashConfig(), "near dedup")
    write_clusters: bool = opt(True, "write work/dedup/clusters.jsonl.zst (member ids per duplicate cluster)")
    cluster_tasks: int = opt(0, "bucket tasks, each a range of bucket keys (partitioned union-find, then one "
                                "merge); 0: one per dedup.cluster_task_mb of input, at most 64. No output depends on it")
    cluster_task_mb: float = opt(1000.0, "with cluster_tasks=0: MB of input (on disk) per bucket task")


@dataclasses.dataclass
class TokenizerConfig:
    vocab_size: int = opt(4096, "sentencepiece vocabulary size (ids unk=0 bos=1 eos=2 pad=3)")
    model_type: str = opt("bpe", "bpe | unigram")
    model_path: str = opt("", "use this existing .model instead of training one")
    sample_bytes: int = opt(20_000_000, "train on a deterministic sample of about this many bytes of kept text")
    character_coverage: float = opt(0.9995, "sentencepiece character_coverage (byte_fallback covers the rest)")
    max_sentence_length: int = opt(8192, "longer training lines are skipped by sentencepiece")
    seed: int = opt(0, "seed of the training-sample hash")
    encode_cache_words: int = opt(1 << 18, "tokenize stage: words whose ids each worker keeps (encoded once, "
                                           "then copied: data_pipeline/encode_cache.py; the ids are exactly "
                                           "sentencepiece's). About 150 B each (40 MB at the default); 0: "
                                           "sentencepiece on every document")


@dataclasses.dataclass
class ShardConfig:
    target_mb: float = opt(256.0, "start a new .bin after about this many megabytes of tokens")
    valid_fraction: float = opt(0.005, "documents whose id hashes below this fraction go to valid-*")
    split_seed: int = opt(0, "seed of the validation-split hash")
    batch_docs: int = opt(256, "tokenize stage: documents encoded and written per batch")


@dataclasses.dataclass
class SFTConfig:
    enabled: bool = opt(False, "supervised fine-tuning rows -> chat-template shards + loss_mask/ (data_pipeline/sft.py); "
                               "needs tokenizer.model_path")
    prompt_key: str = opt("prompt", "field of the prompt in {prompt, response} rows")
    response_key: str = opt("response", "field of the response in {prompt, response} rows")
    system_key: str = opt("system", "optional system-message field in {prompt, response} rows")
    messages_key: str = opt("messages", "field of [{role: system|user|assistant, content}] in chat rows")
    max_tokens: int = opt(0, "a conversation longer than this many tokens is a bad row (on_error) unless "
                             "truncation=right (0: no limit; use the trainer's data.seq_len + 1)")
    truncation: str = opt("none", "none | right: cut at max_tokens (a row left without response tokens is bad)")


@dataclasses.dataclass
class SlurmConfig:
    partition: str = opt("", "sbatch --partition (empty: the cluster default)")
    cpus_per_task: int = opt(1, "sbatch --cpus-per-task")
    mem: str = opt("", "sbatch --mem, e.g. 8G (empty: default)")
    time: str = opt("", "sbatch --time, e.g. 02:00:00 (empty: default)")
    max_parallel: int = opt(0, "array throttle %N (0: none)")
    extra_args: list[str] = opt([], "more sbatch arguments, passed as separate argv items")
    python: str = opt("", "python interpreter for the tasks (empty: the one submitting)")
    wait: bool = opt(True, "poll until the jobs finish, then print the summary")
    poll_s: float = opt(2.0, "seconds between polls")


@dataclasses.dataclass
class RayConfig:
    address: str = opt("", "Ray cluster: empty = RAY_ADDRESS, else a cluster started here by `ray start`, else a new "
                           "local instance with `workers` CPUs | auto (an existing cluster only) | HOST:6379 | "
                           "ray://HOST:10001 (Ray Client)")
    num_cpus_per_task: float = opt(1.0, "CPUs Ray reserves for each task (sets how many run at once)")
    max_retries: int = opt(3, "Ray retries of a task whose worker died (tasks are idempotent)")
    object_store_mb: int = opt(256, "object store of a local instance started here (tasks pass only small objects)")
    log_to_driver: bool = opt(False, "stream the Ray workers' stdout/stderr to this terminal")


@dataclasses.dataclass
class PipelineConfig:
    output_dir: str = opt("outputs/data", "where shards/, tokenizer.model, stats.json, config.yaml and work/ go")
    workers: int = opt(2, "local worker processes (does not change any output)")
    tasks: int = opt(0, "input tasks, each a contiguous range of the input (big jsonl/parquet files are split); "
                        "0: automatic (input.task_mb). Outputs do not depend on it")
    executor: str = opt("local", "local | slurm | ray")
    steps: list[str] = opt(list(STEP_NAMES), "order of the per-document steps (each also has enabled)")
    keep_work_files: bool = opt(True, "keep work/prepared, signatures, dedup, tokens after success (false: delete "
                                      "them; markers stay, so a rerun is still a no-op)")
    write_rejects: bool = opt(False, "write work/rejects/*.jsonl.zst with the id and rule of every removed document")
    progress: bool = opt(True, "tqdm progress bars")
    input: InputConfig = opt(InputConfig(), "readers")
    clean: CleanConfig = opt(CleanConfig(), "normalisation")
    length: LengthConfig = opt(LengthConfig(), "length filter")
    lang: LangConfig = opt(LangConfig(), "language filter")
    gopher_repetition: GopherRepetitionConfig = opt(GopherRepetitionConfig(), "Gopher repetition filter")
    gopher_quality: GopherQualityConfig = opt(GopherQualityConfig(), "Gopher quality filter")
    c4: C4Config = opt(C4Config(), "C4 filter")
    fineweb: FineWebConfig = opt(FineWebConfig(), "FineWeb filter")
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
        need(bool(self.input.paths) or bool(self.input.hf_dataset), "input.paths", "no input given")
        need(self.workers >= 1, "workers", "must be >= 1")
        need(self.tasks >= 0, "tasks", "must be >= 0")
        need(self.input.task_mb > 0, "input.task_mb", "must be > 0")
        need(self.dedup.cluster_tasks >= 0, "dedup.cluster_tasks", "must be >= 0")
        need(self.dedup.cluster_task_mb > 0, "dedup.cluster_task_mb", "must be > 0")
        need(self.executor in ("local", "slurm", "ray"), "executor", f"{self.executor!r} is not local, slurm or ray")
        need(self.ray.num_cpus_per_task > 0, "ray.num_cpus_per_task", "must be > 0")
        for s in self.steps:
            need(s in STEP_NAMES, "steps", f"unknown step {s!r}; valid: {', '.join(STEP_NAMES)}")
        need(len(set(self.steps)) == len(self.steps), "steps", "a step is listed twice")
        need(self.input.on_error in ("fail", "skip"), "input.on_error", "must be fail or skip")
        need(self.input.format in ("auto", "jsonl", "parquet", "text", "html", "hf_json", "hf_parquet", "hf_disk"),
             "input.format", f"{self.input.format!r} is not a known format")
        need(self.tokenizer.model_type in ("bpe", "unigram"), "tokenizer.model_type", "must be bpe or unigram")
        need(self.tokenizer.vocab_size >= 300 or bool(self.tokenizer.model_path), "tokenizer.vocab_size",
             "must be >= 300 (256 byte-fallback pieces + specials)")
        need(self.tokenizer.encode_cache_words >= 0, "tokenizer.encode_cache_words", "must be >= 0")
        need(0 <= self.shards.valid_fraction < 1, "shards.valid_fraction", "must be in [0, 1)")
        need(self.shards.target_mb > 0, "shards.target_mb", "must be > 0")
        m = self.dedup.minhash
        need(m.bands >= 1 and m.rows >= 1 and m.ngram >= 1, "dedup.minhash", "bands, rows and ngram must be >= 1")
        need(self.clean.normalization in ("NFC", "NFKC", "none"), "clean.normalization", "must be NFC, NFKC or none")
        for name in ("gopher_repetition", "gopher_quality", "c4", "fineweb"):
            words = getattr(self, name).words
            need(words in ("whitespace", "datatrove"), f"{name}.words", f"{words!r} is not whitespace or datatrove")
        need(not self.sft.enabled or bool(self.tokenizer.model_path), "tokenizer.model_path",
             "sft.enabled needs the pretraining tokenizer (tokenizer.model_path=.../tokenizer.model)")
        need(self.sft.truncation in ("none", "right"), "sft.truncation", "must be none or right")
        need(self.sft.max_tokens >= 0, "sft.max_tokens", "must be >= 0")


def load(path: str | None, overrides: list[str] | None = None) -> PipelineConfig:
    return load_config(PipelineConfig, path, overrides)
