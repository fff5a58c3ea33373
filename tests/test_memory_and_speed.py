"""Speed and memory options of the three scripts on tiny models: --torch_compile (train, save, load, resume
exactly), DreamBooth's --quantize_base (QLoRA through diffusers' torchao backend, which runs on the CPU), model
FLOPs counted without a real pass, and the lifetimes of the frozen parts (text encoders and VAE released once
their outputs are cached, one pipeline at a time at the end)."""

from __future__ import annotations

import gc
import os
import shutil
import weakref

import pytest
import torch
from conftest import ROOT, SCRIPT_ENV, error_line, run_script
from safetensors.torch import load_file

import model_families as mf
import training_plumbing as tp
from benchmark.tiny_models import make_circle_dataset

LORA_FILE = "pytorch_lora_weights.safetensors"
SCRIPTS = {kind: os.path.join(ROOT, f"train_{kind}_difftuning.py") for kind in ("dit", "controlnet")}
SCRIPTS["dreambooth"] = os.path.join(ROOT, "train_dreambooth_lora_difftuning.py")


@pytest.fixture(scope="module")
def circles(tmp_path_factory) -> str:
    return make_circle_dataset(str(tmp_path_factory.mktemp("circles")), n=8)


def common_args(model: str, out: str, steps: int) -> list[str]:
    return ["--pretrained_model_name_or_path", model, "--output_dir", out, "--max_train_steps", str(steps),
            "--checkpointing_steps", "1", "--seed", "3", "--report_to", "none", "--num_validation_images", "1",
            "--validation_num_inference_steps", "2"]


def dreambooth_args(model: str, data: str, out: str, steps: int = 2) -> list[str]:
    t5_length = ["--max_sequence_length", "32"] if "flux" in os.path.basename(model) else []
    return common_args(model, out, steps) + [
        "--instance_data_dir", data, "--instance_prompt", "a red square", "--resolution", "32",
        "--train_batch_size", "2", "--rank", "2", "--num_class_images", "4", "--sample_batch_size", "2",
        "--knowledge_bank_num_inference_steps", "2", "--learning_rate", "1e-3", *t5_length]


def script_args(kind: str, models: dict, data: dict, out: str) -> list[str]:
    if kind == "dreambooth":
        return dreambooth_args(models["flux"], data["subject"], out)
    if kind == "dit":
        return common_args(models["dit"], out, 2) + ["--train_data_dir", data["images"], "--train_batch_size", "4"]
    return common_args(models["sd"], out, 2) + ["--train_data_dir", data["circles"], "--resolution", "32",
                                                "--train_batch_size", "2", "--learning_rate", "1e-3"]


def saved_weights(kind: str, out: str) -> dict[str, torch.Tensor]:
    """What the run saved as its result: the DiT transformer, the ControlNet, or the LoRA."""
    path = {"dit": os.path.join(out, "transformer", "diffusion_pytorch_model.safetensors"),
            "controlnet": os.path.join(out, "diffusion_pytorch_model.safetensors"),
            "dreambooth": os.path.join(out, LORA_FILE)}[kind]
    return load_file(path)


def load_and_sample(kind: str, models: dict, data: dict, out: str) -> None:
    """The result loads as a user loads it and samples."""
    from diffusers import ControlNetModel, DiffusionPipeline, StableDiffusionControlNetPipeline
    from PIL import Image

    if kind == "dit":
        pipe = DiffusionPipeline.from_pretrained(out)
        pipe(class_labels=[0], num_inference_steps=2, generator=torch.manual_seed(0))
    elif kind == "controlnet":
        pipe = StableDiffusionControlNetPipeline.from_pretrained(
            models["sd"], controlnet=ControlNetModel.from_pretrained(out), safety_checker=None,
            requires_safety_checker=False)
        condition = Image.open(os.path.join(data["circles"], "conditioning_images", "0.png")).resize((32, 32))
        pipe("a circle", condition, num_inference_steps=2, generator=torch.manual_seed(0))
    else:
        pipe = DiffusionPipeline.from_pretrained(models["flux"])
        pipe.load_lora_weights(out)
        pipe("a red square", num_inference_steps=2, height=32, width=32, max_sequence_length=32)


