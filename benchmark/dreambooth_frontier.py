#!/usr/bin/env python
"""The DreamBooth miniature compared at equal forgetting: each arm's fidelity/prior-preservation frontier.

DreamBooth trades subject fidelity against forgetting, so an arm that learns the subject faster and forgets
faster has won nothing at a fixed step. Every run of ``dreambooth_benchmark`` records, at step 0 (the base model)
and at each checkpoint, its fidelity and how much of the class prompt it kept, in two feature spaces. Here each
run becomes a curve over its checkpoints, with forgetting on the x axis (``prior_kept``; or ``class_kept`` =
1 - ``pres``, the class samples not collapsed onto the subject) and fidelity on the y axis, and its *frontier*
F(L): the highest fidelity the run reached while keeping at least L (on the straight segments between
checkpoints, so a level between two checkpoints is interpolated). Then, per feature space and axis:

* the matched level L: the tuned baseline's mean x at its validation-chosen checkpoints (where a user of the
  baseline would stop);
* ``at_level``: each run's F(L), paired by seed against the baseline's; ``area``: F's mean over the x range all
  compared runs span (the area under the frontier, normalised);
* a verdict only where the paired t-test gives p < ``--alpha`` in both feature spaces with one sign.

Arms come from finished ``dreambooth_benchmark`` folders (``--arm NAME=OUTPUT_DIR:RUN_ARM``). ``NAME`` is
``FAMILY`` or ``FAMILY@CONFIG``: of a family given at several configs (learning rates, ``--prior_loss_weight``),
the one with the largest validation frontier is kept (the area under F of ``val_fidelity``, first feature space,
``prior_kept`` axis, over the family's own x range, on the seeds all its configs have: the validation images play
the reference's part, the reference takes no part in the choice), as a user with a validation set would tune it.

    python -m benchmark.dreambooth_frontier --baseline prior \\
        --arm prior@w1_lr2e-4=outputs/frontier/openmoji_cat_face/w1_lr2e-4:prior \\
        --arm difftuning_class@w1_lr2e-4=outputs/frontier/openmoji_cat_face/w1_lr2e-4:difftuning_class \\
        --output_json docs/measurements/dreambooth_frontier_openmoji_cat_face.json \\
        --plot docs/images/dreambooth_frontier_openmoji_cat_face.png

``--keep_records OUTPUT_DIR DEST`` copies a benchmark folder's per-run records (``result.json``,
``settings.json``) to ``DEST`` (under docs/measurements/runs/), where the committed reports read them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics

import numpy as np

from benchmark.runner import ROOT, run_seed
from difftuning_common import ConfigError, atomic_write_json
from training_plumbing import run_cli

SPACES = ("openmoji", "emoji_heldout")  # dreambooth_benchmark.FEATURE_SPACES (not imported: it loads torch)
AXES = {"prior_kept": "prior kept", "class_kept": "1 - pres"}
GRID = 101  # levels the area is averaged over


# ----------------------------------------------------------------------------------------------
# One run's curve and frontier
# ----------------------------------------------------------------------------------------------


def x_value(metrics: dict, axis: str) -> float:
    return metrics["prior_kept"] if axis == "prior_kept" else 1.0 - metrics["pres"]


def curve_points(result: dict, space: str, axis: str, y: str = "fidelity") -> list[tuple[float, float]]:
    """(x, y) at step 0 (the base model, where every run starts) and at each checkpoint, in step order."""
    steps = sorted(result["curve"], key=int)
    scored = [result["base"][space]] + [result["curve"][s][space] for s in steps]
    return [(x_value(m, axis), m[y]) for m in scored]


def frontier(points: list[tuple[float, float]], level: float) -> float | None:
    """The highest y the curve reaches with x >= ``level``, on its checkpoints and on the straight segments
    between them (a segment crossing ``level`` contributes its interpolated y there); None where no point of the
    curve keeps that much."""
    best = [y for x, y in points if x >= level]
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if (x0 - level) * (x1 - level) < 0:
            best.append(y0 + (y1 - y0) * (level - x0) / (x1 - x0))
    return max(best) if best else None


def frontier_area(points: list[tuple[float, float]], low: float, high: float) -> float:
    """F's mean over ``GRID`` levels from ``low`` to ``high`` (the area under the frontier, normalised)."""
    values = [frontier(points, level) for level in np.linspace(low, high, GRID)]
    if any(v is None for v in values):
        raise ValueError(f"the curve does not reach x = {high}")
    return float(np.mean(values))


