#!/usr/bin/env python
"""Quick end-to-end demo on a CPU, no Hub: standard fine-tuning vs Diff-Tuning through the real script.

Builds a tiny DiT pipeline and a small image folder offline, runs ``train_dit_difftuning.py``
twice (plain fine-tuning, then ``--difftuning``), reloads each result with
``DiffusionPipeline.from_pretrained`` and generates by class name. It shows the workflow, not
quality: the tiny model is randomly initialised.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmark"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default=os.path.join(ROOT, "outputs", "demo"))
    parser.add_argument("--max_train_steps", type=int, default=30)
    args = parser.parse_args()

    import torch
    from diffusers import DiffusionPipeline
    from diffusers.utils import make_image_grid
    from tiny_models import make_image_folder, make_tiny_dit_pipeline

    model = make_tiny_dit_pipeline(os.path.join(args.output_dir, "base-model"))
    data = make_image_folder(os.path.join(args.output_dir, "data"), per_class=8)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    for name, extra in (("standard", []), ("difftuning", ["--difftuning", "--knowledge_bank_size", "32",
                                                          "--knowledge_bank_num_inference_steps", "25"])):
        out = os.path.join(args.output_dir, name)
        start = time.time()
        subprocess.run([sys.executable, os.path.join(ROOT, "train_dit_difftuning.py"),
                        "--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir", out,
                        "--train_batch_size", "8", "--max_train_steps", str(args.max_train_steps), "--seed", "0",
                        "--random_flip", "--report_to", "tensorboard", "--checkpointing_steps", "1000",
                        "--validation_num_inference_steps", "10", "--num_validation_images", "2", *extra],
                       check=True, env=env)
        pipe = DiffusionPipeline.from_pretrained(out)
        images = pipe(class_labels=pipe.get_label_ids(["circle", "square", "cross"]), guidance_scale=4.0,
                      num_inference_steps=25, generator=torch.manual_seed(0)).images
        make_image_grid(images, rows=1, cols=3).save(os.path.join(out, "demo_grid.png"))
        print(f"[demo] {name}: trained {args.max_train_steps} steps in {time.time() - start:.0f} s -> {out} "
              f"(DiffusionPipeline.from_pretrained works; samples in {out}/demo_grid.png)")


if __name__ == "__main__":
    main()
