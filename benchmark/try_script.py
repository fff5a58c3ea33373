#!/usr/bin/env python
"""Try a training script in a minute, offline: a tiny pipeline, a tiny dataset, the real script, a few steps.

    python -m benchmark.try_script dit           # train_dit_difftuning.py on coloured shapes (3 classes)
    python -m benchmark.try_script controlnet    # train_controlnet_difftuning.py on fill50k-style circles
    python -m benchmark.try_script dreambooth    # train_dreambooth_lora_difftuning.py with prior preservation

Builds a randomly initialised tiny pipeline (benchmark/tiny_models.py, the one the tests use) and a small
dataset under ``--output_dir``, prints the command, runs the script exactly as a user would (its own progress
bar, logs, checkpoint, model card), then loads the result as diffusers does and saves one sample. The model
is tiny and barely trained, so the sample is noise: this shows the script working, not what it learns. The
same command with your model and data is a real run (README.md).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time

from benchmark import tiny_models
from benchmark.runner import ROOT, child_env
from difftuning_common import ConfigError
from training_plumbing import quiet_known_warnings, run_cli

SCRIPTS = {"dit": "train_dit_difftuning.py", "controlnet": "train_controlnet_difftuning.py",
           "dreambooth": "train_dreambooth_lora_difftuning.py"}
MARKER = ".try_script"  # marks a folder this tool made, so that a second try may replace it and nothing else


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("script", choices=list(SCRIPTS), help="Which training script to try.")
    parser.add_argument("--output_dir", default=None,
                        help="Where the tiny model, the data and the result go (default: outputs/try_<script>); "
                             "replaced if an earlier try made it.")
    parser.add_argument("--max_train_steps", type=int, default=4)
    parser.add_argument("--no-difftuning", dest="difftuning", action="store_false",
                        help="Run the script without --difftuning (upstream's behaviour).")
    args = parser.parse_args(argv)
    if args.max_train_steps < 1:
        parser.error(f"--max_train_steps must be >= 1, got {args.max_train_steps}.")
    args.output_dir = os.path.abspath(args.output_dir or os.path.join(ROOT, "outputs", f"try_{args.script}"))
    return args


def prepare_folder(path: str) -> None:
    """An empty ``path``: created, or emptied when an earlier try made it; anything else there is refused."""
    if os.path.exists(path):
        if not os.path.exists(os.path.join(path, MARKER)):
            raise ConfigError(f"--output_dir {path} exists and was not made by this tool: give another folder.")
        shutil.rmtree(path)
    os.makedirs(path)
    open(os.path.join(path, MARKER), "w").close()


def build_inputs(script: str, folder: str) -> tuple[str, str]:
    """The tiny base pipeline and the dataset of ``script`` under ``folder``: (model path, data path)."""
    if script == "dit":
        return (tiny_models.make_tiny_dit_pipeline(os.path.join(folder, "base_model")),
                tiny_models.make_image_folder(os.path.join(folder, "data")))
    model = tiny_models.make_tiny_sd_pipeline(os.path.join(folder, "base_model"))
    if script == "controlnet":
        return model, tiny_models.make_circle_dataset(os.path.join(folder, "data"))
    return model, tiny_models.make_subject_folder(os.path.join(folder, "data"))


def script_flags(script: str, model: str, data: str, out: str, steps: int, difftuning: bool) -> list[str]:
    """The script's command-line flags: upstream's, sized for a tiny model on a CPU (32 px, a few steps,
    a checkpoint at the end, a small knowledge bank, few sampling steps)."""
    common = ["--pretrained_model_name_or_path", model, "--output_dir", out, "--max_train_steps", str(steps),
              "--checkpointing_steps", str(steps), "--seed", "0", "--num_validation_images", "1",
              "--validation_num_inference_steps", "4"]
    if script == "dit":
        flags = ["--train_data_dir", data, "--train_batch_size", "6", "--knowledge_bank_size", "12",
                 "--knowledge_bank_batch_size", "6", "--knowledge_bank_num_inference_steps", "4"]
    elif script == "controlnet":
        flags = ["--train_data_dir", data, "--resolution", "32", "--train_batch_size", "4",
                 "--validation_prompt", "a red filled circle", "--validation_image",
                 os.path.join(data, "conditioning_images", "0.png"), "--validation_steps", str(steps)]
    else:
        flags = ["--instance_data_dir", data, "--instance_prompt", "a photo of sks square", "--resolution", "32",
                 "--train_batch_size", "2", "--rank", "4", "--with_prior_preservation", "--class_prompt",
                 "a photo of a square", "--class_data_dir", os.path.join(os.path.dirname(out), "class_images"),
                 "--num_class_images", "4", "--sample_batch_size", "2", "--knowledge_bank_num_inference_steps", "4"]
    return common + flags + (["--difftuning"] if difftuning else [])


LOAD_SNIPPETS = {
    "dit": ('from diffusers import DiffusionPipeline\n'
            'pipe = DiffusionPipeline.from_pretrained("{out}")\n'
            'image = pipe(class_labels=pipe.get_label_ids(["circle"])).images[0]'),
    "controlnet": ('from diffusers import ControlNetModel, StableDiffusionControlNetPipeline\n'
                   'from PIL import Image\n'
                   'controlnet = ControlNetModel.from_pretrained("{out}")\n'
                   'pipe = StableDiffusionControlNetPipeline.from_pretrained("{model}", controlnet=controlnet)\n'
                   'image = pipe("a red filled circle", Image.open("{data}/conditioning_images/0.png")).images[0]'),
    "dreambooth": ('from diffusers import DiffusionPipeline\n'
                   'pipe = DiffusionPipeline.from_pretrained("{model}")\n'
                   'pipe.load_lora_weights("{out}")\n'
                   'image = pipe("a photo of sks square").images[0]'),
}


def sample_once(script: str, model: str, data: str, out: str, path: str) -> None:
    """Load the result as LOAD_SNIPPETS says (few sampling steps) and save one image to ``path``."""
    import torch
    from diffusers import DiffusionPipeline

    quiet_known_warnings()
    generator = torch.Generator().manual_seed(0)
    if script == "dit":
        pipe = DiffusionPipeline.from_pretrained(out)
        pipe.set_progress_bar_config(disable=True)
        image = pipe(class_labels=pipe.get_label_ids(["circle"]), num_inference_steps=4, generator=generator)
    elif script == "controlnet":
        from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
        from PIL import Image

        pipe = StableDiffusionControlNetPipeline.from_pretrained(model, controlnet=ControlNetModel.from_pretrained(out))
        pipe.set_progress_bar_config(disable=True)
        condition = Image.open(os.path.join(data, "conditioning_images", "0.png")).resize((32, 32))
        image = pipe("a red filled circle", condition, num_inference_steps=4, generator=generator)
    else:
        pipe = DiffusionPipeline.from_pretrained(model)
        pipe.load_lora_weights(out)
        pipe.set_progress_bar_config(disable=True)
        image = pipe("a photo of sks square", height=32, width=32, num_inference_steps=4, generator=generator)
    image.images[0].save(path)


def main(args: argparse.Namespace) -> None:
    start = time.time()
    prepare_folder(args.output_dir)
    model, data = build_inputs(args.script, args.output_dir)
    out = os.path.join(args.output_dir, "model")
    script = SCRIPTS[args.script]
    flags = script_flags(args.script, model, data, out, args.max_train_steps, args.difftuning)
    shown = " ".join(shlex.quote(os.path.relpath(f) if os.path.isabs(f) else f) for f in flags)
    print(f"[try] A tiny random {'DiT' if args.script == 'dit' else 'Stable Diffusion'} pipeline and a small "
          f"dataset are in {os.path.relpath(args.output_dir)}. Running the real script (`accelerate launch "
          f"{script}` takes the same flags):\n\n  python {os.path.relpath(os.path.join(ROOT, script))} {shown}\n",
          flush=True)
    env = {**child_env(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    returncode = subprocess.run([sys.executable, os.path.join(ROOT, script), *flags], env=env).returncode
    if returncode != 0:
        raise SystemExit(f"error: {script} exited with status {returncode} (its output is above).")
    sample = os.path.join(args.output_dir, "sample.png")
    sample_once(args.script, model, data, out, sample)
    snippet = LOAD_SNIPPETS[args.script].format(out=os.path.relpath(out), model=os.path.relpath(model),
                                                data=os.path.relpath(data))
    print(f"\n[try] Done in {time.time() - start:.0f} s. The result is in {os.path.relpath(out)} (weights, model "
          f"card README.md, checkpoint-{args.max_train_steps}/, TensorBoard logs in logs/). Loaded as below, it "
          f"drew {os.path.relpath(sample)} (a tiny random model: expect noise). Load it:\n\n"
          + "\n".join(f"  {line}" for line in snippet.splitlines())
          + "\n\nFor a real run, give the same script your model and data (README.md).", flush=True)


if __name__ == "__main__":
    run_cli(main, parse_args)
