"""Sample from a run's newest checkpoint: ``python -m llmforge.generate RUN_DIR --prompt TEXT [options]``.

Decoding uses the model's KV cache: one forward over the prompt (prefill), then one token per step. The prompt
is preceded by EOS, the document separator the data pipeline writes after every document, so the model sees
the prompt where documents start in training. Generation stops at EOS, after ``--max-new-tokens``, or where the
model's context (``max_seq_len`` positions) is full, with a note saying so.
A run without a tokenizer (synthetic data) takes and prints token ids: ``--prompt "5 17 3"``.
A fine-tuned run (its dir holds ``chat_template.json``) wraps the prompt in the chat template as a user turn
(``--system`` adds a system turn; ``--raw`` skips the template) and prints only the assistant's reply.
"""
from __future__ import annotations

import argparse
import math
import sys

import torch

from llmforge.core.config import ConfigError
from llmforge.inference.run_loading import load_run, run_cli


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (batch, vocab) -> next ids (batch,). temperature 0 means greedy (the CLI refuses < 0)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:  # nucleus: keep the smallest set of tokens whose probability reaches top_p
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # mass before this token already reached top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompt_ids: list[int], max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, eos_id: int | None = None, seed: int | None = None) -> list[int]:
    """New token ids after ``prompt_ids`` (EOS excluded), decoded with a KV cache."""
    max_len = model.args.max_seq_len
    prompt_ids = list(prompt_ids)
    if not prompt_ids:
        raise ValueError("empty prompt (and no EOS token to start from)")
    # The model has no positions beyond max_seq_len: a longer prompt loses its beginning (the end is what the
    # continuation depends on), leaving room for the new tokens but never less than half the context.
    keep = max(max_len // 2, max_len - max_new_tokens, 1)
    if len(prompt_ids) > keep:
        print(f"warning: the prompt has {len(prompt_ids)} tokens but the model's context is {max_len} "
              f"(with --max-new-tokens {max_new_tokens}): keeping its last {keep} tokens", file=sys.stderr, flush=True)
        prompt_ids = prompt_ids[-keep:]
    room = max(0, max_len - len(prompt_ids))
    if max_new_tokens > room:  # the KV cache has max_seq_len positions: say so instead of stopping early unexplained
        print(f"note: the model's context is {max_len} tokens and the prompt takes {len(prompt_ids)}: generation "
              f"stops after at most {room} new tokens (--max-new-tokens {max_new_tokens})", file=sys.stderr, flush=True)
    max_new_tokens = min(max_new_tokens, room)
    device = next(model.parameters()).device
    gen = torch.Generator(device=device)
    gen.manual_seed(0 if seed is None else seed)
    caches = model.new_caches(1, len(prompt_ids) + max_new_tokens)
    tokens = torch.tensor([prompt_ids], device=device)
    logits = model(tokens, caches, 0)[:, -1]  # prefill
    pos, out = len(prompt_ids), []
    for _ in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, gen)
        tok = int(nxt.item())
        if eos_id is not None and tok == eos_id:
            break
        out.append(tok)
        if len(out) == max_new_tokens:
            break
        logits = model(nxt.view(1, 1), caches, pos)[:, -1]
        pos += 1
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m llmforge.generate", description="Sample text from a run's newest checkpoint.")
    p.add_argument("run_dir")
    p.add_argument("overrides", nargs="*", help="dotted config overrides (rarely needed)")
    p.add_argument("--prompt", required=True, help="prompt text (token ids separated by spaces for runs without a tokenizer)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1: off)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: the run's seed)")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--system", default=None, help="fine-tuned runs: a system message before the prompt")
    p.add_argument("--raw", action="store_true", help="fine-tuned runs: continue the text, no chat template")
    return p.parse_intermixed_args(argv)


def check_args(a) -> None:
    """Refuse out-of-range options in one line before the run is loaded: a negative temperature used to mean
    greedy silently, and NaN failed inside torch.multinomial with a traceback."""
    if not math.isfinite(a.temperature) or a.temperature < 0:
        raise ConfigError(f"--temperature must be a finite number >= 0 (0 or --greedy: always the most likely "
                          f"token), got {a.temperature}")
    if a.max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens must be >= 0, got {a.max_new_tokens}")
    if a.top_k < 0:
        raise ConfigError(f"--top-k must be >= 0 (0: all tokens), got {a.top_k}")
    if not 0 < a.top_p <= 1:  # also refuses NaN
        raise ConfigError(f"--top-p must be in (0, 1] (1: off), got {a.top_p}")
    if a.seed is not None and not 0 <= a.seed < 2 ** 63:  # torch.Generator.manual_seed overflows past 64 bits
        raise ConfigError(f"--seed must be in [0, 2^63-1], got {a.seed}")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    return run_cli(lambda: _generate_cli(a))


def _generate_cli(a) -> int:
    """Validate options, load the run, sample, print the text (token ids when the run has no tokenizer)."""
    check_args(a)
    from llmforge.core.distributed import pick_device
    cfg, model, tok, _ = load_run(a.run_dir, a.overrides, device=pick_device(a.device),
                                  log=lambda m: print(m, file=sys.stderr))
    from llmforge.common.chat import chat_prompt_ids
    chat = None if a.raw or tok is None else chat_prompt_ids(a.run_dir, a.prompt, a.system)
    if chat is not None:  # fine-tuned run: the template's user turn + assistant header; print the reply only
        eos = tok.eos_id()
        new = generate(model, chat, a.max_new_tokens, 0.0 if a.greedy else a.temperature, a.top_k, a.top_p, eos,
                       cfg.seed if a.seed is None else a.seed)
        print(tok.decode(new), flush=True)
        return 0
    if tok is not None:
        eos = tok.eos_id() if tok.eos_id() >= 0 else None
        ids = ([eos] if eos is not None else []) + tok.encode(a.prompt)
    else:
        eos = None
        try:
            ids = [int(t) for t in a.prompt.replace(",", " ").split()]
        except ValueError:
            raise ConfigError("this run has no tokenizer.model: give --prompt as token ids, e.g. \"5 17 3\"") from None
        if any(not 0 <= i < model.args.vocab_size for i in ids):
            raise ConfigError(f"--prompt: token ids must be in [0, {model.args.vocab_size})")
    new = generate(model, ids, a.max_new_tokens, 0.0 if a.greedy else a.temperature, a.top_k, a.top_p, eos,
                   cfg.seed if a.seed is None else a.seed)
    if tok is None:
        print(" ".join(map(str, ids + new)), flush=True)
    else:  # decode prompt+continuation together: sentencepiece drops a leading space when decoding alone
        body = [i for i in ids if i != eos]
        full, head = tok.decode(body + new), tok.decode(body)
        print(a.prompt + full[len(head):] if full.startswith(head) else a.prompt + tok.decode(new), flush=True)
    return 0
