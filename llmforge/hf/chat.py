"""The chat template in a Hugging Face export: a transformers tokenizer whose ``apply_chat_template`` gives the
ids llmforge trained on (written by ``llmforge.export_hf`` when the run has a chat_template.json)."""
from __future__ import annotations

import os
import shutil

from llmforge.common.chat import CHECK_TEXT, JINJA, TEMPLATE_FILE, ChatTemplate


def hf_tokenizer(tok_path: str):
    """A transformers tokenizer giving sentencepiece's ids for ``tok_path`` (checked on export_hf.CHECK_TEXT), or
    None. AutoTokenizer's own conversion first; else vocab + merges extracted from the BPE model (transformers 5)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=tok_path)
    # BOS = EOS as in the export's config (training never sees BOS); nothing is added to an encoded text
    specials = dict(unk_token=sp.id_to_piece(sp.unk_id()), bos_token=sp.id_to_piece(sp.eos_id()),
                    eos_token=sp.id_to_piece(sp.eos_id()))
    candidates = []
    try:
        from transformers import LlamaTokenizer
        candidates.append(lambda: LlamaTokenizer(vocab_file=tok_path, legacy=False, add_bos_token=False, **specials))
        from tokenizers.models import BPE
        from transformers.convert_slow_tokenizer import SentencePieceExtractor

        def extracted():
            got = SentencePieceExtractor(tok_path).extract(BPE)
            vocab, merges = (got["vocab"], got["merges"]) if isinstance(got, dict) else got[:2]
            return LlamaTokenizer(vocab=vocab, merges=merges, add_prefix_space=True, legacy=False,
                                  add_bos_token=False, **specials)
        candidates.append(extracted)
    except ImportError:
        return None
    for make in candidates:
        try:
            tok = make()
            if tok.encode(CHECK_TEXT, add_special_tokens=False) == sp.encode(CHECK_TEXT):
                return tok
        except Exception:  # noqa: BLE001 - conversion support varies across transformers versions
            continue
    return None


def write_hf_chat_template(out_dir: str, run_dir: str, tok_path: str) -> str:
    """Export: a tokenizer with the run's chat template (tokenizer_config.json / chat_template.jinja) whose
    ``apply_chat_template`` gives our ids (checked on a sample conversation). Returns a note for the CLI."""
    template = os.path.join(run_dir, TEMPLATE_FILE)
    if not os.path.isfile(template):
        return ""
    ours = ChatTemplate(tok_path)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world, 12 3?"},
            {"role": "assistant", "content": "Hi.\n  Two  spaces"}, {"role": "user", "content": "ünïcödé"}]

    def same_ids(tok) -> bool:
        tok.chat_template = JINJA
        return (list(tok.apply_chat_template(msgs[:3], tokenize=True, return_dict=False)) == ours.encode(msgs[:3])[0]
                and list(tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False))
                == ours.encode_prompt(msgs))

    def candidates():
        if os.path.isfile(os.path.join(out_dir, "tokenizer.json")):  # export_hf's own conversion first
            from transformers import AutoTokenizer
            yield AutoTokenizer.from_pretrained(out_dir)
        yield hf_tokenizer(tok_path)  # text after a special token without a dummy prefix, as the template needs

    tok = next((t for t in candidates() if t is not None and same_ids(t)), None)
    if tok is None:
        return "chat template not exported (no transformers tokenizer gives the template's ids)"
    tok.save_pretrained(out_dir)
    shutil.copyfile(template, os.path.join(out_dir, "llmforge_" + TEMPLATE_FILE))  # HF reads chat_template.json itself
    return "chat template in the tokenizer config"
