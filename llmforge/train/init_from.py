"""Where a fine-tuning run starts: ``train.init_from`` (an llmforge run dir or a Hugging Face folder), checked
against the run before any process group exists, and its weights loaded into the parallelised model parts.

A run dir: its newest complete checkpoint, any layout (DCP reshards by name, read here without collectives), or a
DeepSpeed run's shards consolidated. A Hugging Face folder: ``llmforge.export_hf``'s import. The model shape is
taken from the source; the run's config.yaml records it (``run_plan.resolved_model_config``) so it rebuilds.
"""
from __future__ import annotations

import os

import torch.distributed as dist

from llmforge.core.config import ConfigError
from llmforge.data.sft import is_sft_data


def check_run(cfg) -> None:
    """SFT data, train.init_from and train.freeze need the native engine (and SFT data the native backend);
    sft.pack needs SFT data."""
    if cfg.sft.pack and not (cfg.data.paths and is_sft_data(cfg.data.paths)):
        raise ConfigError("sft.pack: packs SFT conversations, but data.paths holds no SFT data (no loss_mask/): "
                          "set sft.pack=false (pretraining windows are packed already; data.document_mask=true "
                          "masks their documents)")
    for key in ("init_from", "freeze"):
        if getattr(cfg.train, key) and cfg.engine != "native":
            raise ConfigError(f"train.{key} needs engine=native (engine={cfg.engine})")
    if cfg.data.paths and is_sft_data(cfg.data.paths):
        if cfg.engine != "native":
            raise ConfigError(f"engine={cfg.engine}: fine-tuning on SFT data (loss masks) needs engine=native")
        if cfg.data.backend != "native":
            raise ConfigError("data.backend=megatron cannot read SFT loss masks: use data.backend=native")


def _engine_of(run_dir: str) -> str:
    import yaml
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        return "native"
    with open(path) as f:
        return (yaml.safe_load(f) or {}).get("engine", "native")


def _is_hf_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and not os.path.isfile(os.path.join(path, "config.yaml"))


def resolve_init_from(cfg, tok_path: str | None):
    """ModelArgs of ``train.init_from`` (run dir or HF folder); the run's model section is derived from them
    (``run_plan.resolved_model_config``)."""
    from llmforge.model.presets import model_args
    src = cfg.train.init_from
    if not os.path.isdir(src):
        raise ConfigError(f"train.init_from: no such folder: {src}")
    if cfg.train.init_from_hf:
        raise ConfigError("train.init_from and train.init_from_hf are both set: give one")
    if _is_hf_folder(src):
        from llmforge.hf import hf_model_args
        margs = hf_model_args(src)
    else:
        from llmforge.inference.run_loading import RunLoadError, run_config
        try:
            src_cfg = run_config(src)
        except RunLoadError as e:
            raise ConfigError(f"train.init_from: {e} (nor a Hugging Face folder: no config.json)") from None
        if src_cfg.train.lora.rank:  # its checkpoints hold unmerged adapters
            raise ConfigError(f"train.init_from={src}: that run trained LoRA adapters; start from its export "
                              f"(python -m llmforge.export_hf {src} OUT merges them), train.init_from=OUT")
        tok = os.path.join(src, "tokenizer.model")
        vocab = None
        if os.path.isfile(tok):
            import sentencepiece as spm
            vocab = spm.SentencePieceProcessor(model_file=tok).vocab_size()
        margs = model_args(src_cfg.model, vocab)
    check_init_source(cfg, "train.init_from", src, margs, tok_path)
    return margs


def check_init_source(cfg, key: str, src: str, margs, tok_path: str | None) -> None:
    """A start from ``src`` (``key`` = train.init_from / init_from_hf) that contradicts the run: an explicit
    model.family other than the source's (its shape wins over the preset, but a named family is a statement), a
    tokenizer other than the data's (llmforge.data.checks.check_init_tokenizer; train.allow_tokenizer_change
    permits it), or a data vocabulary larger than the model's. The shards' largest id is checked against
    margs.vocab_size with the data (build_run_datasets)."""
    if cfg.model.family and cfg.model.family != margs.family:
        raise ConfigError(f"{key}={src} is a {margs.family} model but model.family={cfg.model.family}: drop "
                          f"model.family (the shape comes from {src}) or start from a {cfg.model.family} model")
    check_init_moe(cfg, key, src, margs)
    from llmforge.data.checks import check_init_tokenizer
    check_init_tokenizer(key, src, tok_path, cfg.train.allow_tokenizer_change)
    if tok_path:
        import sentencepiece as spm
        data_vocab = spm.SentencePieceProcessor(model_file=tok_path).vocab_size()
        if data_vocab > margs.vocab_size:
            raise ConfigError(f"{key}={src}: the data's tokenizer {tok_path} has {data_vocab} ids, the model "
                              f"{margs.vocab_size}")


