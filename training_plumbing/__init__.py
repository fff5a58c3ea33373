"""Training plumbing shared by the three scripts (train_dit_difftuning.py, train_controlnet_difftuning.py,
train_dreambooth_lora_difftuning.py) and the benchmark: everything a diffusers example script does that is not
the method (difftuning_utils.py) and not a model family's specifics (model_families.py). The scripts import it
as ``tp``; each room has one purpose, and a room imports only rooms listed above it:

- ``flags``: the shared flags, their checks, secrets, the exit for bad input
- ``models``: loading models (errors, ZeRO-3, quantized bases, LoRA targets)
- ``distributed``: the accelerator, sharding, compile, wrapping and gathering
- ``optimization``: optimizer, training length, lr schedule
- ``data``: datasets, image checks and conversion, augmentation, order, per-step randomness
- ``latents``: VAE encode/decode, cached posteriors, the knowledge bank's set-up, the DiT sampler
- ``checkpoints``: the output lock, atomic checkpoints and final weights, exact resume
- ``throughput``: losses, img/s and MFU, the non-finite-loss stop
- ``hub``: trackers, logged images, the model card, the upload
"""

from .checkpoints import (  # noqa: F401
    CHECKPOINT_INFO,
    CHECKPOINT_PATTERN,
    IDENTITY_FLAGS,
    OPTIONAL_IDENTITY_FLAGS,
    _check_checkpoint,
    _UnreadableCheckpoint,
    checkpoint_identity,
    checkpoint_pieces,
    claims_output_dir,
    list_checkpoints,
    load_checkpoint,
    resume,
    save_checkpoint,
    save_final,
)
from .data import (  # noqa: F401
    EXIF_ORIENTATION,
    HIGH_BIT_DEPTH_SCALE,
    EpochShuffleSampler,
    SampleKey,
    StepGenerator,
    _decode_fully,
    check_images,
    convert_image,
    describe_image_conversion,
    epoch_loader,
    load_train_dataset,
    make_dataloader,
    preprocess_image,
    resize_crop_flip,
    sample_rng,
    to_model_tensor,
)
from .distributed import (  # noqa: F401
    FSDP_UNITS,
    LocalShardsState,
    cast,
    cast_io_to_weights,
    check_sharding,
    checkpoint_ema,
    compile_for_training,
    end_collectives,
    fsdp_wrap_classes,
    full_state_dict,
    is_main_process,
    mixed_precision_dtype,
    plain_copy,
    prepare_lr_scheduler,
    prepare_training,
    reshard,
    sampling_autocast,
    setup_accelerator,
    sharded_parameters,
    unwrap,
    zero_stage,
)
from .flags import (  # noqa: F401
    AT_LEAST_ONE,
    FLAG_RANGES,
    FRACTION,
    LR_SCHEDULERS,
    MODEL_FLAGS,
    NOT_NEGATIVE,
    POSITIVE,
    REPORT_TO,
    SECRET_FLAGS,
    SEED,
    Range,
    _finished_bank,
    add_common_args,
    add_lora_args,
    check_output_paths,
    check_ranges,
    display_path,
    lora_alpha,
    lora_config,
    public_flags,
    run_cli,
    str_to_bool,
    validate_common_args,
)
from .hub import (  # noqa: F401
    HUB_IGNORE_PATTERNS,
    hub_id,
    hub_repo_id,
    log_images,
    push_output_dir,
    save_model_card,
    start_trackers,
    usage_reference,
)
from .latents import (  # noqa: F401
    batch_latents,
    cache_posteriors,
    decode_latents,
    disable_per_block_label_dropout,
    encode_image_files,
    encode_latents,
    latent_shift,
    reencode_latents,
    sample_dit_latents,
    scaled_posterior,
    set_up_knowledge_bank,
)
from .models import (  # noqa: F401
    QUANTIZED_BASES,
    _DropKnownNoise,
    check_lora_targets,
    check_quantization_backend,
    load_pretrained,
    quantization_config,
    quiet_known_warnings,
    whole_weights,
)
from .optimization import (  # noqa: F401
    create_lr_scheduler,
    create_optimizer,
    resolve_training_length,
)
from .throughput import (  # noqa: F401
    PEAK_FLOPS,
    NonFiniteLoss,
    TrainingLog,
    count_flops,
    log_throughput,
    meta_copy,
    peak_flops,
)
