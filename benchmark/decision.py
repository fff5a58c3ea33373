#!/usr/bin/env python
"""The decision table of a pair with two feature spaces (the Fashion-MNIST halves, the digit halves): every arm
against the plain baseline, paired by seed, in both feature spaces, at the validation-chosen checkpoint and at the
end of training; and FID against steps.

Arms come from finished ``run_benchmark`` folders (``--arm NAME=OUTPUT_DIR:RUN_ARM``), so runs made with other
learning rates or batch sizes in other folders are compared seed by seed with one baseline. A difference counts
only where the paired t-test gives p < ``--alpha`` in *both* feature spaces with the same sign; otherwise the
verdict is "no difference". Given several ``--baseline`` arms (plain fine-tuning at several learning rates or batch
sizes), the baseline is the *tuned* one: the arm whose mean validation FID at its chosen checkpoints is lowest, as
a user with a validation set would pick it; the reference set plays no part in the choice. ``RUN_ARM@STEP`` makes
an arm of the runs stopped at a fixed step (scored by ``run_benchmark --score_steps``): plain at a length fixed in
advance, against plain stopped early.

    python -m benchmark.decision --baseline plain \\
        --arm plain=outputs/fashion_a_to_b/decision_lr1e-4:standard \\
        --arm psi_only=outputs/fashion_a_to_b/decision_lr1e-4:psi_only \\
        --arm difftuning=outputs/fashion_a_to_b/decision_lr1e-4:difftuning \\
        --table outputs/fashion_a_to_b/decision.md --plot docs/images/fashion_a_to_b_fid_vs_steps.png
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

from benchmark.runner import run_seed
from difftuning_common import ConfigError, atomic_write_json
from training_plumbing import run_cli

SPACES = ("first", "second")  # the five-class target CNN; the ten-class CNN (other data, other weights)
WHEN = {"chosen": "at the validation-chosen checkpoint", "final": "at the end of training"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arm", action="append", required=True, metavar="NAME=OUTPUT_DIR:RUN_ARM[@STEP]",
                        help="An arm of the table: the runs <OUTPUT_DIR>/runs/<RUN_ARM>-seed<N>; with @STEP, those "
                             "runs stopped at that fixed step. Repeat per arm.")
    parser.add_argument("--baseline", nargs="+", required=True,
                        help="The arm every other arm is compared with; given several, the one with the lowest mean "
                             "validation FID (a tuned baseline).")
    parser.add_argument("--alpha", type=float, default=0.05, help="Significance level of the paired t-tests.")
    parser.add_argument("--table", default=None, help="Write the markdown table here too.")
    parser.add_argument("--output_json", default=None, help="Per-seed numbers and the tests, as JSON.")
    parser.add_argument("--plot", default=None, help="PNG of validation FID against steps (both spaces).")
    args = parser.parse_args(argv)
    arms = {}
    for spec in args.arm:
        name, sep, where = spec.partition("=")
        folder, sep2, run_arm = where.rpartition(":")
        run_arm, at, step = run_arm.partition("@")
        if not (sep and sep2 and name and run_arm) or (at and not step.isdigit()):
            parser.error(f"--arm {spec}: expected NAME=OUTPUT_DIR:RUN_ARM or NAME=OUTPUT_DIR:RUN_ARM@STEP.")
        arms[name] = (folder, run_arm, int(step) if at else None)
    for name in args.baseline:
        if name not in arms:
            parser.error(f"--baseline {name} is not one of the --arm names ({', '.join(arms)}).")
    args.arms = arms
    return args


def load_arm(folder: str, run_arm: str, step: int | None = None) -> dict[int, dict]:
    """{seed: metrics.json} of the finished runs of one arm; they must have been scored along their length. With
    ``step``, each run as stopped there: that checkpoint's scores stand for both the chosen and the final model."""
    runs = os.path.join(folder, "runs")
    found = {}
    for name in sorted(os.listdir(runs)) if os.path.isdir(runs) else []:
        seed = run_seed(name, run_arm)
        path = os.path.join(runs, name, "metrics.json")
        if seed is not None and os.path.exists(path):
            metrics = json.load(open(path))
            if "early_stopped" not in metrics:
                raise ConfigError(f"{path} has no validation curve: run the benchmark with --eval_every.")
            if step is not None:
                if str(step) not in metrics.get("at_step", {}):
                    raise ConfigError(f"{path} has no scores at step {step}: run the benchmark again with "
                                      f"--score_steps {step}.")
                scored = metrics["at_step"][str(step)]
                metrics = {**scored, "early_stopped": {"step": step, **scored}, "val_curve": metrics["val_curve"]}
            found[seed] = metrics
    if not found:
        raise ConfigError(f"No finished {run_arm} run in {runs}.")
    return found


