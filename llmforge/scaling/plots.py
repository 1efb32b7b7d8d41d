"""PNG plots of a fitted law (iso-loss contours + the fitted points) and of the compute-optimal frontier with the
planned point, written atomically like the trainer's loss.png."""
from __future__ import annotations


import numpy as np

from .law import ScalingLaw


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, plt, path: str) -> str:
    from llmforge.common.atomic import save_figure
    return save_figure(fig, path, dpi=110)


def plot_fit(law: ScalingLaw, params, tokens, loss, path: str) -> str:
    """Iso-loss contours of L(N, D) over the fitted range, the points coloured by their loss, and the
    compute-optimal frontier N_opt(C), D_opt(C)."""
    plt = _pyplot()
    params, tokens, loss = map(np.asarray, (params, tokens, loss))
    ln = np.linspace(np.log10(params.min()) - 0.5, np.log10(params.max()) + 0.5, 200)
    ld = np.linspace(np.log10(tokens.min()) - 0.5, np.log10(tokens.max()) + 0.5, 200)
    gn, gd = np.meshgrid(ln, ld)
    grid = law.loss(10 ** gn, 10 ** gd)
    fig, ax = plt.subplots(figsize=(7, 5))
    levels = np.quantile(grid, np.linspace(0.02, 0.98, 14))
    cs = ax.contour(gn, gd, grid, levels=np.unique(levels), cmap="viridis", linewidths=0.8)
    ax.clabel(cs, fmt="%.2f", fontsize=7)
    sc = ax.scatter(np.log10(params), np.log10(tokens), c=loss, cmap="viridis", edgecolors="k", zorder=3,
                    vmin=grid.min(), vmax=grid.max())
    fig.colorbar(sc, ax=ax, label="final validation loss")
    c = 6 * 10 ** np.linspace(ln[0] + ld[0], ln[-1] + ld[-1], 50)
    n_opt, d_opt = law.optimum(c)
    keep = ((np.log10(n_opt) >= ln[0]) & (np.log10(n_opt) <= ln[-1])
            & (np.log10(d_opt) >= ld[0]) & (np.log10(d_opt) <= ld[-1]))
    ax.plot(np.log10(n_opt[keep]), np.log10(d_opt[keep]), "r--", label="compute-optimal frontier")
    ax.set_xlabel("log10 parameters N (embeddings included)")
    ax.set_ylabel("log10 training tokens D")
    ax.set_title(f"L = {law.E:.3g} + {law.A:.3g}/N^{law.alpha:.3f} + {law.B:.3g}/D^{law.beta:.3f}", fontsize=9)
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, plt, path)


def plot_frontier(law: ScalingLaw, flops: float, params: float, tokens: float, path: str) -> str:
    """Left: N_opt(C) and D_opt(C) with the planned model; right: iso-FLOP loss curves around the budget with
    their minima and the planned (rounded) model."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    c = np.logspace(np.log10(flops) - 3, np.log10(flops) + 2, 100)
    n_opt, d_opt = law.optimum(c)
    left.loglog(c, n_opt, label="N_opt (parameters)")
    left.loglog(c, d_opt, label="D_opt (tokens)")
    left.loglog([flops], [params], "o", color="C0", markeredgecolor="k", label=f"planned N = {params:.3g}")
    left.loglog([flops], [tokens], "s", color="C1", markeredgecolor="k", label=f"planned D = {tokens:.3g}")
    left.axvline(flops, color="gray", lw=0.8, ls=":")
    left.set_xlabel("training compute C = 6 N D (FLOPs)")
    left.set_title("compute-optimal frontier", fontsize=10)
    left.legend(fontsize=8)
    for k, scale in enumerate((0.01, 0.1, 1.0, 10.0)):
        budget = flops * scale
        nb, _ = law.optimum(budget)
        n = np.logspace(np.log10(nb) - 1.2, np.log10(nb) + 1.2, 200)
        right.semilogx(n, law.loss(n, budget / (6 * n)), color=f"C{k}", label=f"C = {budget:.2g}")
        right.semilogx([nb], [law.loss(nb, budget / (6 * nb))], "x", color=f"C{k}")
    right.semilogx([params], [law.loss(params, tokens)], "o", color="red", markeredgecolor="k", label="planned")
    right.set_xlabel("parameters N")
    right.set_ylabel("predicted loss")
    right.set_title("iso-FLOP curves (x: optimum)", fontsize=10)
    right.legend(fontsize=8)
    return _save(fig, plt, path)