def x_range(runs: list[dict], space: str, axis: str) -> tuple[float, float]:
    """The x range every run's frontier is defined on: from the lowest x any run reached to the lowest of the runs'
    highest x (F is defined, and flat at the run's best, below a run's own lowest point)."""
    xs = [[x for x, _ in curve_points(r, space, axis)] for r in runs]
    return min(min(x) for x in xs), min(max(x) for x in xs)


# ----------------------------------------------------------------------------------------------
# Arms, tuning, tests
# ----------------------------------------------------------------------------------------------


def load_runs(folder: str, run_arm: str) -> dict[int, dict]:
    """{seed: result.json} of the finished runs of one arm, with their ``settings.json`` under ``"settings"``."""
    runs = os.path.join(folder, "runs")
    found = {}
    for name in sorted(os.listdir(runs)) if os.path.isdir(runs) else []:
        seed = run_seed(name, run_arm)
        path = os.path.join(runs, name, "result.json")
        if seed is not None and os.path.exists(path):
            result = json.load(open(path))
            if "base" not in result:
                raise ConfigError(f"{path} has no base-model point (made before the frontier was recorded): run "
                                  "it again with the current dreambooth_benchmark.")
            result["settings"] = json.load(open(os.path.join(runs, name, "settings.json")))
            found[seed] = result
    if not found:
        raise ConfigError(f"No finished {run_arm} run in {runs}.")
    return found


def tune(arms: dict[str, dict[int, dict]]) -> dict[str, dict]:
    """Per family, the config with the largest mean validation frontier (``val_fidelity``, first space,
    ``prior_kept`` axis, over the family's own range), scored on the seeds every config of the family has (the
    sweep's: the chosen config's later seeds do not change the choice), and every config's score."""
    families: dict[str, list[str]] = {}
    for name in arms:
        families.setdefault(name.split("@")[0], []).append(name)
    tuning = {}
    for family, names in families.items():
        seeds = sorted(set.intersection(*(set(arms[n]) for n in names)))
        if not seeds:
            raise ConfigError(f"the settings of {family} share no seed, so they cannot be compared: "
                              f"{', '.join(names)}.")
        low, high = x_range([arms[n][s] for n in names for s in seeds], SPACES[0], "prior_kept")
        scores = {n: statistics.mean(frontier_area(curve_points(arms[n][s], SPACES[0], "prior_kept", "val_fidelity"),
                                                   low, high) for s in seeds) for n in names}
        tuning[family] = {"chosen": max(scores, key=lambda n: (scores[n], n)), "scores": scores, "seeds": seeds}
    return tuning


def paired(values: dict[int, float | None], base: dict[int, float | None]) -> dict:
    """Mean paired difference over the shared seeds and the paired t-test's p (None for one pair). A run that never
    kept as much as the matched level (None: the 1 - pres of a run that only collapsed further) has no pair."""
    from scipy import stats

    seeds = sorted(s for s in set(values) & set(base) if values[s] is not None and base[s] is not None)
    a, b = [values[s] for s in seeds], [base[s] for s in seeds]
    p = float(stats.ttest_rel(a, b).pvalue) if len(seeds) > 1 and a != b else None
    return {"seeds": seeds, "difference": statistics.mean(a) - statistics.mean(b) if seeds else None, "p": p}


def verdict(tests: dict[str, dict], alpha: float) -> str:
    """The project's one rule: higher / lower only where both feature spaces give p < alpha with one sign."""
    if any(t["p"] is None for t in tests.values()):
        return "no test (one seed or identical)"
    signs = {t["difference"] > 0 for t in tests.values()}
    if len(signs) == 1 and all(t["p"] < alpha for t in tests.values()):
        return "higher" if signs.pop() else "lower"
    return "no difference"


