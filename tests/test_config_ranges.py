"""Every numeric config key of both halves declares a range next to the key, and the range is checked when a
config is built, before anything starts (issue 21: NaN/inf/negative values used to be accepted, e.g.
``gopher_repetition.dup_line_frac=nan`` silently switched the rule off).

The table is walked from the dataclasses, so a key added later without a range fails
``test_every_numeric_key_declares_a_range``."""
import dataclasses
import math
import os
import sys
import typing

import pytest

from data_pipeline.config import PipelineConfig
from llmforge.core.config import ConfigError, RunConfig, key_ranges, load_config, markdown_keys
from tests.conftest import ROOT, run_cli

NUMBER = (int, float)


def _numeric_kind(tp):
    """'int' / 'float' for int, float, Optional[...] and list[...] of them; 'map' for a plain dict; else None."""
    if tp in NUMBER:
        return tp.__name__
    if tp is dict:
        return "map"
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, list) and len(args) == 1:
        return _numeric_kind(args[0])
    return None


def _walk(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            yield from _walk(tp, prefix + f.name + ".")
        elif _numeric_kind(tp):
            yield prefix + f.name, _numeric_kind(tp), f


def _keys(cls):
    return [(cls, key, kind) for key, kind, _ in _walk(cls)]


BASE = {RunConfig: [], PipelineConfig: ["input.paths=[in.jsonl]"]}
ALL = _keys(RunConfig) + _keys(PipelineConfig)
# maps of n -> threshold without a range are not thresholds (the raw deepspeed section is DeepSpeed's own)
EXEMPT = {(RunConfig, "deepspeed")}


def _load(cls, key, text):
    return load_config(cls, None, BASE[cls] + [f"{key}={text}"])


def _as_value(kind, x):
    """The override text that sets the key to x: one item for list keys, a {2: x} map for map keys."""
    text = repr(x) if not isinstance(x, float) or math.isfinite(x) else (".nan" if x != x else
                                                                        ".inf" if x > 0 else "-.inf")
    return "{2: " + text + "}" if kind == "map" else text


def test_every_numeric_key_declares_a_range():
    from llmforge.scaling.sweep import SweepConfig
    missing = [key for cls, key, kind in ALL + _keys(SweepConfig) if (cls, key) not in EXEMPT
               and key not in key_ranges(cls)]
    assert not missing, f"numeric keys without a range (opt(..., ge=/gt=/le=/lt=)): {missing}"


@pytest.mark.parametrize("cls", [RunConfig, PipelineConfig])
def test_defaults_pass(cls):
    load_config(cls, None, BASE[cls])


@pytest.mark.parametrize("cls, key, kind", [k for k in ALL if (k[0], k[1]) not in EXEMPT],
                         ids=lambda v: v if isinstance(v, str) else getattr(v, "__name__", None))
def test_out_of_range_values_are_refused_naming_the_key(cls, key, kind):
    rng = key_ranges(cls)[key]
    bad = [math.nan, math.inf, -math.inf]
    if kind == "float":  # what a user types on the command line: train.lr=inf (a string YAML leaves alone)
        for text in ("nan", "inf", "-inf"):
            with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
                _load(cls, key, text)
    for x in (-1, 0, -1e-9):
        if not rng.contains(x):
            bad.append(x)
    if rng.hi is not None:  # just past the upper end
        bad.append(rng.hi if rng.hi_open else rng.hi + (1 if kind == "int" else 1e-6))
    for x in bad:
        with pytest.raises(ConfigError) as e:
            _load(cls, key, _as_value(kind, x))
        msg = str(e.value)
        assert key in msg and "\n" not in msg, (x, msg)
    if kind == "int":
        assert rng.contains(rng.lo if rng.lo is not None and not rng.lo_open else 1)


@pytest.mark.parametrize("cls, override", [
    # the cases of issue 21, each accepted before
    (RunConfig, "train.lr=inf"), (RunConfig, "train.lr=nan"), (RunConfig, "train.grad_clip=nan"),
    (RunConfig, "model.norm_eps=nan"), (RunConfig, "model.vocab_size=-5"), (RunConfig, "train.warmup_steps=-1"),
    (RunConfig, "train.eval_batches=-1"), (RunConfig, "checkpoint.interval=-1"), (RunConfig, "train.max_bad_steps=-1"),
    (RunConfig, "model.dim=-64"), (RunConfig, "model.n_layers=-2"), (RunConfig, "parallel.dp_replicate=0"),
    (PipelineConfig, "gopher_repetition.dup_line_frac=nan"), (PipelineConfig, "input.max_doc_chars=-1"),
    (PipelineConfig, "fineweb.short_line_thr=inf"), (PipelineConfig, "gopher_repetition.top_n_grams={2: .nan}"),
    (PipelineConfig, "lang.min_score=1.5"), (PipelineConfig, "dedup.minhash.threshold=-0.1"),
])
def test_issue_cases(cls, override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=r"^" + key.replace(".", r"\.") + r".*(out of range|must be)"):
        load_config(cls, None, BASE[cls] + [override])


@pytest.mark.parametrize("cls, override", [
    (RunConfig, "parallel.dp_replicate=-1"), (RunConfig, "eval.num_fewshot=-1"), (RunConfig, "train.grad_clip=0"),
    (RunConfig, "model.dim=0"), (RunConfig, "checkpoint.interval=0"), (PipelineConfig, "length.min_words=0"),
])
def test_sentinels_stay_accepted(cls, override):
    load_config(cls, None, BASE[cls] + [override])


def test_ngram_map_keys_are_sizes():
    with pytest.raises(ConfigError, match=r"gopher_repetition\.dup_n_grams"):
        load_config(PipelineConfig, None, BASE[PipelineConfig] + ["gopher_repetition.dup_n_grams={0: 0.1}"])


def test_ranges_are_in_the_readme_tables():
    row = next(ln for ln in markdown_keys(RunConfig).splitlines() if ln.startswith("| `train.lr`"))
    assert "| > 0 |" in row
    row = next(ln for ln in markdown_keys(PipelineConfig).splitlines() if ln.startswith("| `parallel") or
               ln.startswith("| `gopher_repetition.dup_line_frac`"))
    assert "| [0, 1] |" in row


def test_cli_refuses_before_anything_is_written(tmp_path, synth_data):
    """The contract check: llmforge.train ... train.lr=inf -> exit 2, one line, no step, no run dir files."""
    run_dir = tmp_path / "run"
    r = run_cli([sys.executable, "-m", "llmforge.train", "configs/train/tiny-cpu.yaml", f"data.paths=[{synth_data}]",
                 f"run_dir={run_dir}", "train.steps=2", "train.lr=inf"], timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().count("\n") == 0 and "train.lr" in r.stderr and "Traceback" not in r.stderr
    assert "step 1 |" not in r.stdout + r.stderr and not os.path.exists(run_dir / "metrics.jsonl")
    assert not run_dir.exists()


def test_pipeline_cli_refuses_nan_threshold(tmp_path):
    out = tmp_path / "out"
    r = run_cli([sys.executable, "-m", "data_pipeline", "run", os.path.join(ROOT, "configs/data/sample.yaml"), f"output_dir={out}",
                 "gopher_repetition.dup_line_frac=nan"], timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().count("\n") == 0 and "gopher_repetition.dup_line_frac" in r.stderr
    assert not out.exists()


# --------------------------------------------------------------------------------- generate / eval options
@pytest.mark.parametrize("args, words", [
    (["--temperature", "-1"], ["--temperature", ">= 0", "-1.0"]),   # was: silently greedy
    (["--temperature", "nan"], ["--temperature", "nan"]),          # was: a torch.multinomial traceback
    (["--temperature", "inf"], ["--temperature", "inf"]),
    (["--top-p", "nan"], ["--top-p", "(0, 1]"]), (["--top-p", "0"], ["--top-p"]), (["--top-k", "-2"], ["--top-k"]),
    (["--max-new-tokens", "-1"], ["--max-new-tokens"]), (["--seed", str(2 ** 70)], ["--seed"]),
])
def test_generate_refuses_bad_options_before_loading(tmp_path, capsys, args, words):
    from llmforge.inference.generate import main as generate_main
    rc = generate_main([str(tmp_path / "no-run"), "--prompt", "1 2", *args])  # checked before the run is read
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and err.startswith("error: "), err
    for w in words:
        assert w in err, (w, err)


def test_generate_says_when_the_context_ends_the_output(capsys):
    import torch
    from llmforge.inference.generate import generate
    from llmforge.model.blocks import ModelArgs
    from llmforge.model.transformer import Transformer
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=64, vocab_size=50,
                                  max_seq_len=32)).eval()
    new = generate(model, list(range(1, 11)), 100, temperature=0.0)  # 10 + 100 > 32 positions
    err = capsys.readouterr().err
    assert len(new) == 22 and err.count("\n") == 1, err
    assert "context is 32" in err and "at most 22 new tokens" in err and "--max-new-tokens 100" in err
    generate(model, list(range(1, 11)), 5, temperature=0.0)
    assert capsys.readouterr().err == ""  # within the context: no note


@pytest.mark.parametrize("args, word", [
    (["--tasks", "sample_valid_bpb", "--limit", "-1"], "--limit"),   # was: an islice error from lm-eval
    (["--tasks", "sample_valid_bpb", "--limit", "nan"], "--limit"),
    (["--tasks", "sample_valid_bpb", "--limit", "0"], "--limit"),
    (["--tasks", "sample_valid_bpb", "--num-fewshot", "-1"], "--num-fewshot"),
    (["--tasks", "sample_valid_bpb", "--bootstrap-iters", "-5"], "--bootstrap-iters"),
    (["--batch-size", "-3"], "--batch-size"), (["--batches", "-1"], "--batches"),
])
def test_eval_refuses_negative_options_before_loading(tmp_path, capsys, args, word):
    from llmforge.inference.eval import main as eval_main
    rc = eval_main([str(tmp_path / "no-run"), *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and word in err and "no-run" not in err, err


@pytest.mark.parametrize("override", ["deepspeed.gradient_clipping=nan", "deepspeed.gradient_clipping=.nan",
                                      "deepspeed.zero_optimization.reduce_bucket_size=-.inf"])
def test_a_raw_deepspeed_value_is_never_nan_or_inf(override):
    key = override.split("=")[0]  # was: accepted (a NaN clip trained with rc 0) or a TypeError traceback at step 1
    with pytest.raises(ConfigError, match=r"^" + key.replace(".", r"\.") + r".*not a finite number"):
        load_config(RunConfig, None, [override])
    load_config(RunConfig, None, ["deepspeed.gradient_clipping=0.5", "deepspeed.zero_optimization.stage=2"])
