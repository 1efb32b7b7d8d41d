"""``python -m llmforge.export_hf RUN_DIR OUT_DIR [--dtype fp32|bf16|fp16]``: a run's newest checkpoint as a
Hugging Face model folder (llmforge.hf writes it; llmforge.hf.load reads such a folder back). An MoE run exports
as Qwen3MoeForCausalLM, one tensor per expert; a model Qwen3-MoE cannot express (shared experts, expert bias) is
refused naming the key."""
from __future__ import annotations

import argparse
import os
import sys

from llmforge.hf import DTYPES, check_export_dir, save_hf


def export_run(run_dir: str, out_dir: str, dtype: str = "fp32", overrides=None) -> tuple[str, str]:
    from llmforge.inference.run_loading import load_run
    check_export_dir(out_dir)  # before loading the run: a refusal costs nothing
    run = load_run(run_dir, overrides, log=lambda m: print(m, file=sys.stderr))
    tok = os.path.join(run_dir, "tokenizer.model")
    note = save_hf(run.model.args, run.model.state_dict(), out_dir, tok if os.path.isfile(tok) else None, dtype,
                   run_dir)
    return run.checkpoint, note


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llmforge.export_hf", description="Export a run's newest checkpoint "
                                "as a Hugging Face model folder (LlamaForCausalLM / Qwen3(Moe)ForCausalLM / "
                                "GPT2LMHeadModel).")
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument("overrides", nargs="*", help="dotted config overrides (rarely needed)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weight dtype in model.safetensors")
    a = p.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    from llmforge.inference.run_loading import run_cli

    def body() -> int:
        ckpt, note = export_run(a.run_dir, a.out_dir, a.dtype, a.overrides)
        print(f"exported {ckpt} -> {os.path.abspath(a.out_dir)} ({note})")
        return 0
    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