STEPS = {"dit": ("train_dit_difftuning", "DiTStep", "transformer"),
         "controlnet": ("train_controlnet_difftuning", "ControlNetStep", "controlnet"),
         "dreambooth": ("train_dreambooth_lora_difftuning", "DreamBoothStep", "denoiser")}


def run_in_process(kind: str, argv: list[str], monkeypatch) -> tuple[list[float], bool]:
    """Run a script in this process; the loss of each step, and whether the step's denoiser was compiled."""
    import importlib

    module_name, step_class, denoiser = STEPS[kind]
    script = importlib.import_module(module_name)
    losses, compiled = [], []
    step = getattr(script, step_class)
    loss = step.loss

    def spy_loss(self, batch, step_rng):
        value, logs = loss(self, batch, step_rng)
        losses.append(value.item())
        compiled.append(hasattr(getattr(self, denoiser), "_orig_mod"))  # torch.compile's wrapper
        return value, logs

    with monkeypatch.context() as patch:
        patch.setattr(step, "loss", spy_loss)
        script.main(script.parse_args(argv))
    return losses, all(compiled)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dit", "controlnet", "dreambooth"])
def test_torch_compile_trains_saves_loads_and_resumes_exactly(kind, tiny_dit, tiny_sd, tiny_flux, image_folder,
                                                                circles, subject, tmp_path, monkeypatch):
    """--torch_compile (inductor, on the CPU): the compiled step computes the eager step's loss (to float
    rounding), a run resumed from its step-1 checkpoint ends bit-identical to the straight run, no saved key
    carries torch.compile's ``_orig_mod.`` prefix, and the result loads and samples. The compile makes this
    slow: about 1-2 minutes per script on two busy CPU cores with a cold inductor cache, ~20 s warm."""
    models = {"dit": tiny_dit, "sd": tiny_sd, "flux": tiny_flux}
    data = {"images": image_folder, "circles": circles, "subject": subject}
    straight, resumed, eager = (str(tmp_path / name) for name in ("straight", "resumed", "eager"))
    compiled_losses, compiled = run_in_process(kind, script_args(kind, models, data, straight) + ["--torch_compile"],
                                               monkeypatch)
    eager_losses, not_compiled = run_in_process(kind, script_args(kind, models, data, eager), monkeypatch)
    assert compiled and not not_compiled
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4) and len(compiled_losses) == 2
    os.makedirs(resumed)
    shutil.copytree(os.path.join(straight, "checkpoint-1"), os.path.join(resumed, "checkpoint-1"))
    run_script(SCRIPTS[kind], script_args(kind, models, data, resumed) + ["--torch_compile",
                                                                          "--resume_from_checkpoint", "latest"])
    a, b = saved_weights(kind, straight), saved_weights(kind, resumed)
    assert a.keys() == b.keys() == saved_weights(kind, eager).keys() and all(torch.equal(a[k], b[k]) for k in a)
    for root, _, files in os.walk(straight):
        for name in files:
            if name.endswith(".safetensors"):
                assert not any("_orig_mod" in k for k in load_file(os.path.join(root, name))), name
    load_and_sample(kind, models, data, straight)


