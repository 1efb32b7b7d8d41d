"""Typed configuration: dataclasses loaded from YAML, overridden by dotted ``key=value`` arguments.

Shared by the trainer and the data pipeline. ``load_config(Cls, path, overrides)`` returns a validated
instance; every problem raises :class:`ConfigError` with one line naming the key (and the closest valid keys
for typos). ``dump_config`` writes the resolved config atomically.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from typing import Any, Optional, Union

import yaml

from llmforge.common.ranges import Range, range_errors


class ConfigError(ValueError):
    """A configuration problem; its message is meant to be printed as one line without a traceback."""


def opt(default, doc: str, *, ge=None, gt=None, le=None, lt=None, also: tuple = (), allow_inf: bool = False):
    """A dataclass field with a default and a one-line doc (shown by ``describe`` and in the README).

    Numeric keys declare their range here (``ge``/``gt`` lower, ``le``/``lt`` upper bound, ``also`` sentinel
    values such as -1 = auto); ``check_ranges`` enforces it for every config built from YAML or overrides."""
    meta: dict = {"doc": doc}
    if (ge, gt, le, lt) != (None,) * 4 or also:
        if ge is not None and gt is not None or le is not None and lt is not None:
            raise TypeError("opt: give at most one lower (ge/gt) and one upper (le/lt) bound")
        meta["range"] = Range(ge if gt is None else gt, gt is not None, le if lt is None else lt, lt is not None,
                              tuple(also), allow_inf)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    if dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: dataclasses.replace(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _parse_scalar(text: str):
    """Parse an override value with YAML rules (``[a,b]`` lists, numbers, true/false, null)."""
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def _coerce(key: str, value, tp):
    """Check/convert ``value`` to type ``tp``; raise ConfigError naming the key on mismatch."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if errors else ConfigError(f"{key}: bad value {value!r}")
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single path/number is accepted where a list is expected
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, prefix=key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _unknown(key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key.split(".")[-1], [v.split(".")[-1] for v in valid], n=3, cutoff=0.5)
    prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
    hint = f"; did you mean {', '.join(prefix + c for c in close)}?" if close else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _build(cls, raw: dict, prefix: str = ""):
    types_ = _field_types(cls)
    for k in raw:
        if k not in types_:
            raise _unknown(prefix + str(k), [prefix + n for n in types_])
    kwargs = {k: _coerce(prefix + k, v, types_[k]) for k, v in raw.items()}
    try:
        cfg = cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from None
    check_ranges(cfg, prefix)  # here, not in load_config: every builder of a config from user input gets it
    return cfg


def check_ranges(cfg, prefix: str = "") -> None:
    """Raise ConfigError for the first value of ``cfg`` (nested sections included) outside its declared range."""
    for message in range_errors(cfg, prefix):
        raise ConfigError(message)


def _set_dotted(tree: dict, key: str, value, cls) -> None:
    """Set ``a.b.c=value`` in a nested dict, checking every segment against the dataclass ``cls``."""
    parts = key.split(".")
    node, tp = tree, cls
    for i, part in enumerate(parts):
        path = ".".join(parts[: i + 1])
        fields = _field_types(tp) if _is_dataclass_type(tp) else None
        if fields is not None and part not in fields:
            raise _unknown(path, [".".join(parts[:i] + [n]) for n in fields])
        if i == len(parts) - 1:
            node[part] = value
            return
        sub_tp = fields[part] if fields is not None else Any
        open_map = sub_tp is dict or sub_tp is Any or typing.get_origin(sub_tp) is dict  # e.g. deepspeed.a.b=1
        if not _is_dataclass_type(sub_tp) and not open_map:
            raise ConfigError(f"config key '{path}' is a value, not a section (cannot set '{key}')")
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{path}' is a value, not a section (cannot set '{key}')")
        tp = sub_tp if _is_dataclass_type(sub_tp) else Any


def parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    out = []
    for a in args:
        if "=" not in a or a.startswith("="):
            raise ConfigError(f"override '{a}' is not of the form key=value (e.g. train.steps=20)")
        k, v = a.split("=", 1)
        out.append((k.strip(), _parse_scalar(v)))
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load keeps the last of two equal keys silently (``lr`` twice: one is ignored); refuse instead."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *anchor' merges may repeat keys on purpose
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = first.get(key)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if seen is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first on line {seen})", key_node.start_mark)
                first[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load_config(cls, path: str | None = None, overrides: list[str] | None = None):
    """Load ``cls`` from a YAML file and dotted overrides; validate; return the instance."""
    raw: dict = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        try:
            with open(path) as f:
                raw = yaml.load(f, Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of config keys")
    for k, v in parse_overrides(overrides or []):
        _set_dotted(raw, k, v, cls)
    cfg = _build(cls, raw)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg, path: str) -> None:
    """Write the resolved config as YAML, atomically (temp name + rename)."""
    from llmforge.common.atomic import write_text
    resolved = cfg.resolved_dict() if hasattr(cfg, "resolved_dict") else to_dict(cfg)
    write_text(path, yaml.safe_dump(resolved, sort_keys=False))


def describe(cls, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(key, type, default, doc) for every field, used to document config keys in the README/CLI."""
    rows = []
    for f in dataclasses.fields(cls):
        tp = _field_types(cls)[f.name]
        if _is_dataclass_type(tp):
            rows.extend(describe(tp, prefix + f.name + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        rows.append((prefix + f.name, getattr(tp, "__name__", str(tp)), default, f.metadata.get("doc", "")))
    return rows


# --------------------------------------------------------------------------------------------- trainer schema
@dataclasses.dataclass
class ModelConfig:
    preset: str = opt("tiny", "model preset from llmforge.model.presets (tiny, gpt2-124m, llama-1b, llama-8b, llama-70b); "
                              "fields set below override it")
    family: str = opt("", "llama | gpt2 (empty: from the preset)")
    dim: int = opt(0, "hidden size (0: from the preset)", ge=0)
    n_layers: int = opt(0, "number of transformer blocks (0: from the preset)", ge=0)
    n_heads: int = opt(0, "attention heads (0: from the preset)", ge=0)
    n_kv_heads: int = opt(0, "key/value heads for grouped-query attention (0: from the preset)", ge=0)
    ffn_dim: int = opt(0, "MLP hidden size (0: from the preset)", ge=0)
    vocab_size: int = opt(0, "vocabulary size (0: from the preset, or from the data's tokenizer if the preset says 0)",
                          ge=0)
    max_seq_len: int = opt(0, "longest sequence (positions) the model supports (0: from the preset)", ge=0)
    rope_theta: float = opt(0.0, "RoPE base (0: from the preset)", ge=0)
    norm_eps: float = opt(0.0, "RMSNorm/LayerNorm epsilon (0: from the preset)", ge=0)
    tie_embeddings: Optional[bool] = opt(None, "share input embedding and output projection (null: from the preset)")


@dataclasses.dataclass
class DataConfig:
    paths: list[str] = opt([], "pipeline output dirs (using their shards/train-* and shards/valid-*) or shard prefixes")
    weights: Optional[list[float]] = opt(None, "blend weights, one per path (null: proportional to tokens)", gt=0)
    seq_len: int = opt(256, "tokens per training sequence", ge=2)
    valid_fraction: float = opt(0.02, "fraction of windows held out for validation when a path has no valid shards",
                                ge=0, lt=1)
    backend: str = opt("native", "native | megatron (megatron-core BlendedMegatronDatasetBuilder)")


@dataclasses.dataclass
class LoRAConfig:
    rank: int = opt(0, "LoRA adapters of this rank on the blocks' target linears; everything else is frozen "
                       "(0: off). Merged into the weights by eval, generate and export_hf (llmforge/lora.py)", ge=0)
    alpha: float = opt(16.0, "LoRA scale: the update is (alpha / rank) B A", gt=0)
    targets: list[str] = opt(["wq", "wk", "wv", "wo", "w1", "w2", "w3"],
                             "linear layers of each block that get adapters (attention wq wk wv wo, MLP w1 w2 w3)")


@dataclasses.dataclass
class TrainConfig:
    steps: int = opt(100, "optimizer steps to run", ge=0)
    global_batch_size: int = opt(8, "sequences per optimizer step, summed over all data-parallel ranks", ge=1)
    micro_batch_size: int = opt(0, "sequences per rank per forward/backward (0: global / dp, no accumulation)", ge=0)
    grad_accum_steps: int = opt(0, "0: derived = global_batch_size / (micro_batch_size * dp); else must equal that",
                                ge=0)
    lr: float = opt(3e-4, "peak learning rate", gt=0)
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of lr", ge=0, le=1)
    warmup_steps: int = opt(10, "linear warmup steps", ge=0)
    schedule: str = opt("cosine", "cosine | wsd | constant")
    decay_fraction: float = opt(0.2, "WSD: fraction of steps spent in the final decay", ge=0, le=1)
    weight_decay: float = opt(0.1, "AdamW weight decay (not applied to norms, biases, embeddings)", ge=0)
    beta1: float = opt(0.9, "AdamW beta1", ge=0, lt=1)
    beta2: float = opt(0.95, "AdamW beta2", ge=0, lt=1)
    eps: float = opt(1e-8, "AdamW epsilon", gt=0)
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0: off)", ge=0)
    dtype: str = opt("auto", "fp32 | bf16 | auto (bf16 autocast on CUDA, fp32 on CPU); master weights stay fp32")
    log_interval: int = opt(1, "write a metrics.jsonl row every N steps", ge=1)
    eval_interval: int = opt(0, "validation loss every N steps (0: only at the end)", ge=0)
    eval_batches: int = opt(2, "validation size per evaluation, in global batches: eval_batches x global_batch_size "
                                  "windows, scored in micro batches (the same windows in any layout and engine)", ge=1)
    max_bad_steps: int = opt(5, "stop after this many consecutive steps with a NaN/inf loss (each is skipped)", ge=1)
    fused_optimizer: Optional[bool] = opt(None, "fused AdamW (null: on CUDA). Fused skips a non-finite step on the "
                                                "device, so steps that are not logged never wait for the host")
    init_from_hf: str = opt("", "start from a Hugging Face model folder (weights imported into our model)")
    init_from: str = opt("", "fine-tuning: start from an llmforge run dir (its newest complete checkpoint, any layout) "
                             "or a Hugging Face folder; the model shape comes from it (llmforge/sft.py)")
    allow_tokenizer_change: bool = opt(False, "let train.init_from / init_from_hf start from a model whose tokenizer "
                                              "differs from the data's (ids then mean other text; a warning)")
    freeze: list[str] = opt([], "parameter groups kept fixed: embeddings | head (final norm + output) | blocks:K "
                                "(the first K blocks) | block:I")
    lora: LoRAConfig = opt(LoRAConfig(), "low-rank adapters (LoRA)")


@dataclasses.dataclass
class ParallelConfig:
    dp_replicate: int = opt(-1, "ranks holding full replicas (-1: whatever the world size leaves)", ge=1, also=(-1,))
    dp_shard: int = opt(1, "ranks sharding parameters with FSDP2 (zero_stage 2/3)", ge=1)
    tp: int = opt(1, "tensor-parallel degree (with sequence parallel)", ge=1)
    pp: int = opt(1, "pipeline-parallel stages", ge=1)
    zero_stage: int = opt(0, "0 DDP AllReduce | 1 +sharded optimizer | 2 FSDP2 keep params | 3 FSDP2 reshard",
                          ge=0, le=3)
    pp_schedule: str = opt("1F1B", "GPipe | 1F1B | Interleaved1F1B | InterleavedZeroBubble | ZBVZeroBubble | ...")
    pp_microbatches: int = opt(0, "pipeline microbatches per step (0: local batch / micro_batch_size)", ge=0)
    sequence_parallel: bool = opt(True, "shard norms/dropout activations along the sequence under TP")
    loss_parallel: bool = opt(True, "under TP keep the logits sharded over the vocabulary; the loss runs on shards")
    compile: bool = opt(False, "torch.compile each transformer block")


@dataclasses.dataclass
class CheckpointConfig:
    interval: int = opt(0, "save every N steps (0: only at the end)", ge=0)
    keep: int = opt(2, "keep the newest K complete checkpoints", ge=1)
    async_save: bool = opt(False, "save in a background thread: training waits only until the state is staged "
                                  "(the next optimizer step waits for the copy); the next save and the end wait for "
                                  "the write (llmforge/checkpoint_writer.py)")
    resume: bool = opt(True, "resume from the newest complete checkpoint in run_dir/checkpoints")


@dataclasses.dataclass
class EvalConfig:
    tasks: list[str] = opt([], "lm-eval benchmark tasks run during training (llmforge.benchmarks), e.g. "
                               "[sample_valid_bpb, sample_next_line_mc]; logged as task/metric")
    include_paths: list[str] = opt([], "extra folders of lm-eval task YAML files (the shipped llmforge/eval_tasks "
                                       "are always searched)")
    interval: int = opt(0, "run eval.tasks every N steps (0: every train.eval_interval steps) and at the end", ge=0)
    limit: int = opt(0, "examples per task (0: all)", ge=0)
    num_fewshot: int = opt(-1, "few-shot examples per prompt (-1: each task's own default)", ge=0, also=(-1,))
    batch_size: int = opt(16, "requests per forward pass of the lm-eval adapter", ge=1)


@dataclasses.dataclass
class LoggingConfig:
    wandb: str = opt("disabled", "disabled | offline | online (never online unless asked)")
    wandb_project: str = opt("llmforge", "wandb project name")
    plot: bool = opt(True, "write loss.png (loss and lr curves) at the end")


@dataclasses.dataclass
class DistConfig:
    device: str = opt("auto", "auto | cpu | cuda")
    backend: str = opt("auto", "auto | gloo | nccl")
    timeout_s: int = opt(600, "collective timeout; a stuck rank fails with an error instead of hanging", ge=1)


@dataclasses.dataclass
class RunConfig:
    run_dir: str = opt("runs/default", "where config.yaml, metrics.jsonl, checkpoints/ and plots go")
    seed: int = opt(1234, "seed for init, data order and sampling", ge=0, le=2**32 - 1)
    engine: str = opt("native", "native (PyTorch FSDP2/DTensor/pipelining) | deepspeed")
    recompute: str = opt("none", "activation recomputation: none | full | selective")
    recompute_every: int = opt(1, "recompute every k-th block (full mode)", ge=1)
    model: ModelConfig = opt(ModelConfig(), "model shape")
    data: DataConfig = opt(DataConfig(), "training data")
    train: TrainConfig = opt(TrainConfig(), "optimisation and loop")
    parallel: ParallelConfig = opt(ParallelConfig(), "parallel layout")
    checkpoint: CheckpointConfig = opt(CheckpointConfig(), "checkpointing")
    logging: LoggingConfig = opt(LoggingConfig(), "metrics sinks")
    eval: EvalConfig = opt(EvalConfig(), "downstream benchmarks during training (lm-evaluation-harness)")
    dist: DistConfig = opt(DistConfig(), "device and process group")
    deepspeed: dict = opt({}, "raw DeepSpeed config merged over the generated one (engine: deepspeed)")

    def resolved_dict(self) -> dict:
        """What ``dump_config`` writes: relative ``data.paths`` made absolute (against the working directory of
        the command that wrote it), so the run's config.yaml works from any folder (eval, generate, resume)."""
        out = to_dict(self)
        out["data"]["paths"] = [os.path.abspath(os.path.expanduser(p)) for p in self.data.paths]
        return out

    def validate(self) -> None:
        """Checks that need no world size; layout checks against the world live in llmforge.parallel."""
        def need(ok, key, msg):
            if not ok:
                raise ConfigError(f"{key}: {msg}")
        check_ranges(self)  # every numeric key's declared range (opt(..., ge=...)): also for configs built in code
        need(self.engine in ("native", "deepspeed"), "engine", f"{self.engine!r} is not native or deepspeed")
        need(self.recompute in ("none", "full", "selective"), "recompute", f"{self.recompute!r} is not none/full/selective")
        t, p = self.train, self.parallel
        need(t.schedule in ("cosine", "wsd", "constant"), "train.schedule", f"{t.schedule!r} is not cosine/wsd/constant")
        need(t.dtype in ("auto", "fp32", "bf16"), "train.dtype", f"{t.dtype!r} is not auto/fp32/bf16")
        need(self.data.backend in ("native", "megatron"), "data.backend", "must be native or megatron")
        if self.data.weights is not None:
            need(len(self.data.weights) == len(self.data.paths), "data.weights", "needs one weight per data.paths entry")
        # DeepSpeed's ZeRO stages all partition over every data-parallel rank: dp_shard is just their count there
        need(p.dp_shard == 1 or p.zero_stage in (2, 3) or self.engine == "deepspeed", "parallel.dp_shard",
             f"dp_shard={p.dp_shard} shards parameters: use parallel.zero_stage=2 or 3 (or dp_replicate for DDP)")
        need(self.logging.wandb in ("disabled", "offline", "online"), "logging.wandb", "must be disabled/offline/online")
        need(self.dist.device in ("auto", "cpu", "cuda"), "dist.device", "must be auto, cpu or cuda")
        need(self.dist.backend in ("auto", "gloo", "nccl"), "dist.backend", "must be auto, gloo or nccl")
        bad = sorted(set(t.lora.targets) - {"wq", "wk", "wv", "wo", "w1", "w2", "w3"})
        need(not bad and (t.lora.targets or not t.lora.rank), "train.lora.targets",
             f"{bad or 'empty'}: choose from wq, wk, wv, wo, w1, w2, w3")
        need(not t.lora.rank or p.tp == 1, "train.lora.rank", "LoRA adapters are not tensor-parallel: use "
             "parallel.tp=1 (data parallel, ZeRO and pipeline stages all work)")
        for name in t.freeze:
            need(re.fullmatch(r"embeddings|head|blocks:\d+|block:\d+", name) is not None, "train.freeze",
                 f"unknown group {name!r}; valid: embeddings, head, blocks:K (the first K), block:I")


def key_ranges(cls, prefix: str = "") -> dict[str, Range]:
    """{dotted key: declared Range} for every key of ``cls`` that has one (numeric keys)."""
    out: dict[str, Range] = {}
    for f in dataclasses.fields(cls):
        tp = _field_types(cls)[f.name]
        if _is_dataclass_type(tp):
            out.update(key_ranges(tp, prefix + f.name + "."))
        elif "range" in f.metadata:
            out[prefix + f.name] = f.metadata["range"]
    return out


def markdown_keys(cls) -> str:
    """A markdown table of every key, its default, range and doc (pasted into the README; a test keeps them in
    sync)."""
    ranges = key_ranges(cls)
    lines = ["| key | default | range | meaning |", "|---|---|---|---|"]
    for key, _, default, doc in describe(cls):
        rng = f"{ranges[key]}" if key in ranges else ""
        lines.append(f"| `{key}` | `{default!r}` | {rng} | {doc.replace('|', '/')} |")
    return "\n".join(lines)
