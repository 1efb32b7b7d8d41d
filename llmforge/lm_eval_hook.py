"""Make ``lm_eval --model llmforge`` work: register the adapter when lm-eval builds its model registry.

lm-eval 0.4.13 finds models only in its own registry (``lm_eval.models.MODEL_MAPPING``, filled when
``lm_eval.models`` is imported; no entry-point discovery), so a plugin has to be registered inside the lm_eval
process. The installed ``llmforge-lm-eval.pth`` imports this module at interpreter start-up; it costs nothing
(stdlib only) and waits for ``lm_eval.models`` to be imported, then adds the lazy entry
``"llmforge" -> "llmforge.inference.lm_eval_adapter:LLMForgeLM"`` (the adapter, torch and the run load only when asked for).
Importing ``llmforge.inference.lm_eval_adapter`` yourself registers it too (``@register_model``).
"""
from __future__ import annotations

import importlib.abc
import sys

MODEL_NAME = "llmforge"
TARGET = "llmforge.inference.lm_eval_adapter:LLMForgeLM"


def register() -> None:
    """Add the lazy registry entry (idempotent); lm_eval must be importable."""
    from lm_eval.api.registry import model_registry
    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=TARGET)


class _AfterModelsImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the real loader of ``lm_eval.models`` so ``register`` runs right after it."""

    def find_spec(self, name, path=None, target=None):
        if name != "lm_eval.models":
            return None
        spec = None
        for finder in sys.meta_path:  # whoever would have found it (site-packages, an editable lm-eval...)
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        real_exec = loader.exec_module

        def exec_module(module):
            real_exec(module)
            try:
                register()
            except Exception as e:  # never break lm_eval itself over the plugin
                print(f"llmforge: could not register the lm-eval model 'llmforge': {e}", file=sys.stderr)
        loader.exec_module = exec_module
        return spec


def install() -> None:
    if "lm_eval.models" in sys.modules:  # imported before us (unusual): register now
        try:
            register()
        except Exception:  # noqa: BLE001 - same policy as above
            pass
        return
    if not any(isinstance(f, _AfterModelsImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterModelsImport())


install()
