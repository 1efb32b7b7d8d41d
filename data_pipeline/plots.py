"""The run's pictures beside stats.json: ``quality.png`` (the quality classifier's score histogram, drawn in
filters/quality_classifier.py) and ``funnel.png`` (documents and bytes left after every step, the summary's
table). Matplotlib with the Agg backend, PNG bytes without a timestamp or software tag (the same stats give the
same bytes); written atomically by finalize.py. Without matplotlib a picture is skipped with a warning."""
from __future__ import annotations

import io
import os
import sys

from .atomic_io import write_bytes


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def png_bytes(fig) -> bytes:
    """The figure as PNG bytes (laid out, no metadata that changes between runs); closes it."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", metadata={"Software": None})
    pyplot().close(fig)
    return buf.getvalue()


def write_picture(path: str, draw, *args) -> bool:
    """``draw(*args)`` -> PNG bytes written atomically to ``path``; a warning and False without matplotlib."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"warning: matplotlib is not installed: {os.path.basename(path)} not drawn (pip install matplotlib)",
              file=sys.stderr, flush=True)
        return False
    write_bytes(path, draw(*args))
    return True


def funnel_rows(stats: dict) -> list[tuple[str, int, int]]:
    """(stage, documents, bytes) left: after reading, after each step in order, after dedup."""
    rows = [("input", stats["input"]["docs_read"], stats["input"]["bytes"])]
    rows += [(s["name"], s["docs_out"], s["bytes_out"]) for s in stats["steps"]]
    if stats.get("dedup"):
        rows.append(("dedup", stats["dedup"]["docs_out"], stats["dedup"]["bytes_out"]))
    return rows


def draw_funnel(stats: dict) -> bytes:
    """funnel.png: two horizontal bar charts (documents, MB) of funnel_rows, first stage on top."""
    plt = pyplot()
    rows = funnel_rows(stats)
    names = [r[0] for r in rows]
    ys = list(range(len(rows)))[::-1]
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.45 * len(rows) + 1.6), dpi=100, sharey=True)
    for ax, values, title, fmt in ((axes[0], [r[1] for r in rows], "documents", "{:,.0f}"),
                                   (axes[1], [r[2] / 1e6 for r in rows], "MB of text", "{:,.2f}")):
        top = max(values) or 1
        ax.barh(ys, values, color="tab:blue", height=0.7)
        for y, v in zip(ys, values):
            share = f" ({100 * v / values[0]:.0f}%)" if values[0] else ""
            ax.text(v + top * 0.01, y, fmt.format(v) + share, va="center", fontsize=8)
        ax.set_xlim(0, top * 1.35)
        ax.set_title(f"{title} left after each step")
        ax.set_yticks(ys, names)
    return png_bytes(fig)