def fid(metrics: dict, when: str, space: str) -> float:
    scored = metrics["early_stopped"] if when == "chosen" else metrics
    return scored["fid"] if space == "first" else scored["second_space"]["fid"]


def side_metric(metrics: dict, name: str, space: str) -> float:
    """Accuracy or copy rate at the validation-chosen checkpoint, in one feature space."""
    scored = metrics["early_stopped"]
    return scored[name] if space == "first" else scored["second_space"][name]


def side_metrics(arms: dict[str, dict[int, dict]], baseline: str) -> tuple[str, dict]:
    """What FID mixes, apart: class accuracy (higher: more samples of their class) and copy rate (lower: fewer
    near-copies of the few-shot images), each arm against the baseline by paired difference and t-test."""
    from scipy import stats

    lines = [f"| arm | accuracy (second space) | vs {baseline} (p) | copy rate (second space) | vs {baseline} (p) |",
             "|---|---|---|---|---|"]
    report = {}
    for name, runs in arms.items():
        cells, report[name] = [name], {}
        for metric in ("accuracy", "copy_rate"):
            values = {space: [side_metric(runs[s], metric, space) for s in sorted(runs)] for space in SPACES}
            cells.append(" ".join(f"{statistics.mean(v):.3f}" if space == "first" else f"({statistics.mean(v):.3f})"
                                  for space, v in values.items()))
            if name == baseline:
                cells.append("—")
                continue
            seeds = sorted(set(runs) & set(arms[baseline]))
            tests = {}
            for space in SPACES:
                a = [side_metric(runs[s], metric, space) for s in seeds]
                b = [side_metric(arms[baseline][s], metric, space) for s in seeds]
                tests[space] = {"difference": statistics.mean(a) - statistics.mean(b),
                                "p": float(stats.ttest_rel(a, b).pvalue) if len(seeds) > 1 else None}
            report[name][metric] = tests
            cells.append(" / ".join(f"{t['difference']:+.3f} ({format_p(t['p'])})" for t in tests.values()))
        lines.append("| " + " | ".join(cells) + " |")
    notes = ("\nAt the validation-chosen checkpoint. Accuracy: the share of samples the space's classifier assigns to "
             "their class. Copy rate: the share of samples closer to a few-shot training image than 95% of unseen "
             "real images are (unseen real images: about 0.05).\n")
    return "\n".join(lines) + "\n" + notes, report


def validation_fid(metrics: dict) -> float:
    """First-space validation FID at the run's chosen checkpoint (the number early stopping minimised)."""
    step = metrics["early_stopped"]["step"]
    return next(point["fid"] for point in metrics["val_curve"] if point["step"] == step)


def tune_baseline(arms: dict[str, dict[int, dict]], candidates: list[str]) -> tuple[str, dict[str, float]]:
    """The candidate with the lowest mean validation FID over its seeds, and every candidate's mean."""
    means = {name: statistics.mean(validation_fid(m) for m in arms[name].values()) for name in candidates}
    return min(means, key=means.get), means


def paired_test(arm: dict[int, dict], base: dict[int, dict], when: str, space: str) -> dict:
    """Relative FID change of ``arm`` against ``base`` per shared seed, its mean and the paired t-test."""
    from scipy import stats

    seeds = sorted(set(arm) & set(base))
    a, b = [fid(arm[s], when, space) for s in seeds], [fid(base[s], when, space) for s in seeds]
    change = [100 * (x - y) / y for x, y in zip(a, b, strict=True)]
    p = float(stats.ttest_rel(a, b).pvalue) if len(seeds) > 1 else None  # one pair has no spread to test
    return {"seeds": seeds, "change_percent": change, "mean_change_percent": statistics.mean(change), "p": p}


def format_p(p: float | None) -> str:
    return f"p {p:.3f}" if p is not None else "one seed, no test"


def verdict(tests: dict[str, dict], alpha: float) -> str:
    """better / worse only where both spaces agree in sign and both are significant."""
    if any(t["p"] is None for t in tests.values()):
        return "one seed: no verdict"
    signs = {t["mean_change_percent"] < 0 for t in tests.values()}
    if len(signs) == 1 and all(t["p"] < alpha for t in tests.values()):
        return "**better**" if signs.pop() else "**worse**"
    return "no difference"


