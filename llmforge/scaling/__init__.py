"""Scaling laws and a compute-optimal planner.

    python -m llmforge.scaling fit RESULTS.csv [--out LAW.json]          # L(N, D) = E + A/N^alpha + B/D^beta
    python -m llmforge.scaling sweep CONFIG --sizes ... --tokens ...     # small runs -> RESULTS.csv
    python -m llmforge.scaling plan --flops F | --gpu-hours H --gpu h100 --gpus G [--law LAW.json] [--mfu M]

law.py (fit + closed-form optimum; default law: Besiroglu et al. 2024's re-fit of Chinchilla), shapes.py (Llama
shapes with exact parameter counts), memory.py (per-rank memory estimate, layout choice), plan.py (budget ->
model, tokens, batch, layout, config), sweep.py (grid of trainer runs), plots.py. N always counts embeddings.
"""
from .law import BESIROGLU_2024, ScalingError, ScalingLaw, fit, load_law  # noqa: F401
