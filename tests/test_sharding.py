"""Sharding (docs/sharding.md): the accelerate configs in configs/accelerate/, the scripts' checks and helpers for
FSDP and DeepSpeed, and 2-process runs of the three scripts under each config on CPU (gloo).

accelerate turns FSDP and DeepSpeed on only for GPUs, so the runs go through tests/sharding_on_cpu.py, which makes
accelerate select them on CPU processes; everything after that choice is the GPU code path. The FSDP runs need
nothing else; the DeepSpeed runs need the deepspeed package (not a requirement of this repository) and are skipped
without it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from conftest import ROOT, run_script
from safetensors.torch import load_file

import training_plumbing as tp
from benchmark.tiny_models import (
    make_circle_dataset,
    make_image_folder,
    make_subject_folder,
    make_tiny_dit_pipeline,
    make_tiny_flux_pipeline,
    make_tiny_sd3_pipeline,
    make_tiny_sd_pipeline,
)
from difftuning_common import ConfigError

CONFIGS = os.path.join(ROOT, "configs", "accelerate")
ON_CPU = os.path.join(ROOT, "tests", "sharding_on_cpu.py")
DIT, DREAMBOOTH, CONTROLNET = (os.path.join(ROOT, name) for name in (
    "train_dit_difftuning.py", "train_dreambooth_lora_difftuning.py", "train_controlnet_difftuning.py"))


def launcher(config: str, on_cpu: bool = True) -> list[str]:
    """`accelerate launch --config_file configs/accelerate/<config>.yaml --num_processes 2` (through the CPU
    launcher unless ``on_cpu`` is False)."""
    config_file = os.path.join(CONFIGS, f"{config}.yaml")
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_file, "--num_processes", "2",
            "--main_process_port", "0"] + ([ON_CPU] if on_cpu else [])


# ---- The configs, as accelerate reads them ----------------------------------------------------


def launch_env(config: str) -> dict[str, str]:
    """The environment `accelerate launch --config_file <config> --num_processes 2` gives the processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", os.path.join(CONFIGS, f"{config}.yaml"),
                                               "--num_processes", "2", "script.py"])
    args, defaults, mixed_precision_from_config = _validate_launch_command(args)
    if not args.use_deepspeed:
        return prepare_multi_gpu_env(args)
    fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mixed_precision_from_config else [])
    args.deepspeed_fields_from_accelerate_config = ",".join(fields)  # as `accelerate launch` does
    return prepare_deepspeed_cmd_env(args)[1]


@pytest.mark.parametrize("config, kind", [("fsdp", "FSDP"), ("deepspeed_zero2", "DEEPSPEED"),
                                          ("deepspeed_zero3", "DEEPSPEED")])
def test_config_files_load(config, kind):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    cfg = load_config_from_file(os.path.join(CONFIGS, f"{config}.yaml"))
    assert isinstance(cfg, ClusterConfig) and cfg.distributed_type.value == kind
    assert cfg.mixed_precision == "bf16" and cfg.num_machines == 1 and not cfg.use_cpu
    assert cfg.num_processes == -1  # none in the file: `accelerate launch` asks for --num_processes N
    if kind == "FSDP":
        assert cfg.fsdp_config["fsdp_version"] == 2
        assert cfg.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert "fsdp_transformer_layer_cls_to_wrap" not in cfg.fsdp_config  # the scripts name the units
        assert cfg.fsdp_config["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    else:
        assert cfg.deepspeed_config["zero_stage"] == int(config[-1])
        assert not {"gradient_accumulation_steps", "gradient_clipping"} & set(cfg.deepspeed_config)  # the flags'
        assert cfg.deepspeed_config["zero3_init_flag"] is False
        assert cfg.deepspeed_config.get("zero3_save_16bit_model", False) == (config == "deepspeed_zero3")


def test_fsdp_config_as_the_processes_see_it():
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    env = launch_env("fsdp")
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    with mock.patch.dict(os.environ, env):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.auto_wrap_policy is transformer_auto_wrap_policy
    assert plugin.transformer_cls_names_to_wrap is None and plugin.reshard_after_forward is True
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_configs_as_the_processes_see_them(stage):
    from accelerate.utils import DeepSpeedPlugin

    env = launch_env(f"deepspeed_zero{stage}")
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" not in env
    with mock.patch.dict(os.environ, env):
        ds = DeepSpeedPlugin().deepspeed_config
    assert ds["zero_optimization"]["stage"] == stage
    # "auto": filled from the loader, --gradient_accumulation_steps and --max_grad_norm
    assert {ds[k] for k in ("gradient_accumulation_steps", "gradient_clipping", "train_micro_batch_size_per_gpu")} == {
        "auto"}
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] == (stage == 3)
    assert "optimizer" not in ds and "scheduler" not in ds