def report(arms: dict[str, dict[int, dict]], baseline: str, alpha: float) -> dict:
    """Tuning, matched levels, every family's frontier numbers and its tests against the baseline."""
    tuning = tune(arms)
    if baseline not in tuning:
        raise ConfigError(f"--baseline {baseline} is not a family of the --arm names ({', '.join(tuning)}).")
    chosen = {family: arms[t["chosen"]] for family, t in tuning.items()}
    levels, ranges = {}, {}
    for space in SPACES:
        levels[space], ranges[space] = {}, {}
        for axis in AXES:
            at_chosen = [x_value(r["curve"][str(r["chosen_step"])][space], axis) for r in chosen[baseline].values()]
            levels[space][axis] = statistics.mean(at_chosen)
            ranges[space][axis] = x_range([r for runs in chosen.values() for r in runs.values()], space, axis)
    families = {}
    for family, runs in chosen.items():
        last = {s: max(map(int, r["curve"])) for s, r in runs.items()}
        entry = {"config": tuning[family]["chosen"], "seeds": sorted(runs),
                 "chosen_steps": [runs[s]["chosen_step"] for s in sorted(runs)],
                 "last_steps": [last[s] for s in sorted(runs)],
                 "interior": sum(runs[s]["chosen_step"] < last[s] for s in runs),
                 "at_chosen": {space: {m: statistics.mean(r["chosen"][space][m] for r in runs.values())
                                       for m in ("fidelity", "pres", "prior_kept", "drift", "div")}
                               for space in SPACES},
                 "at_level": {}, "area": {}, "tests": {}, "verdicts": {}}
        for space in SPACES:
            entry["at_level"][space], entry["area"][space] = {}, {}
            for axis in AXES:
                points = {s: curve_points(r, space, axis) for s, r in runs.items()}
                entry["at_level"][space][axis] = {s: frontier(p, levels[space][axis]) for s, p in points.items()}
                entry["area"][space][axis] = {s: frontier_area(p, *ranges[space][axis]) for s, p in points.items()}
        families[family] = entry
    for family, entry in families.items():
        if family == baseline:
            continue
        for quantity in ("at_level", "area"):
            entry["tests"][quantity], entry["verdicts"][quantity] = {}, {}
            for axis in AXES:
                tests = {space: paired(entry[quantity][space][axis], families[baseline][quantity][space][axis])
                         for space in SPACES}
                entry["tests"][quantity][axis] = tests
                entry["verdicts"][quantity][axis] = verdict(tests, alpha)
    for entry in families.values():  # JSON keys are strings: keep the seeds' values as lists in seed order
        for quantity in ("at_level", "area"):
            for space in SPACES:
                for axis in AXES:
                    entry[quantity][space][axis] = [entry[quantity][space][axis][s] for s in entry["seeds"]]
    subjects = sorted({r.get("subject", "openmoji_cat_face") for runs in arms.values() for r in runs.values()})
    return {"subjects": subjects, "baseline": baseline, "alpha": alpha, "tuning": tuning, "levels": levels,
            "ranges": {s: {a: list(v) for a, v in r.items()} for s, r in ranges.items()}, "families": families,
            "base": next(iter(next(iter(arms.values())).values()))["base"]}


def pool(reports: dict[str, dict], alpha: float) -> dict:
    """Every subject's report together: per family and quantity, the paired differences against the baseline of all
    (subject, seed) pairs, one t-test over them per space, and the verdict under the same rule."""
    from scipy import stats

    baselines = {r["baseline"] for r in reports.values()}
    if len(baselines) != 1:
        raise ConfigError(f"the reports have different baselines ({', '.join(sorted(baselines))}): pool alike ones.")
    baseline = baselines.pop()
    families = sorted(set.intersection(*(set(r["families"]) for r in reports.values())) - {baseline})
    pooled = {}
    for family in families:
        pooled[family] = {"tests": {}, "verdicts": {}}
        for quantity in ("at_level", "area"):
            pooled[family]["tests"][quantity], pooled[family]["verdicts"][quantity] = {}, {}
            for axis in AXES:
                tests = {}
                for space in SPACES:
                    diffs = []
                    for rep in reports.values():
                        arm, base = rep["families"][family], rep["families"][baseline]
                        shared = sorted(set(arm["seeds"]) & set(base["seeds"]))
                        pairs = [(arm[quantity][space][axis][arm["seeds"].index(s)],
                                  base[quantity][space][axis][base["seeds"].index(s)]) for s in shared]
                        diffs += [a - b for a, b in pairs if a is not None and b is not None]
                    p = float(stats.ttest_1samp(diffs, 0.0).pvalue) if len(diffs) > 1 and any(diffs) else None
                    tests[space] = {"pairs": len(diffs), "difference": statistics.mean(diffs) if diffs else None,
                                    "p": p}
                pooled[family]["tests"][quantity][axis] = tests
                pooled[family]["verdicts"][quantity][axis] = verdict(tests, alpha)
    return {"baseline": baseline, "alpha": alpha, "reports": sorted(reports), "families": pooled}


