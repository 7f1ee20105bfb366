"""Figures of the studies (matplotlib, imported only when a figure is drawn)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def plot_fig3(results: Sequence[Mapping[str, Any]], path: str, title: str = "") -> None:
    """Fig. 3's panels: (a) ELBO per iteration, (b) N-step and (c) E-step gradient per layer
    (dashed: eq. 18's profile), per eta; (d) the total gradient to X against eta."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 2, figsize=(10, 8))
    (ax_a, ax_b), (ax_c, ax_d) = axes
    for r in results:
        layers = np.arange(1, len(r["n_step"]) + 1)
        label = f"eta={r['eta']:g}"
        ax_a.plot(layers, r["elbo"], "o-", label=label)
        (line,) = ax_b.plot(layers, r["n_step"], "o-", label=label)
        ax_b.plot(layers, r["predicted"], "--", color=line.get_color(), alpha=0.6)
        ax_c.plot(layers, r["e_step"], "o-", label=label)
    etas = [r["eta"] for r in results]
    ax_d.plot(etas, [r["total"] for r in results], "o-")
    for ax, name, xlabel, ylabel in (
        (ax_a, "(a) ELBO", "HEM iteration t", "ELBO (eq. 3)"),
        (ax_b, "(b) gradient to X from the N-step", "HEM layer t", "mean |dL/dX^(t)|"),
        (ax_c, "(c) gradient to X from the E-step", "HEM layer t", "mean |dL/dX^(t)|"),
        (ax_d, "(d) total gradient to X", "eta", "mean |dL/dX|"),
    ):
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
    for ax in (ax_a, ax_b, ax_c):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_b.legend(fontsize="small", title="dashed: eq. 18", title_fontsize="small")
    ax_a.legend(fontsize="small", loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


TABLE1_TITLE = "mIoU by T_train (best per column outlined)"


def plot_table1(rows: Sequence[int], cols: Sequence[str], values: Mapping[tuple[int, str], Any],
                best: Mapping[str, int], path: str) -> None:
    """Writes `table1_figure(...)` as a PNG."""
    import matplotlib.pyplot as plt

    fig = table1_figure(rows, cols, values, best)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table1_figure(rows: Sequence[int], cols: Sequence[str], values: Mapping[tuple[int, str], Any],
                  best: Mapping[str, int]):
    """The ablation's Table 1 as a heat map (a matplotlib Figure): T_train down, columns across,
    mIoU (%) in each square, the best T_train of each column outlined in red
    (`ablation_tables.table1`'s output; values are fractions or None).

    The figure is sized to its grid (1.3 in per column, 0.6 in per row) and never narrower than
    its title and labels, so a one-column grid shows its whole title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.array([[np.nan if values.get((t, c)) is None else 100 * values[(t, c)]
                      for c in cols] for t in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(1.3 * len(cols) + 2, 0.6 * len(rows) + 1.6),
                           layout="constrained")
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), [str(t) for t in rows])
    ax.set_ylabel("T_train")
    finite = grid[np.isfinite(grid)]
    middle = float(finite.mean()) if finite.size else 0.0
    for i, t in enumerate(rows):
        for j, c in enumerate(cols):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if grid[i, j] > middle else "white")
            if best.get(c) == t:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False,
                                           edgecolor="red", linewidth=2))
    fig.colorbar(image, ax=ax, label="mIoU (%)")
    title = fig.suptitle(TABLE1_TITLE)  # centred on the figure, whose width is set below
    _widen_to_fit(fig, [title, *ax.get_xticklabels()], columns=len(cols))
    return fig


def _widen_to_fit(fig, texts: Sequence[Any], *, columns: int, margin: float = 0.3) -> None:
    """Widens `fig` so that each of `texts` fits: the title across the whole figure (plus
    `margin` inches each side), each tick label within its column's share of the width."""
    renderer = fig.canvas.get_renderer()
    title, *labels = texts
    needed = title.get_window_extent(renderer).width / fig.dpi + 2 * margin
    widest_label = max((t.get_window_extent(renderer).width for t in labels), default=0.0)
    needed = max(needed, columns * (widest_label / fig.dpi + 0.2) + 2.0)
    width, height = fig.get_size_inches()
    if needed > width:
        fig.set_size_inches(needed, height)
