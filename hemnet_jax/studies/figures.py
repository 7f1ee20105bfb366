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