# ----------------------------------------------------------------------------------------------
# Table, plot, records
# ----------------------------------------------------------------------------------------------


def format_test(test: dict) -> str:
    if test["difference"] is None:
        return "no pair"
    p = f"p {test['p']:.3f}" if test["p"] is not None else "no test"
    return f"{test['difference']:+.3f} ({p})"


def mean_of_reached(values: list[float | None]) -> str:
    """The mean over the runs that reached the level, and how many did not."""
    reached = [v for v in values if v is not None]
    missing = f" ({len(values) - len(reached)} never kept that much)" if len(reached) < len(values) else ""
    return (f"{statistics.mean(reached):.3f}" if reached else "—") + missing


def table(rep: dict) -> str:
    """Markdown: per family its tuned config and chosen steps, its fidelity at the matched level and its frontier
    area (mean over seeds, per space), and the tests against the baseline with the verdict."""
    baseline = rep["baseline"]
    levels = "; ".join(f"{space} features: " + ", ".join(f"{AXES[a]} {rep['levels'][space][a]:.3f}" for a in AXES)
                       for space in SPACES)
    lines = [f"Subjects: {', '.join(rep['subjects'])}. Matched levels (the tuned `{baseline}`'s mean at its chosen "
             f"checkpoints): {levels}.", "",
             "| family | config | chosen steps (interior / runs) | fidelity at matched prior kept | vs "
             f"`{baseline}` | verdict | fidelity at matched 1 - pres | vs `{baseline}` | verdict | frontier area "
             f"(prior kept) | vs `{baseline}` | verdict |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for family, e in rep["families"].items():
        cells = [family, e["config"], f"{', '.join(map(str, e['chosen_steps']))} ({e['interior']} / "
                 f"{len(e['seeds'])})"]
        for quantity, axis in (("at_level", "prior_kept"), ("at_level", "class_kept"), ("area", "prior_kept")):
            cells.append(" / ".join(mean_of_reached(e[quantity][s][axis]) for s in SPACES))
            if family == baseline:
                cells += ["—", "—"]
            else:
                cells.append(" / ".join(format_test(e["tests"][quantity][axis][s]) for s in SPACES))
                cells.append(e["verdicts"][quantity][axis])
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Each cell: OpenMoji features / held-out emoji features; differences paired by seed, p: paired "
              f"t-test; a verdict needs p < {rep['alpha']} in both spaces with one sign.", "",
              "Tuning (mean validation frontier area, first space): " + "; ".join(
                  f"{family}: " + ", ".join(f"{n.partition('@')[2] or n} {v:.3f}" for n, v in t["scores"].items())
                  + f" -> **{t['chosen']}**" for family, t in rep["tuning"].items()), ""]
    return "\n".join(lines)


