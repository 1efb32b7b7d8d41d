"""The HF export scores like the native adapter under lm-eval's own ``hf`` model with no extra flag, and the
``lm_eval`` command finds ``--model llmforge``."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")
from lm_eval.api.instance import Instance  # noqa: E402

from llmforge.inference.lm_eval_adapter import LLMForgeLM  # noqa: E402
from tests.benchmarks.conftest import TEXTS  # noqa: E402
from tests.benchmarks.test_adapter import PAIRS  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _requests(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_hf_model_on_the_export_matches_the_native_adapter_per_document(bench_run, tmp_path):
    from lm_eval.models.huggingface import HFLM

    from llmforge.export_hf import export_run
    out = str(tmp_path / "hf")
    export_run(bench_run, out)
    cfg = json.load(open(os.path.join(out, "config.json")))
    tok_cfg = json.load(open(os.path.join(out, "tokenizer_config.json")))
    assert cfg["bos_token_id"] == cfg["eos_token_id"] == 2 and tok_cfg["bos_token"] == tok_cfg["eos_token"] == "</s>"

    hf = HFLM(pretrained=out, device="cpu")  # lm-eval's defaults: no prefix_token_id, no add_bos_token
    assert hf.prefix_token_id == 2 and hf.tok_encode("Install the package.")[0] != 2
    native = LLMForgeLM(run_dir=bench_run, device="cpu", batch_size=4)
    docs = [*TEXTS, " ".join(TEXTS * 4)]  # the last one is longer than many windows would be at a short context
    rolling = _requests("loglikelihood_rolling", [(t,) for t in docs])
    for a, b in zip(hf.loglikelihood_rolling(rolling), native.loglikelihood_rolling(rolling)):
        assert a == pytest.approx(b, rel=1e-4)
    pairs = _requests("loglikelihood", PAIRS)
    for (a, ga), (b, gb) in zip(hf.loglikelihood(pairs), native.loglikelihood(pairs)):
        assert a == pytest.approx(b, rel=1e-4) and ga == gb


def test_lm_eval_finds_the_llmforge_model_by_name(bench_run, text_tasks):
    """A fresh interpreter's lm-eval registry knows 'llmforge' (llmforge-lm-eval.pth, installed with the package),
    and lm-eval built from that name (`lm_eval --model llmforge --model_args run_dir=RUN` does exactly this) gives
    the bits per byte `python -m llmforge.eval RUN --tasks` gives."""
    res = subprocess.run([sys.executable, "-c", "from lm_eval.api.registry import get_model; "
                          "print(get_model('llmforge').__module__)"], capture_output=True, text=True, timeout=300)
    assert res.stdout.strip() == "llmforge.inference.lm_eval_adapter", (
        "lm-eval does not know the model 'llmforge': reinstall llmforge (pip install -e .)\n" + res.stderr[-2000:])

    from lm_eval import simple_evaluate

    from llmforge.inference.benchmarks import task_manager
    from llmforge.inference.eval import main as eval_main
    out = simple_evaluate(model="llmforge", model_args=f"run_dir={bench_run}", batch_size=2, tasks=["pub_text"],
                          task_manager=task_manager([text_tasks], ["pub_text"]), bootstrap_iters=0, log_samples=False)
    assert eval_main([bench_run, "--tasks", "pub_text", "--include-path", text_tasks]) == 0
    ours = json.load(open(os.path.join(bench_run, "eval_tasks.json")))
    assert out["results"]["pub_text"]["bits_per_byte,none"] == pytest.approx(
        ours["metrics"]["pub_text/bits_per_byte"], rel=1e-6)