MOE_TRAINING_KEYS = ("balance", "aux_loss_coef", "bias_update_rate")  # how experts train, not their shape


def check_init_moe(cfg, key: str, src: str, margs) -> None:
    """The source's MoE shape wins, as its dense shape does; but a config that asks for experts (its preset or
    model.moe.num_experts) and a start that has none or others, or an explicit model.moe shape key the source
    contradicts, is refused naming the key. The training keys (balance, aux_loss_coef, bias_update_rate) set in
    the config apply to the source's experts."""
    import dataclasses
    from llmforge.hf.adapter import MOE_SHAPE_KEYS
    from llmforge.model.presets import MOE_UNSET, PRESETS, check_moe, moe_args
    if cfg.model.preset not in PRESETS:
        return  # model_args names the unknown preset
    asked, got = moe_args(PRESETS[cfg.model.preset].moe, cfg.model.moe), margs.moe
    explicit = [k for k in MOE_SHAPE_KEYS if getattr(cfg.model.moe, k) != MOE_UNSET[k]]
    keys = (["num_experts"] if asked.num_experts and asked.num_experts != got.num_experts else []) + \
        ([k for k in explicit if getattr(asked, k) != getattr(got, k)] if got.num_experts else [])
    if keys:
        shape = f"{got.num_experts} experts" if got.num_experts else "dense (no experts)"
        raise ConfigError(f"{key}={src} is {shape} but the config asks for " + ", ".join(
            f"model.moe.{k}={getattr(asked, k)} (the source: {getattr(got, k)})" for k in dict.fromkeys(keys)) +
            f": drop the model.moe keys (the shape comes from {src}) or start from a matching model")
    if got.num_experts:
        margs.moe = dataclasses.replace(got, **{k: getattr(cfg.model.moe, k) for k in MOE_TRAINING_KEYS
                                                 if getattr(cfg.model.moe, k) != MOE_UNSET[k]})
        check_moe(margs)


def _load_full(parts, sd: dict) -> None:
    """Full tensors (every rank holds them) into each part's local shards, by name."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
    for part in parts:
        names = set(get_model_state_dict(part))
        set_model_state_dict(part, {k: v for k, v in sd.items() if k in names},
                             options=StateDictOptions(full_state_dict=True, strict=False))


def load_init_weights(parts, src: str) -> str:
    """Copy ``train.init_from``'s weights into this rank's (parallelised) model parts; returns what was loaded.
    A run dir: its newest complete checkpoint through the checkpointer (DCP reshards by name: any layout to any
    layout). An HF folder: our names, full tensors on every rank, distributed into the local shards."""
    if _is_hf_folder(src):
        from llmforge.hf import import_hf, shape_diff
        args, sd = import_hf(src)
        diff = shape_diff(parts[0].args, args)
        if diff:
            raise ConfigError(f"train.init_from={src} does not match the model ({'; '.join(diff)})")
        _load_full(parts, sd)
        return src
    if _engine_of(src) == "deepspeed":  # a DeepSpeed run: its shards consolidated by zero_to_fp32, then as above
        from llmforge.checkpoint.deepspeed_weights import consolidated_state_dict
        sd, path, _ = consolidated_state_dict(os.path.join(src, "checkpoints"), parts[0].args.n_layers)
        _load_full(parts, sd)
        return path
    import sys
    from llmforge.checkpoint.checkpointer import Checkpointer, NoUsableCheckpoint, load_newest
    from llmforge.model.lora import is_adapter
    root = os.path.join(src, "checkpoints")
    ck = Checkpointer(root, rank=dist.get_rank())
    # the newest checkpoint that verifies (a damaged one is skipped with a warning naming the file, said once one
    # loads: a refusal is one line that names every damaged file)
    skipped: list[str] = []
    try:
        path, _ = load_newest(root, lambda p: ck.load(p, parts, [], load_optimizer=False, load_rng=False,
                                                      skip=is_adapter), log=skipped.append)
    except NoUsableCheckpoint as e:
        raise NoUsableCheckpoint(f"train.init_from: {e}") from None
    for line in skipped if dist.get_rank() == 0 else ():
        print(line, file=sys.stderr, flush=True)
    if path is None:
        raise ConfigError(f"train.init_from: no usable checkpoint under {root} (none, or all damaged or incomplete)")
    return path
