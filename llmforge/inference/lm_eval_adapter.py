"""lm-evaluation-harness model ``llmforge``: score an llmforge run (or an in-memory model) with lm-eval's tasks.

``lm_eval --model llmforge --model_args run_dir=RUN[,batch_size=8,device=cpu,max_length=N,checkpoint=DIR]``
loads the run's newest complete checkpoint (any layout it was saved in: DCP reshards by name, see
``llmforge.inference.run_loading``) and its ``tokenizer.model``. ``python -m llmforge.eval RUN --tasks ...`` wraps it.

Document boundaries follow training: the data pipeline writes EOS after every document and training never sees
BOS, so the token before a document is EOS. ``loglikelihood_rolling`` (perplexity, bits per byte) and an empty
context therefore start after EOS (lm-eval's ``prefix_token_id``); a non-empty context is scored as given, which
is what lm-eval's ``hf`` model does with the export's tokenizer (no BOS added, BOS = EOS): both give the same
log-likelihoods (tests/benchmarks/test_hf_parity.py).

Requests are sorted by length (longest first), batched ``batch_size`` at a time and right-padded; causal attention
keeps the padding out of every real position, so results do not depend on the batch size. Generation is greedy
(or sampled when the task asks) with the KV cache, batching requests whose contexts have the same length.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

DEFAULT_BATCH_SIZE = 16


@register_model("llmforge")
class LLMForgeLM(TemplateLM):
    """lm-eval's LM interface over an llmforge Transformer and its sentencepiece tokenizer. ``--model_args`` keys:
    run_dir, checkpoint, batch_size, device, max_length, max_gen_toks (any other is refused with a TypeError;
    ``max_batch_size``, which lm-eval itself passes, is accepted and unused). In-process callers (in-training
    benchmarks) pass ``model`` and ``tokenizer`` instead of ``run_dir``."""

    def __init__(self, run_dir: str | None = None, checkpoint: str | None = None, batch_size: int | str = DEFAULT_BATCH_SIZE,
                 device: str | None = None, max_length: int | None = None, max_gen_toks: int = 256,
                 model=None, tokenizer=None, max_batch_size: int | None = None) -> None:
        super().__init__()
        self.checkpoint, self.step = None, None
        if model is None:
            if not run_dir:
                raise ValueError("--model_args: give run_dir=RUN_DIR (an llmforge run with checkpoints)")
            from llmforge.core.distributed import pick_device
            from llmforge.inference.run_loading import load_run
            run = load_run(run_dir, device=pick_device(device or "auto"), checkpoint=checkpoint)
            model, tokenizer = run.model, run.tokenizer
            self.checkpoint, self.step = run.checkpoint, run.step
        if tokenizer is None:
            raise ValueError(f"{run_dir or 'the model'} has no tokenizer.model: lm-eval tasks are text, "
                             "train on tokenized text (data_pipeline) to evaluate on them")
        self.model, self.sp = model, tokenizer
        self._device = next(model.parameters()).device
        self.batch_size = DEFAULT_BATCH_SIZE if str(batch_size).startswith("auto") else int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.max_length = int(max_length or model.args.max_seq_len)  # the export declares the same context
        self.max_gen_toks = int(max_gen_toks)
        self.vocab_size = model.args.vocab_size

    # ----------------------------------------------------------------------------------------- tokens
    @property
    def eot_token_id(self) -> int:
        return self.sp.eos_id()

    @property
    def prefix_token_id(self) -> int:
        return self.sp.eos_id()  # what precedes every document in training (never BOS)

    @property
    def device(self):
        return self._device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.sp.encode(string)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.sp.decode(list(tokens))

    # ----------------------------------------------------------------------------------------- scoring
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: (cache key, context ids, continuation ids) -> (sum log p(continuation | context), greedy?)."""
        items = []
        for key, ctx, cont in requests:
            if not ctx or not cont:
                raise ValueError("lm-eval gave an empty context or continuation to score")
            whole = (list(ctx) + list(cont))[-(self.max_length + 1):]  # left-truncate to the model's context
            items.append((whole[:-1], list(cont)))
        order = sorted(range(len(items)), key=lambda i: (-len(items[i][0]), i))
        out: list[tuple[float, bool] | None] = [None] * len(items)
        was_training = self.model.training
        self.model.eval()
        try:
            for b in range(0, len(order), self.batch_size):
                idx = order[b:b + self.batch_size]
                width = len(items[idx[0]][0])
                batch = torch.full((len(idx), width), self.prefix_token_id, dtype=torch.long)
                for row, i in enumerate(idx):
                    inp = items[i][0]
                    batch[row, :len(inp)] = torch.tensor(inp)
                logp = F.log_softmax(self.model(batch.to(self.device)).float(), dim=-1)
                for row, i in enumerate(idx):
                    inp, cont = items[i]
                    pos = torch.arange(len(inp) - len(cont), len(inp), device=self.device)
                    target = torch.tensor(cont, device=self.device)
                    rows = logp[row, pos]
                    greedy = bool((rows.argmax(-1) == target).all())
                    out[i] = (float(rows.gather(-1, target[:, None]).sum()), greedy)
                    if key_of(requests[i]) is not None:
                        self.cache_hook.add_partial("loglikelihood", key_of(requests[i]), out[i])
        finally:
            self.model.train(was_training)
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihood: the document after EOS, cut into windows of ``max_length`` tokens that
        each score new tokens only (lm-eval's rolling windows), every window of every document batched together."""
        windows, owner = [], []
        for n, req in enumerate(requests):
            (text,) = req.args
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (ll, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[n] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ----------------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests with the same settings and context length decode together (``batch_size`` at a time, one KV
        cache); the model has no padding mask, so contexts of other lengths go in other batches."""
        eos_text = self.tok_decode([self.eot_token_id]) or None
        jobs = []  # (context ids, settings) per request
        for req in requests:
            context, gen_kwargs = req.args
            kw = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = tuple(handle_stop_sequences(kw.pop("until", None), eos=eos_text))
            max_new = int(kw.pop("max_gen_toks"))
            if max_new >= self.max_length:
                raise ValueError(f"max_gen_toks={max_new} leaves no room for a context in {self.max_length} tokens")
            temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample") else 0.0
            ctx = (self.tok_encode(context) if context else [self.prefix_token_id])[-(self.max_length - max_new):]
            jobs.append((ctx, (until, max_new, temperature, float(kw.get("top_p", 1.0)), int(kw.get("top_k") or 0))))
        groups: dict[tuple, list[int]] = {}
        for i, (ctx, settings) in enumerate(jobs):
            groups.setdefault((len(ctx), settings), []).append(i)
        out: list[str | None] = [None] * len(jobs)
        was_training = self.model.training
        self.model.eval()
        try:
            for (_, settings), idx in groups.items():
                for b in range(0, len(idx), self.batch_size):
                    chunk = idx[b:b + self.batch_size]
                    news = self._decode([jobs[i][0] for i in chunk], *settings)
                    for i, new in zip(chunk, news):
                        out[i] = postprocess_generated_text(generation=self._continuation_text(jobs[i][0], new),
                                                            stop=list(settings[0]), think_end_token=None)
                        self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        finally:
            self.model.train(was_training)
        return out  # type: ignore[return-value]

    def _decode(self, ctxs: list[list[int]], until, max_new, temperature, top_p, top_k) -> list[list[int]]:
        """Decode equal-length contexts together until each hits EOS, a stop string or max_new tokens."""
        from llmforge.inference.generate import sample_next
        caches = self.model.new_caches(len(ctxs), len(ctxs[0]) + max_new)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(0)
        logits = self.model(torch.tensor(ctxs, device=self.device), caches, 0)[:, -1]
        new: list[list[int]] = [[] for _ in ctxs]
        done = [False] * len(ctxs)
        for pos in range(len(ctxs[0]), len(ctxs[0]) + max_new):
            toks = sample_next(logits, temperature, top_k, top_p, gen)
            for r, tok in enumerate(toks.tolist()):
                if done[r]:
                    continue
                if tok == self.eot_token_id:
                    done[r] = True
                    continue
                new[r].append(tok)
                done[r] = len(new[r]) == max_new or any(
                    s and s in self._continuation_text(ctxs[r], new[r]) for s in until)
            if all(done):
                break
            logits = self.model(toks.view(-1, 1), caches, pos)[:, -1]
        return new

    def _continuation_text(self, ctx: list[int], new: list[int]) -> str:
        """Text of ``new`` as it reads after the context (sentencepiece drops a leading space decoded alone)."""
        body = [t for t in ctx if t != self.prefix_token_id]
        full, head = self.tok_decode(body + new), self.tok_decode(body)
        return full[len(head):] if full.startswith(head) else self.tok_decode(new)


def key_of(request) -> tuple | None:
    """The (context, continuation) cache key lm-eval passes as the first element of a scoring request."""
    return request[0] if request and isinstance(request[0], tuple) else None


def bits_per_byte(total_loglikelihood: float, num_bytes: int) -> float:
    """lm-eval's bits_per_byte for a set of documents: -sum(log-likelihood in nats) / (UTF-8 bytes * ln 2)."""
    return -total_loglikelihood / (num_bytes * math.log(2))