# ---- Checks and helpers, with stand-ins for the accelerator -------------------------------------


def fake_accelerator(kind: str = "MULTI_GPU", ds: dict | None = None, fsdp_version: int = 2, gas: int = 1,
                     **more) -> SimpleNamespace:
    """An object with the attributes the sharding helpers read from an Accelerator."""
    from accelerate.utils import DistributedType

    state = SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=ds),
                            fsdp_plugin=SimpleNamespace(fsdp_version=fsdp_version))
    return SimpleNamespace(distributed_type=DistributedType(kind), state=state, gradient_accumulation_steps=gas,
                           num_processes=2, process_index=0, **more)


def flags(**overrides) -> SimpleNamespace:
    return SimpleNamespace(**{"gradient_accumulation_steps": 1, "max_grad_norm": 1.0, "use_ema": False, **overrides})


def zero(stage: int, **entries) -> dict:
    return {"zero_optimization": {"stage": stage, "stage3_gather_16bit_weights_on_model_save": True},
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", **entries}


def test_deepspeed_clipping_follows_max_grad_norm():
    """DeepSpeed clips inside its own step: its "auto" clipping becomes --max_grad_norm (0: off)."""
    for norm in (1.0, 0.0):
        ds = zero(2)
        tp.check_sharding(fake_accelerator("DEEPSPEED", ds), flags(max_grad_norm=norm))
        assert ds["gradient_clipping"] == norm


@pytest.mark.parametrize("kind, ds, args, words", [
    ("DEEPSPEED", zero(2, gradient_clipping=1.0), {"max_grad_norm": 0.0},
     "sets gradient_clipping 1.0 but --max_grad_norm is 0.0"),
    ("DEEPSPEED", zero(2, gradient_accumulation_steps=4), {},
     "sets gradient_accumulation_steps 4 but --gradient_accumulation_steps is 1"),
    ("DEEPSPEED", zero(2, optimizer={"type": "AdamW"}), {}, "defines its own optimizer; these scripts build theirs"),
    ("DEEPSPEED", zero(2, scheduler={"type": "WarmupLR"}), {}, "defines its own scheduler"),
    ("DEEPSPEED", zero(3), {"use_ema": True}, "--use_ema cannot be used with DeepSpeed ZeRO-3"),
    ("DEEPSPEED", {**zero(3), "zero_optimization": {"stage": 3}}, {}, "needs zero3_save_16bit_model: true"),
    ("FSDP", None, {}, "uses FSDP1 (fsdp_version: 1)"),
])
def test_configs_the_scripts_cannot_honour_are_refused(kind, ds, args, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        tp.check_sharding(fake_accelerator(kind, ds, fsdp_version=1), flags(**args))


def test_config_gradient_accumulation_must_match_the_flag():
    with pytest.raises(ConfigError, match="sets gradient_accumulation_steps 4 but --gradient_accumulation_steps is 1"):
        tp.check_sharding(fake_accelerator(gas=4), flags())


def test_deepspeed_batch_sizes_in_the_config_must_match_the_loader():
    loader = SimpleNamespace(batch_size=3)
    for entries, words in (({"train_micro_batch_size_per_gpu": 4}, "train_micro_batch_size_per_gpu 4 but each"),
                           ({"train_batch_size": 8}, r"train_batch_size 8 but the run's is 6 \(3 per process")):
        accelerator = fake_accelerator("DEEPSPEED", zero(2, **entries), prepare=None)  # refused before prepare
        with pytest.raises(ConfigError, match=words):
            tp.prepare_training(accelerator, [], torch.nn.Linear(1, 1), None, loader)


def test_deepspeed_lr_scheduler_is_wrapped_and_saved():
    """Prepared on its own under DeepSpeed, accelerate would return the scheduler as is (stepped every micro-batch,
    never checkpointed): it is wrapped like everywhere else and registered for the checkpoints."""
    from accelerate.scheduler import AcceleratedScheduler

    registered = []
    accelerator = fake_accelerator("DEEPSPEED", zero(2), register_for_checkpointing=registered.append,
                                   step_scheduler_with_optimizer=True, split_batches=False)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    wrapped = tp.prepare_lr_scheduler(accelerator, scheduler)
    assert isinstance(wrapped, AcceleratedScheduler) and wrapped.scheduler is scheduler and registered == [wrapped]


def test_checkpoint_pieces_by_distributed_type():
    assert tp.checkpoint_pieces(fake_accelerator("MULTI_GPU")) == [("optimizer.bin",), ("scheduler.bin",)]
    assert ("optimizer_0", "optimizer_0.bin") in tp.checkpoint_pieces(fake_accelerator("FSDP"))
    assert tp.checkpoint_pieces(fake_accelerator("DEEPSPEED", zero(2))) == [("pytorch_model",)]


def test_deepspeed_half_precision_model_takes_float32_inputs_and_returns_float32():
    model = torch.nn.Linear(3, 2).to(torch.bfloat16)
    tp.cast_io_to_weights(model, torch.bfloat16)
    out = model(torch.randn(4, 3))
    assert out.dtype == torch.float32


def test_fsdp_units_of_each_model_family(tmp_path):
    """One unit per repeated block: diffusers' _no_split_modules where it declares them (SD3, Flux, the UNet,
    restricted to classes the model has), DiT's attention and MLP layers, ControlNet's blocks."""
    from diffusers import ControlNetModel, DiffusionPipeline

    dit = DiffusionPipeline.from_pretrained(make_tiny_dit_pipeline(str(tmp_path / "dit"))).transformer
    assert tp.fsdp_wrap_classes(dit) == ["Attention", "FeedForward"]
    sd3 = DiffusionPipeline.from_pretrained(make_tiny_sd3_pipeline(str(tmp_path / "sd3")), text_encoder_3=None,
                                            tokenizer_3=None).transformer
    assert tp.fsdp_wrap_classes(sd3) == ["JointTransformerBlock"]
    flux = DiffusionPipeline.from_pretrained(make_tiny_flux_pipeline(str(tmp_path / "flux"))).transformer
    assert tp.fsdp_wrap_classes(flux) == ["FluxTransformerBlock", "FluxSingleTransformerBlock"]
    unet = DiffusionPipeline.from_pretrained(make_tiny_sd_pipeline(str(tmp_path / "sd"))).unet
    present = {type(m).__name__ for m in unet.modules()}
    assert tp.fsdp_wrap_classes(unet) == [c for c in unet._no_split_modules if c in present]
    assert "BasicTransformerBlock" in tp.fsdp_wrap_classes(unet)
    assert tp.fsdp_wrap_classes(ControlNetModel.from_unet(unet)) == ["BasicTransformerBlock", "ResnetBlock2D"]


# ---- 2-process runs on CPU ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("sharding")
    return SimpleNamespace(dit=make_tiny_dit_pipeline(str(root / "dit")), sd3=make_tiny_sd3_pipeline(str(root / "sd3")),
                           sd=make_tiny_sd_pipeline(str(root / "sd")),
                           shapes=make_image_folder(str(root / "shapes")),
                           subject=make_subject_folder(str(root / "subject")),
                           circles=make_circle_dataset(str(root / "circles")))


def script_args(script: str, models: SimpleNamespace, out: str) -> list[str]:
    """4 steps, a checkpoint at 2, a knowledge bank, validation at 2 and 4 (sampling a sharded model)."""
    common = ["--output_dir", out, "--max_train_steps", "4", "--checkpointing_steps", "2", "--validation_steps", "2",
              "--report_to", "none", "--num_validation_images", "1", "--ddp_timeout", "120", "--difftuning"]
    if script == DIT:
        return common + ["--pretrained_model_name_or_path", models.dit, "--train_data_dir", models.shapes,
                         "--train_batch_size", "3", "--seed", "3", "--knowledge_bank_size", "6",
                         "--knowledge_bank_batch_size", "3", "--knowledge_bank_num_inference_steps", "3",
                         "--validation_num_inference_steps", "3", "--validation_class_labels", "circle",
                         "--gradient_accumulation_steps", "2", "--lr_scheduler", "cosine", "--lr_warmup_steps", "1"]
    if script == DREAMBOOTH:
        return common + ["--pretrained_model_name_or_path", models.sd3, "--instance_data_dir", models.subject,
                         "--instance_prompt", "sks", "--resolution", "32", "--train_batch_size", "1", "--seed", "1",
                         "--rank", "2", "--with_prior_preservation", "--class_prompt", "a circle",
                         "--num_class_images", "4", "--sample_batch_size", "2", "--knowledge_bank_num_inference_steps",
                         "2", "--validation_prompt", "sks", "--validation_num_inference_steps", "2"]
    return common + ["--pretrained_model_name_or_path", models.sd, "--train_data_dir", models.circles, "--resolution",
                     "32", "--train_batch_size", "3", "--seed", "3", "--knowledge_bank_size", "6",
                     "--knowledge_bank_batch_size", "3", "--knowledge_bank_num_inference_steps", "2",
                     "--retention", "replay", "--controlnet_lora", "--rank", "2", "--learning_rate", "1e-3",
                     "--validation_prompt", "a red circle", "--validation_image",
                     os.path.join(models.circles, "conditioning_images", "1.png"), "--validation_num_inference_steps",
                     "2"]


# The trained weights each script saves, and their copy in checkpoint-2.
OUTPUTS = {DIT: ("transformer/diffusion_pytorch_model.safetensors", None),
           DREAMBOOTH: ("pytorch_lora_weights.safetensors", "checkpoint-2/pytorch_lora_weights.safetensors"),
           CONTROLNET: ("diffusion_pytorch_model.safetensors",
                        "checkpoint-2/controlnet/diffusion_pytorch_model.safetensors")}


def straight_and_resumed(config: str, script: str, models: SimpleNamespace, tmp_path, extra: list[str] = ()
                         ) -> tuple[str, str, str]:
    """A 4-step run with a checkpoint at step 2, and a run resumed from that checkpoint; returns both output
    folders and the straight run's stderr."""
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    proc = run_script(script, script_args(script, models, straight) + list(extra), launcher=launcher(config))
    os.makedirs(resumed)
    shutil.copytree(os.path.join(straight, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    run_script(script, script_args(script, models, resumed) + list(extra) + ["--resume_from_checkpoint", "latest"],
               launcher=launcher(config))
    return straight, resumed, proc.stderr


def assert_resumed_exactly(script: str, straight: str, resumed: str, base: str | None = None) -> None:
    """The resumed run saved bit-identical weights, and training changed them (since the base or checkpoint-2)."""
    final, halfway = OUTPUTS[script]
    a, b = load_file(os.path.join(straight, final)), load_file(os.path.join(resumed, final))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    before = load_file(os.path.join(straight, halfway) if halfway else base)
    assert a.keys() == before.keys() and not all(torch.equal(a[k], before[k]) for k in a)


def refusal(proc) -> str:
    """The one-sentence error of a launched run (torchrun reports the processes' exit status 2 as its own 1)."""
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert lines, proc.stderr[-3000:]
    return lines[-1]


def test_fsdp_refused_where_accelerate_cannot_turn_it_on(models, tmp_path):
    """Without the CPU launcher accelerate sets up plain multi-CPU data parallelism under the FSDP config: refused
    in one sentence instead of training unsharded."""
    line = refusal(run_script(DIT, script_args(DIT, models, str(tmp_path / "out")),
                              launcher=launcher("fsdp", on_cpu=False), ok=False))
    assert line.startswith("error: The accelerate config asks for FSDP, but accelerate") and "set up MULTI_CPU" in line
    assert not os.path.exists(tmp_path / "out")


def test_dit_under_fsdp(models, tmp_path):
    """FSDP2 on 2 CPU processes: the knowledge bank (built once, loaded by both), EMA of the shards, validation that
    samples the sharded model, gradient accumulation, sharded checkpoints and an exact resume, a plain pipeline."""
    from diffusers import DiffusionPipeline

    straight, resumed, log = straight_and_resumed("fsdp", DIT, models, tmp_path, ["--use_ema"])
    assert "Distributed environment: DistributedType.FSDP" in log and "Num processes: 2" in log
    assert "FSDP shards DiTTransformer2DModel by Attention, FeedForward" in log
    checkpoint = os.listdir(os.path.join(straight, "checkpoint-2"))
    assert {"pytorch_model_fsdp_0", "optimizer_0", "process_0.pt", "process_1.pt"} <= set(checkpoint)
    assert json.load(open(os.path.join(straight, "knowledge_bank", "manifest.json")))["count"] == 6
    assert_resumed_exactly(DIT, straight, resumed, os.path.join(models.dit, OUTPUTS[DIT][0]))
    pipe = DiffusionPipeline.from_pretrained(straight)
    assert pipe(class_labels=pipe.get_label_ids(["circle"]), num_inference_steps=2).images[0].size == (32, 32)


def test_dreambooth_sd3_lora_under_fsdp(models, tmp_path):
    """LoRA on the frozen (bf16) SD3 transformer, sharded by JointTransformerBlock, with gradient checkpointing:
    prior preservation from the bank, checkpoints whose LoRA file is gathered from the shards, an exact resume, a
    LoRA that loads."""
    from diffusers import DiffusionPipeline

    straight, resumed, log = straight_and_resumed("fsdp", DREAMBOOTH, models, tmp_path, ["--gradient_checkpointing"])
    assert "FSDP shards SD3Transformer2DModel by JointTransformerBlock" in log
    assert_resumed_exactly(DREAMBOOTH, straight, resumed)
    pipe = DiffusionPipeline.from_pretrained(models.sd3, text_encoder_3=None, tokenizer_3=None)
    pipe.load_lora_weights(straight)
    assert any("lora" in name for name, _ in pipe.transformer.named_parameters())


def test_controlnet_lora_under_fsdp(models, tmp_path):
    """ControlNet with LoRA, sharded by BasicTransformerBlock and ResnetBlock2D: checkpoint-N/controlnet and the
    final model are merged plain ControlNets built from the gathered weights, and the resume is exact."""
    straight, resumed, log = straight_and_resumed("fsdp", CONTROLNET, models, tmp_path)
    assert "FSDP shards ControlNetModel by BasicTransformerBlock, ResnetBlock2D" in log
    assert_resumed_exactly(CONTROLNET, straight, resumed)
    assert os.path.exists(os.path.join(straight, "controlnet_lora", "pytorch_lora_weights.safetensors"))


@pytest.mark.parametrize("config, script, extra", [
    ("deepspeed_zero2", DIT, ["--use_ema"]),
    ("deepspeed_zero3", DIT, []),
    ("deepspeed_zero3", DREAMBOOTH, []),
    ("deepspeed_zero3", CONTROLNET, []),
], ids=["zero2-dit-ema", "zero3-dit", "zero3-dreambooth-sd3", "zero3-controlnet-lora"])
def test_under_deepspeed(models, tmp_path, config, script, extra):
    """DeepSpeed on CPU (its CPU accelerator, gloo): the same runs, exact resumes (needs `pip install deepspeed`)."""
    pytest.importorskip("deepspeed")
    straight, resumed, log = straight_and_resumed(config, script, models, tmp_path, extra)
    assert "Distributed environment: DistributedType.DEEPSPEED" in log
    assert os.path.isdir(os.path.join(straight, "checkpoint-2", "pytorch_model"))
    base = os.path.join(models.dit, OUTPUTS[DIT][0]) if script == DIT else None
    assert_resumed_exactly(script, straight, resumed, base)


def test_zero3_refuses_ema(models, tmp_path):
    pytest.importorskip("deepspeed")
    line = refusal(run_script(DIT, script_args(DIT, models, str(tmp_path / "out")) + ["--use_ema"],
                              launcher=launcher("deepspeed_zero3"), ok=False))
    assert line.startswith("error: --use_ema cannot be used with DeepSpeed ZeRO-3")


def test_dreambooth_refuses_text_encoder_training_when_sharded(models, tmp_path):
    line = refusal(run_script(DREAMBOOTH, script_args(DREAMBOOTH, models, str(tmp_path / "o")) + [
        "--train_text_encoder"], launcher=launcher("fsdp"), ok=False))
    assert "--train_text_encoder trains several models, and accelerate's FSDP prepares one" in line
