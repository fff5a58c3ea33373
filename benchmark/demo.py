#!/usr/bin/env python
"""The demo: the pair where Diff-Tuning did best, both arms end to end, in minutes on 2 cores.

Fine-tunes the shipped DiT pre-trained on five Fashion-MNIST classes (benchmark/fashion_b_source_model:
pullover, dress, shirt, sneaker, bag) on 10 images of each of the other five (t-shirt/top, trouser, coat,
sandal, ankle boot) twice through the real `train_dit_difftuning.py`: plain fine-tuning and `--difftuning`,
the same 2,000 steps, batch and seed. Then it samples both with the same noise and prints FID, accuracy and
copy rate in two feature spaces (CNNs of the five target classes and of all ten, shipped), writes sample grids,
and runs a short chain-of-forgetting sweep (plot). The settings are those of the decision runs, so the table
is their seed 0 at step 2,000, number for number. The Fashion-MNIST images it trains on and scores against
are shipped in the repository (benchmark/fashion_mnist_demo_data/), so it needs no download on any OS. The
decision runs (5 seeds, early stopping, a learning-rate sweep) are `benchmark/run_benchmark.py` and
`benchmark/decision.py`.

    python -m benchmark.demo                 # writes outputs/demo/
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDLE_MINUTES = 9  # measured (546 s): docs/results.md#the-demo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default=os.path.join(ROOT, "outputs", "demo"))
    parser.add_argument("--max_train_steps", type=int, default=2000)
    parser.add_argument("--num_samples", type=int, default=1000)
    return parser.parse_args(argv)


def benchmark_args(args: argparse.Namespace) -> argparse.Namespace:
    """The demo as a `benchmark.run_benchmark` invocation: the decision runs' settings, seed 0, two arms."""
    from benchmark import run_benchmark

    return run_benchmark.parse_args([
        "--miniature", "fashion_b_to_a", "--output_dir", args.output_dir, "--arms", "standard", "difftuning",
        "--seeds", "0", "--max_train_steps", str(args.max_train_steps), "--num_samples", str(args.num_samples)])


def prepare_data(bench_args: argparse.Namespace) -> str:
    """The demo's data, before any training: the 50 training images written as an image folder (returned),
    the FID reference and both feature CNNs loaded, the table's real-vs-real floor computed. Needs only the
    repository (the images are shipped); where they are not, the full Fashion-MNIST's loader says in one
    sentence what it needs."""
    from benchmark import evaluate, run_benchmark

    folder = run_benchmark.write_target_folder(bench_args)
    miniature = run_benchmark.MINIATURES[bench_args.miniature]
    for target in (miniature["target"], miniature["second"]):
        evaluate.TARGETS[target].split("reference", 0, bench_args.shots_per_class)
        evaluate.load_or_train_classifier(target=target)
    evaluate.real_vs_real(miniature["target"], bench_args.shots_per_class)  # cached for the table
    return folder


def main(args: argparse.Namespace) -> None:
    from difftuning_common import ConfigError

    source = os.path.join(ROOT, "benchmark", "fashion_b_source_model")
    if not os.path.exists(os.path.join(source, "model_index.json")):
        raise ConfigError(f"the source model {source} is missing; make it with "
                          "`python -m benchmark.pretrain_source --source fashion_b`.")

    from benchmark import run_benchmark, runner

    bench_args = benchmark_args(args)
    prepare_data(bench_args)
    print(f"[demo] Fine-tuning the shipped DiT of five Fashion-MNIST classes on 10 images of each of the other "
          f"five, twice ({args.max_train_steps} steps each, one CPU thread each, in parallel): plain fine-tuning, "
          "and Diff-Tuning, whose run first builds a 1,000-sample knowledge bank. Then both are sampled with the "
          "same noise and scored in two feature spaces, and a short chain-of-forgetting sweep runs. About "
          f"{IDLE_MINUTES} minutes on an idle 2-core machine, longer on a busy one; each run prints a line per "
          f"{runner.PROGRESS_EVERY}% of its steps. Logs and results: {args.output_dir}", flush=True)
    start = time.time()
    run_benchmark.main(bench_args)
    runs, cof_dir = os.path.join(args.output_dir, "runs"), os.path.join(args.output_dir, "chain_of_forgetting")
    print("[demo] chain of forgetting: sampling the fine-tuned model with the source model below 5 thresholds...",
          flush=True)
    subprocess.run([*runner.tool_command("chain_of_forgetting"), "--base", source,
                    "--finetuned", os.path.join(runs, "standard-seed0"), "--reference", "fashion_a",
                    "--thresholds", "0", "250", "500", "750", "1000", "--num_samples", "200",
                    "--num_inference_steps", "50", "--output_dir", cof_dir],
                   check=True, env={**runner.child_env(), "OMP_NUM_THREADS": "2"})
    print(f"\n[demo] done in {time.time() - start:.0f} s. Look at:\n"
          f"  {runs}/{{standard,difftuning}}-seed0/eval_grid.png (samples, a row per class)\n"
          f"  {cof_dir}/chain_of_forgetting.png (quality vs the swap threshold)\n"
          f"  {args.output_dir}/results.md (the table above)\n"
          "  Load a result: DiffusionPipeline.from_pretrained(<run dir>), "
          "pipe(class_labels=pipe.get_label_ids(['trouser']), guidance_scale=1.5)")


if __name__ == "__main__":
    from training_plumbing import run_cli

    run_cli(main, parse_args)
