"""The chart of ``filial bench cl``: every contender's accuracy matrix (mean over seeds), one row of
panels per stream."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot(matrices: dict[str, dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    streams = [s for s in matrices if s != "stationary"]
    contenders = []
    for s in streams:
        contenders += [c for c in matrices[s] if c not in ("columns", "order") and c not in contenders]
    if not streams or not contenders:
        return
    fig, axes = plt.subplots(len(streams), len(contenders), squeeze=False,
                             figsize=(2.0 * len(contenders) + 1, 2.2 * len(streams) + 0.6))
    for i, s in enumerate(streams):
        cols = matrices[s]["columns"]
        for k, c in enumerate(contenders):
            ax = axes[i][k]
            ax.set_xticks([])
            ax.set_yticks([])
            if c not in matrices[s]:
                ax.axis("off")
                continue
            R = matrices[s][c]["mean"]
            ax.imshow(R, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            for r, row in enumerate(R):
                for j, v in enumerate(row):
                    ax.text(j, r, f"{100 * v:.0f}", ha="center", va="center", fontsize=6,
                            color="white" if v < 0.6 else "black")
            avg = summary["streams"][s][c]["avg_acc"]
            ax.set_title(f"{c}\navg {avg:.3f}", fontsize=8)
            if k == 0:
                ax.set_ylabel(f"{s}\nafter experience", fontsize=8)
            ax.set_xticks(range(len(cols)))
            ax.set_xticklabels(cols, rotation=90, fontsize=5)
    fig.suptitle("filial bench cl: test accuracy (%) after each experience (rows) on each slice (columns)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