def summarize(arms: dict[str, dict[int, dict]], baseline: str, alpha: float) -> tuple[str, dict]:
    def fmt(values: list[float]) -> str:
        return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else \
            f"{values[0]:.2f}"

    lines = ["| arm | seeds | chosen step | FID, chosen (second space) | FID at the end (second space) | "
             f"vs {baseline}, chosen: first / second space (p) | verdict | vs {baseline}, end (p) | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    report = {}
    for name, runs in arms.items():
        seeds = sorted(runs)
        cells = [name, str(len(seeds)), ", ".join(str(runs[s]["early_stopped"]["step"]) for s in seeds)]
        for when in WHEN:
            cells.append(f"{fmt([fid(runs[s], when, 'first') for s in seeds])} "
                         f"({fmt([fid(runs[s], when, 'second') for s in seeds])})")
        report[name] = {"seeds": seeds, "tests": {}}
        for when in WHEN:
            if name == baseline:
                cells += ["—", "—"]
                continue
            tests = {space: paired_test(runs, arms[baseline], when, space) for space in SPACES}
            report[name]["tests"][when] = tests
            cells.append(" / ".join(f"{t['mean_change_percent']:+.1f}% ({format_p(t['p'])})" for t in tests.values()))
            cells.append(verdict(tests, alpha))
        lines.append("| " + " | ".join(cells) + " |")
    scored = next(iter(arms[baseline].values()))  # every arm is scored alike; the baseline's counts say how
    notes = (f"\nFID against the {scored['num_reference']:,}-image reference ({scored['num_generated']:,} samples). "
             "Changes are paired by seed (same seeds, same sampling noise); p: paired t-test. A verdict needs "
             f"p < {alpha} in both feature spaces with one sign. Chosen step: the checkpoint with the lowest "
             "validation FID (first space, on the validation split), per seed.\n")
    return "\n".join(lines) + "\n" + notes, report


def plot_curves(arms: dict[str, dict[int, dict]], path: str) -> None:
    """Validation FID against steps, mean over seeds with the seeds' range shaded, one panel per space."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, (space, key) in zip(axes, (("first", "fid"), ("second", "second_fid")), strict=True):
        for name, runs in arms.items():
            steps = sorted({point["step"] for m in runs.values() for point in m["val_curve"]})
            by_step = [[p[key] for m in runs.values() for p in m["val_curve"] if p["step"] == s] for s in steps]
            ax.plot(steps, [statistics.mean(v) for v in by_step], marker="o", markersize=3, label=name)
            ax.fill_between(steps, [min(v) for v in by_step], [max(v) for v in by_step], alpha=0.15)
        ax.set_title(f"{space} feature space (validation split)")
        ax.set_xlabel("training step")
        ax.set_ylabel("FID ↓ (log scale)")
        ax.set_yscale("log")  # the first steps' FIDs are ten times the plateau, where the arms differ
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"{path}.tmp.png", dpi=120)
    os.replace(f"{path}.tmp.png", path)


def main(args: argparse.Namespace) -> None:
    arms = {name: load_arm(*where) for name, where in args.arms.items()}
    baseline, candidates = tune_baseline(arms, args.baseline)
    table, report = summarize(arms, baseline, args.alpha)
    if len(candidates) > 1:
        table += ("Baseline: " + ", ".join(f"{name} {value:.2f}" for name, value in candidates.items())
                  + f" (mean validation FID at the chosen step): the tuned baseline is **{baseline}**.\n")
    sides, side_report = side_metrics(arms, baseline)
    table += "\n" + sides
    print(table)
    if args.table:
        with open(args.table, "w") as f:
            f.write(table)
    if args.output_json:
        atomic_write_json(args.output_json, {"baseline": baseline, "baseline_candidates": candidates, "arms": {
            name: {"source": "{}:{}".format(*args.arms[name][:2]) + (
                       f"@{args.arms[name][2]}" if args.arms[name][2] is not None else ""), **report[name],
                   "side_metrics": side_report[name],
                   "fid": {when: {space: [fid(arms[name][s], when, space) for s in report[name]["seeds"]]
                                  for space in SPACES} for when in WHEN}} for name in arms}})
    if args.plot:  # a fixed-step arm's curve is its runs' own: drawn once, under the runs' early-stopped name
        plot_curves({name: runs for name, runs in arms.items() if args.arms[name][2] is None}, args.plot)


if __name__ == "__main__":
    run_cli(main, parse_args)