def spy_dreambooth(monkeypatch, argv: list[str]) -> dict:
    """Run the DreamBooth script in this process and record: which of the base pipeline's modules are still alive
    at the first training step and when the final pipeline is loaded; every real denoiser pass with gradients and
    whether gradient checkpointing was on for it; the type of a quantized layer's weight; the validation images."""
    import train_dreambooth_lora_difftuning as script

    seen: dict = {"grad_passes": [], "validation_images": 0}
    load, loss, log_images = script.load_base_pipeline, script.DreamBoothStep.loss, tp.log_images

    def alive() -> list[str]:
        gc.collect()
        return sorted(name for name, ref in seen["refs"].items() if ref() is not None)

    def spy_load(args, *more, **kwargs):
        if "refs" in seen:  # the final pipeline
            seen["alive_at_final_load"] = alive()
        pipeline, family = load(args, *more, **kwargs)
        if "refs" not in seen:
            seen["refs"] = {name: weakref.ref(module) for name, module in pipeline.components.items()
                            if isinstance(module, torch.nn.Module)}
            denoiser = getattr(pipeline, family.denoiser_name)
            seen["weight_type"] = type(next(m for m in denoiser.modules() if isinstance(m, torch.nn.Linear)).weight)
            forward = type(denoiser).forward

            def spy_forward(self, *a, **kw):
                if torch.is_grad_enabled() and next(self.parameters()).device.type != "meta":
                    seen["grad_passes"].append(self.is_gradient_checkpointing)
                return forward(self, *a, **kw)

            monkeypatch.setattr(type(denoiser), "forward", spy_forward)
        return pipeline, family

    def spy_loss(self, batch, step_rng):
        seen.setdefault("alive_in_training", alive())
        return loss(self, batch, step_rng)

    def spy_log_images(accelerator, images, *a, **kw):
        seen["validation_images"] += len(images) if kw.get("tag") != "final" else 0
        return log_images(accelerator, images, *a, **kw)

    monkeypatch.setattr(script, "load_base_pipeline", spy_load)
    monkeypatch.setattr(script.DreamBoothStep, "loss", spy_loss)
    monkeypatch.setattr(tp, "log_images", spy_log_images)
    script.main(script.parse_args(argv))
    return seen


def test_frozen_parts_released_and_one_pipeline_at_a_time(tiny_sd, subject, tmp_path, monkeypatch):
    """Frozen text encoders are gone once the prompts are encoded and the VAE once the latents are cached (no
    validation needs it), as upstream frees them; no real forward pass with gradients runs before gradient
    checkpointing is on (the FLOPs are counted on a weightless copy); and the training pipeline is gone, the
    trained UNet included, before the final pipeline loads."""
    seen = spy_dreambooth(monkeypatch, dreambooth_args(tiny_sd, subject, str(tmp_path / "out")) + [
        "--gradient_checkpointing", "--cache_latents", "--center_crop", "--with_prior_preservation",
        "--class_prompt", "a circle", "--difftuning"])
    assert seen["alive_in_training"] == ["unet"]
    assert seen["grad_passes"] and all(seen["grad_passes"])
    assert seen["alive_at_final_load"] == []
    assert os.path.exists(tmp_path / "out" / LORA_FILE)


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_quantized_base_trains_saves_loads_and_resumes(kind, tiny_flux, subject, tmp_path, monkeypatch):
    """--quantize_base (torchao, on the CPU) with prior preservation, Diff-Tuning, gradient checkpointing and
    validation: the frozen transformer trains in quantized storage with its LoRA in float32; the encoders are
    released (validation samples from the pipeline's own prompt embeddings); a resumed run ends bit-identical
    to the straight one; the LoRA loads into the unquantized pipeline and changes its output."""
    from diffusers import FluxPipeline
    from torchao.utils import TorchAOBaseTensor

    args = ["--quantize_base", kind, "--gradient_checkpointing", "--with_prior_preservation", "--class_prompt",
            "a circle", "--difftuning", "--class_data_dir", str(tmp_path / "bank"), "--validation_prompt",
            "a red square", "--validation_steps", "1"]
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    seen = spy_dreambooth(monkeypatch, dreambooth_args(tiny_flux, subject, straight) + args)
    assert issubclass(seen["weight_type"], TorchAOBaseTensor)
    assert seen["alive_in_training"] == ["transformer", "vae"] and seen["validation_images"] == 2
    os.makedirs(resumed)
    shutil.copytree(os.path.join(straight, "checkpoint-1"), os.path.join(resumed, "checkpoint-1"))
    run_script(SCRIPTS["dreambooth"], dreambooth_args(tiny_flux, subject, resumed) + args +
               ["--resume_from_checkpoint", "latest"])
    a, b = load_file(os.path.join(straight, LORA_FILE)), load_file(os.path.join(resumed, LORA_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    pipe = FluxPipeline.from_pretrained(tiny_flux)
    family = mf.FluxFamily(pipe, max_sequence_length=32)
    x = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0))

    def output() -> torch.Tensor:
        with torch.no_grad():
            prompts = family.encode(family.tokenize(["a red square"]))
            return family.predict(pipe.transformer, x, torch.tensor([500.0]), prompts, None, torch.float32)

    before = output()
    pipe.load_lora_weights(straight)
    assert not torch.allclose(output(), before)


