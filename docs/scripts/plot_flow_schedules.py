"""Plot Diff-Tuning's flow-matching densities over sigma for SD3 and Flux: the base density of diffusers'
scripts (--weighting_scheme) and psi / xi reweighting it, on each model's sigma table.

Writes docs/images/flow_schedules.png. Run from anywhere:

    python docs/scripts/plot_flow_schedules.py
"""

from __future__ import annotations

import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402

from difftuning_utils import flow_base_probs, flow_chain_of_forgetting_probs  # noqa: E402

OUTPUT = os.path.join(ROOT, "docs", "images", "flow_schedules.png")
# (title, scheduler, diffusers' default --weighting_scheme of that model's DreamBooth LoRA script)
MODELS = (("SD3 / SD3.5: shift 3, logit-normal (upstream's default)", FlowMatchEulerDiscreteScheduler(shift=3.0),
           "logit_normal"),
          ("Flux.1: table as the training scheduler builds it, uniform ('none', upstream's default)",
           FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True), "none"))


def density_over_sigma(probs, sigmas, bins: int = 50):
    """Probability mass per sigma bin of width 1/bins, scaled so that uniform over sigma = 1."""
    import numpy as np

    hist, edges = np.histogram(sigmas.numpy(), bins=bins, range=(0, 1), weights=probs.numpy())
    return (edges[:-1] + edges[1:]) / 2, hist * bins


def main() -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for ax, (title, scheduler, scheme) in zip(axes, MODELS, strict=True):
        sigmas = scheduler.sigmas
        base = flow_base_probs(len(sigmas), scheme)
        curves = (("base density (plain DreamBooth)", base, "grey"),
                  (r"adaptation $\psi \propto$ base$\cdot\sigma^{\tau}$ (subject)",
                   flow_chain_of_forgetting_probs(sigmas, base, 1.0, "adaptation"), "tab:red"),
                  (r"retention $\xi \propto$ base$\cdot(1-\sigma+1/N)^{\tau}$ (class samples)",
                   flow_chain_of_forgetting_probs(sigmas, base, 1.0, "retention"), "tab:blue"))
        for label, probs, color in curves:
            x, y = density_over_sigma(probs, sigmas)
            ax.plot(x, y, color=color, lw=2, label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(r"$\sigma$  (0 = clean, 1 = pure noise)")
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("density over sigma (uniform = 1)")
    axes[0].set_ylim(bottom=0)
    axes[1].legend(loc="upper left", fontsize=8)
    fig.suptitle(r"Diff-Tuning over sigma for flow-matching models, $\tau$ = 1", fontsize=12)
    fig.tight_layout()
    fig.savefig(OUTPUT, dpi=110)
    print(f"wrote {os.path.relpath(OUTPUT, ROOT)}")


if __name__ == "__main__":
    main()