def plot(arms: dict[str, dict[int, dict]], rep: dict, path: str) -> None:
    """Fidelity against forgetting, one panel per (axis, space): every seed's curve of each tuned family (thin),
    the mean frontier (thick), the matched level (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(AXES), len(SPACES), figsize=(10, 7.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, axis in enumerate(AXES):
        for col, space in enumerate(SPACES):
            ax = axes[row][col]
            low = rep["ranges"][space][axis][0]
            for i, (family, entry) in enumerate(rep["families"].items()):
                runs = arms[entry["config"]]
                for r in runs.values():
                    xs, ys = zip(*curve_points(r, space, axis), strict=True)
                    ax.plot(xs, ys, color=colours[i % len(colours)], alpha=0.25, linewidth=0.8)
                # the family's mean frontier where every one of its runs has one: up to the lowest of their highest x
                levels = np.linspace(low, x_range(list(runs.values()), space, axis)[1], GRID)
                mean = [statistics.mean(frontier(curve_points(r, space, axis), lv) for r in runs.values())
                        for lv in levels]
                ax.plot(levels, mean, color=colours[i % len(colours)], linewidth=2.2,
                        label=f"{family} ({entry['config'].partition('@')[2] or 'default'})")
            ax.axvline(rep["levels"][space][axis], color="grey", linestyle="--", linewidth=1)
            ax.set_xlabel(f"{AXES[axis]} ({space} features); to the right: more forgetting")
            ax.set_ylabel("subject fidelity")
            ax.invert_xaxis()  # training moves right: from the base model (keeps all) to more forgetting
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"DreamBooth frontier: {', '.join(rep['subjects'])} (thin: each seed's checkpoints; thick: mean "
                 "frontier; dashed: matched level)", fontsize=9)
    fig.tight_layout()
    fig.savefig(f"{path}.tmp.png", dpi=110)
    os.replace(f"{path}.tmp.png", path)


def keep_records(output_dir: str, dest: str) -> list[str]:
    """Copy every finished run's ``result.json`` and ``settings.json`` from a benchmark folder to ``dest``, the model
    folder made relative to the repository (records are compared across machines); returns the runs copied."""
    runs, copied = os.path.join(output_dir, "runs"), []
    for name in sorted(os.listdir(runs)) if os.path.isdir(runs) else []:
        if not os.path.exists(os.path.join(runs, name, "result.json")):
            continue
        target = os.path.join(dest, "runs", name)
        os.makedirs(target, exist_ok=True)
        shutil.copyfile(os.path.join(runs, name, "result.json"), os.path.join(target, "result.json"))
        settings = json.load(open(os.path.join(runs, name, "settings.json")))
        settings["base_model"] = os.path.relpath(settings["base_model"], ROOT)
        atomic_write_json(os.path.join(target, "settings.json"), settings)
        copied.append(name)
    return copied


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arm", action="append", default=[], metavar="FAMILY[@CONFIG]=OUTPUT_DIR:RUN_ARM",
                        help="The runs <OUTPUT_DIR>/runs/<RUN_ARM>-seed<N> as (a config of) a family. Repeat.")
    parser.add_argument("--baseline", default="prior", help="The family every other is compared with.")
    parser.add_argument("--alpha", type=float, default=0.05, help="Significance level of the paired t-tests.")
    parser.add_argument("--table", default=None, help="Write the markdown table here too.")
    parser.add_argument("--output_json", default=None, help="The report (tuning, levels, per-seed values, tests).")
    parser.add_argument("--plot", default=None, help="PNG of the frontiers.")
    parser.add_argument("--pool", nargs="+", default=None, metavar="REPORT_JSON",
                        help="Pool these per-subject reports (pairs = subject x seed) instead of reading --arm runs.")
    parser.add_argument("--keep_records", nargs=2, metavar=("OUTPUT_DIR", "DEST"), default=None,
                        help="Copy a benchmark folder's per-run records to DEST, then stop.")
    args = parser.parse_args(argv)
    if args.keep_records is None and args.pool is None and not args.arm:
        parser.error("give --arm (one per family or config), --pool or --keep_records.")
    arms = {}
    for spec in args.arm:
        name, sep, where = spec.partition("=")
        folder, sep2, run_arm = where.rpartition(":")
        if not (sep and sep2 and name and run_arm) or name in arms:
            parser.error(f"--arm {spec}: expected FAMILY[@CONFIG]=OUTPUT_DIR:RUN_ARM, each name once.")
        arms[name] = (folder, run_arm)
    args.arms = arms
    return args


def main(args: argparse.Namespace) -> None:
    if args.keep_records:
        copied = keep_records(*args.keep_records)
        print(f"[dreambooth frontier] {len(copied)} run records copied to {args.keep_records[1]}")
        return
    if args.pool:
        pooled = pool({path: json.load(open(path)) for path in args.pool}, args.alpha)
        print("\n".join(f"{family} vs {pooled['baseline']}: " + "; ".join(
            f"{q} {AXES[a]} " + " / ".join(format_test(t) for t in pooled["families"][family]["tests"][q][a].values())
            + f" -> {pooled['families'][family]['verdicts'][q][a]}" for q in ("at_level", "area") for a in AXES)
            for family in pooled["families"]))
        if args.output_json:
            atomic_write_json(args.output_json, pooled)
        return
    arms = {name: load_runs(*where) for name, where in args.arms.items()}
    rep = report(arms, args.baseline, args.alpha)
    rep["sources"] = {name: f"{folder}:{run_arm}" for name, (folder, run_arm) in args.arms.items()}
    text = table(rep)
    print(text)
    if args.table:
        with open(args.table, "w") as f:
            f.write(text)
    if args.output_json:
        atomic_write_json(args.output_json, rep)
    if args.plot:
        plot(arms, rep, args.plot)


if __name__ == "__main__":
    run_cli(main, parse_args)