def test_quantize_base_refused_where_its_backend_cannot_run(subject, tmp_path, monkeypatch):
    """nf4 (bitsandbytes) without a CUDA GPU, or a backend that is not installed: one sentence, exit 2, before any
    model loads (the model path does not even exist) and with nothing written."""
    out = str(tmp_path / "out")
    argv = dreambooth_args(str(tmp_path / "no-model"), subject, out)
    if not torch.cuda.is_available():
        line = error_line(run_script(SCRIPTS["dreambooth"], argv + ["--quantize_base", "nf4"], ok=False))
        assert "--quantize_base nf4 needs a CUDA GPU" in line
    hidden = tmp_path / "no-torchao"  # a torchao that cannot be imported, ahead of the installed one
    (hidden / "torchao").mkdir(parents=True)
    (hidden / "torchao" / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    env = {**SCRIPT_ENV, "PYTHONPATH": f"{hidden}{os.pathsep}{ROOT}"}
    line = error_line(run_script(SCRIPTS["dreambooth"], argv + ["--quantize_base", "int8"], ok=False, env=env))
    assert line == "error: --quantize_base int8 needs torchao: `pip install torchao`."
    assert not os.path.exists(out)


def test_torch_compile_refused_beside_accelerates_dynamo_backend(tiny_dit, image_folder, tmp_path):
    """accelerate's dynamo_backend compiles the prepared model already: the two together are refused."""
    env = {**SCRIPT_ENV, "ACCELERATE_DYNAMO_BACKEND": "inductor"}
    out = str(tmp_path / "out")
    line = error_line(run_script(SCRIPTS["dit"], common_args(tiny_dit, out, 1) + [
        "--train_data_dir", image_folder, "--torch_compile"], ok=False, env=env))
    assert "--torch_compile and accelerate's dynamo_backend" in line and not os.path.exists(out)


def real_flops(fn) -> int:
    """FLOPs of a real forward + backward, attention in its math form (which the counter sees on any device)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return tp.count_flops(fn) // 2


@pytest.mark.parametrize("finetune", ["full", "lora", "difffit"])
def test_dit_flops_counted_without_a_real_pass_match_a_real_pass(tiny_dit, image_folder, tmp_path, finetune):
    from diffusers import DiTPipeline

    import train_dit_difftuning as script

    args = script.parse_args(["--train_data_dir", image_folder, "--output_dir", str(tmp_path / "out"),
                              "--finetune", finetune, "--rank", "2"])
    transformer = DiTPipeline.from_pretrained(tiny_dit).transformer
    shape = [transformer.config.in_channels] + [transformer.config.sample_size] * 2
    null = transformer.config.num_embeds_ada_norm
    counted = script.denoiser_flops_per_image(transformer, args, shape, null)
    script.configure_finetuning(transformer, args)
    x, t, y = torch.zeros(2, *shape), torch.tensor([10, 900]), torch.tensor([0, null])
    assert counted == real_flops(lambda: transformer(x, timestep=t, class_labels=y).sample.square().mean()
                                 .backward()) > 0


def test_controlnet_flops_counted_without_a_real_pass_match_a_real_pass(tiny_sd, circles, tmp_path):
    from diffusers import ControlNetModel, StableDiffusionPipeline

    import train_controlnet_difftuning as script

    args = script.parse_args(["--pretrained_model_name_or_path", tiny_sd, "--train_data_dir", circles,
                              "--output_dir", str(tmp_path / "out")])
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    unet = pipe.unet.requires_grad_(False)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(
        script.conditioning_channels_for(pipe.vae)))
    latent_size = 32 // 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    shape, context = [4, latent_size, latent_size], torch.zeros(1, 77, unet.config.cross_attention_dim)
    counted = script.denoiser_flops_per_image(controlnet, unet, args, shape, 32, context)
    x, t, cond = torch.zeros(2, *shape), torch.tensor([10, 900]), torch.zeros(2, 3, 32, 32)

    def fwd_bwd() -> None:
        down, mid = controlnet(x, t, encoder_hidden_states=context.expand(2, -1, -1), controlnet_cond=cond,
                               return_dict=False)
        unet(x, t, encoder_hidden_states=context.expand(2, -1, -1), down_block_additional_residuals=down,
             mid_block_additional_residual=mid).sample.square().mean().backward()

    assert counted == real_flops(fwd_bwd) > 0


@pytest.mark.parametrize("model", ["sd", "flux"])
def test_dreambooth_flops_counted_without_a_real_pass_match_a_real_pass(tiny_sd, tiny_flux, subject, tmp_path,
                                                                        model):
    from diffusers import DiffusionPipeline

    import train_dreambooth_lora_difftuning as script

    path = {"sd": tiny_sd, "flux": tiny_flux}[model]
    args = script.parse_args(dreambooth_args(path, subject, str(tmp_path / "out")))
    pipe = DiffusionPipeline.from_pretrained(path)
    family = mf.family_class(type(pipe).__name__)(pipe, **({"max_sequence_length": 32} if model == "flux" else {}))
    script.check_family_flags(args, type(family))
    denoiser = getattr(pipe, family.denoiser_name).requires_grad_(False)
    prompt_ids = family.tokenize(["a red square"])
    with torch.no_grad():
        table = family.encode(prompt_ids)
    shape = [pipe.vae.config.latent_channels] + [32 // 2 ** (len(pipe.vae.config.block_out_channels) - 1)] * 2
    counted = script.denoiser_flops_per_image(family, denoiser, args, prompt_ids, table, shape, 32)
    denoiser.add_adapter(tp.lora_config(args))
    x, t, rows = torch.zeros(2, *shape), torch.tensor([10, 900]), torch.zeros(2, dtype=torch.long)
    ids = mf.time_ids((32, 32), (0, 0), 32).expand(2, -1)
    assert counted == real_flops(lambda: family.predict(denoiser, x, t, table.take(rows), ids, torch.float32)
                                 .square().mean().backward()) > 0


@pytest.mark.parametrize("model", ["sd", "sd3", "flux"])
def test_sampling_from_pipeline_prompt_embeddings_equals_sampling_from_the_prompt(tiny_sd, tiny_sd3, tiny_flux,
                                                                                  model):
    """Validation after the text encoders are released samples from the embeddings the pipeline itself made
    (the prompt's and the empty negative prompt's): the same images as from the prompt."""
    from diffusers import DiffusionPipeline

    path = {"sd": tiny_sd, "sd3": tiny_sd3, "flux": tiny_flux}[model]
    absent = {"text_encoder_3": None, "tokenizer_3": None} if model == "sd3" else {}
    pipe = DiffusionPipeline.from_pretrained(path, **absent)
    family = mf.family_class(type(pipe).__name__)(pipe)
    kwargs = {"num_inference_steps": 2, "height": 32, "width": 32, "output_type": "latent", **family.call_kwargs}
    from_prompt = pipe("a red square", generator=torch.manual_seed(0), **kwargs).images
    embeds = family.pipeline_prompt_embeds("a red square", torch.device("cpu"))
    family.release_text_encoders()
    assert pipe.text_encoder is None and family.text_encoders == []
    from_embeds = pipe(**embeds, generator=torch.manual_seed(0), **kwargs).images
    assert (from_embeds - from_prompt).abs().max() < 1e-5


def test_torch_compile_refused_under_deepspeed():
    """DeepSpeed's engine gathers and frees parameters in hooks torch.compile does not trace: refused in one
    sentence before any model loads (the accelerate check runs first)."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType, DynamoBackend

    from difftuning_common import ConfigError

    state = SimpleNamespace(dynamo_plugin=SimpleNamespace(backend=DynamoBackend.NO), deepspeed_plugin=None)
    accelerator = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, state=state,
                                  gradient_accumulation_steps=1)
    args = SimpleNamespace(gradient_accumulation_steps=1, torch_compile=True)
    with pytest.raises(ConfigError, match="--torch_compile cannot wrap DeepSpeed's engine"):
        tp.check_sharding(accelerator, args)
