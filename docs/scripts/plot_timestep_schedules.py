"""Plot Diff-Tuning's timestep distributions psi (adaptation) and xi (retention) for a few powers tau.

Writes docs/images/timestep_schedules.png. Run from anywhere:

    python docs/scripts/plot_timestep_schedules.py
"""

from __future__ import annotations

import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from difftuning_utils import chain_of_forgetting_probs  # noqa: E402

NUM_TRAIN_TIMESTEPS = 1000
TAUS = (0.0, 0.5, 1.0, 1.5)
OUTPUT = os.path.join(ROOT, "docs", "images", "timestep_schedules.png")


def main() -> None:
    """Draw psi and xi side by side, one curve per tau, probabilities scaled by T (uniform = 1)."""
    t = range(NUM_TRAIN_TIMESTEPS)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    panels = (("adaptation", r"Adaptation $\psi(t) \propto (t+1)^\tau$  (target batch)"),
              ("retention", r"Retention $\xi(t) \propto (T-t)^\tau$  (knowledge-bank batch)"))
    colors = plt.cm.viridis([0.0, 0.3, 0.6, 0.85])
    for ax, (kind, title) in zip(axes, panels, strict=True):
        for tau, color in zip(TAUS, colors, strict=True):
            probs = chain_of_forgetting_probs(NUM_TRAIN_TIMESTEPS, tau, kind).numpy()
            label = rf"$\tau$ = {tau:g}" + ("  (uniform: plain fine-tuning)" if tau == 0 else "")
            label += "  (default)" if tau == 1 else ""
            ax.plot(t, probs * NUM_TRAIN_TIMESTEPS, color=color, lw=2, label=label)
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("timestep t  (0 = clean, 999 = pure noise)")
        ax.set_xlim(0, NUM_TRAIN_TIMESTEPS - 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(r"$T \cdot p(t)$   (1 = uniform)")
    axes[0].set_ylim(bottom=0)
    axes[1].legend(loc="upper right", fontsize=9)
    fig.suptitle(f"Diff-Tuning timestep distributions, T = {NUM_TRAIN_TIMESTEPS}", fontsize=13)
    fig.tight_layout()
    os.makedirs(os.path.dirname(OUTPUT), exist_ok=True)
    fig.savefig(OUTPUT, dpi=110)
    print(f"wrote {os.path.relpath(OUTPUT, ROOT)}")


if __name__ == "__main__":
    main()
