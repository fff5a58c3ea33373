"""Diff-Tuning: the method, and only the method, shared by the three training scripts.

Diff-Tuning (Zhong et al., NeurIPS 2024, "Diffusion Tuning: Transferring Diffusion Models via
Chain of Forgetting") fine-tunes a pre-trained diffusion model with two objectives:

* **retention**: denoise samples the pre-trained model generated itself (the *knowledge bank*),
  with timesteps drawn from xi(t), which favours small t (the transferable, low-noise end);
* **adaptation**: denoise the target data with timesteps drawn from psi(t), which favours large t
  (the domain-specific, high-noise end).

loss = mean(adaptation losses) + retention_weight * mean(retention losses)

Everything here is a small pure function or a small class with explicit state, so the scripts
stay readable and every piece is unit-tested. See docs/method.md for the equations.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any, Literal

import torch

# Re-exported: the scripts reach every helper of the method through this module (dt.ConfigError, ...).
from difftuning_common import ConfigError, atomic_write_json, derive_seed, disk_space_guard  # noqa: F401
from knowledge_bank import (  # noqa: F401  (re-exported: part of the method, reached as dt.*)
    BANK_FORMAT_VERSION,
    ENCODED_FORMAT_VERSION,
    IMAGE_EXTENSIONS,
    MANIFEST_NAME,
    REPLAY_MODES,
    BankReplay,
    EncodeFn,
    KnowledgeBank,
    ReencodeFn,
    ReplayStream,
    SampleFn,
    build_knowledge_bank,
    class_image_bank,
    image_files,
    load_knowledge_bank,
    model_fingerprint,
    replay_rows,
    replay_tensors,
    save_bank_preview,
)

ScheduleKind = Literal["adaptation", "retention"]
SamplingMode = Literal["importance", "weighting"]

# ----------------------------------------------------------------------------------------------
# Chain-of-forgetting timestep schedules
# ----------------------------------------------------------------------------------------------


def chain_of_forgetting_probs(num_train_timesteps: int, tau: float, kind: ScheduleKind) -> torch.Tensor:
    """Probability of each timestep k = 0..T-1 under psi (adaptation) or xi (retention).

    The authors' released code draws adaptation timesteps with p(k) ∝ (k+1)^tau (noisy steps
    favoured) and retention timesteps with p(k) ∝ (T-k)^tau (clean steps favoured). tau = 0 is
    uniform, i.e. plain fine-tuning; tau = 1 is linear in t. Returns a float64 tensor [T] that
    sums to 1.
    """
    if num_train_timesteps < 1:
        raise ConfigError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}.")
    if tau < 0:
        raise ConfigError(f"The schedule power tau must be >= 0, got {tau}.")
    # Divided by T before the power so large tau cannot overflow; the normalisation cancels it.
    k = torch.arange(num_train_timesteps, dtype=torch.float64)
    if kind == "adaptation":
        weights = ((k + 1) / num_train_timesteps) ** tau
    elif kind == "retention":
        weights = ((num_train_timesteps - k) / num_train_timesteps) ** tau
    else:
        raise ConfigError(f"Unknown schedule kind {kind!r}; expected 'adaptation' or 'retention'.")
    return weights / weights.sum()


class TimestepSampler:
    """Draws training timesteps for one objective, in one of two modes of equal expectation.

    * ``importance`` (the authors' choice): t ~ p(t), every sample has weight 1;
    * ``weighting``: t ~ Uniform{0..T-1}, weight = p(t) / mean(p) = T * p(t).

    For any per-timestep loss L(t), E_importance[w L] = E_weighting[w L] = sum_t p(t) L(t): the
    same objective, but importance sampling spends the compute where the weight is large and so
    has lower variance. Randomness comes only from the ``generator`` passed in, which keeps runs
    reproducible and resumable.
    """

    def __init__(self, num_train_timesteps: int, tau: float, kind: ScheduleKind,
                 mode: SamplingMode = "importance") -> None:
        if mode not in ("importance", "weighting"):
            raise ConfigError(f"Unknown timestep sampling mode {mode!r}; expected 'importance' or 'weighting'.")
        self.num_train_timesteps = num_train_timesteps
        self.mode = mode
        self.probs = chain_of_forgetting_probs(num_train_timesteps, tau, kind).float()

    def sample(self, batch_size: int, generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(timesteps [B] int64, weights [B] float32)`` on ``device``.

        Drawn on the CPU (pass a CPU generator) so results do not depend on the accelerator; the
        copy to ``device`` is non-blocking and tiny.
        """
        if self.mode == "importance":
            timesteps = torch.multinomial(self.probs, batch_size, replacement=True, generator=generator)
            weights = torch.ones(batch_size)
        else:
            timesteps = torch.randint(0, self.num_train_timesteps, (batch_size,), generator=generator)
            weights = self.probs[timesteps] * self.num_train_timesteps
        return timesteps.to(device, non_blocking=True), weights.to(device, non_blocking=True)


# ----------------------------------------------------------------------------------------------
# Flow matching (SD3, Flux): the same split over the scheduler's sigma table
# diffusers' flow-matching scripts draw u from a density (--weighting_scheme), take the entry
# floor(u * N) of the scheduler's N timesteps (sigma from 1 down to ~0, shift applied by the scheduler)
# and train at that sigma. Diff-Tuning reweights that base density toward large sigma (adaptation) or
# small sigma (retention).
# ----------------------------------------------------------------------------------------------

FLOW_WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")


def flow_base_probs(num_entries: int, weighting_scheme: str, logit_mean: float = 0.0, logit_std: float = 1.0,
                    mode_scale: float = 1.29, points_per_entry: int = 1024) -> torch.Tensor:
    """Probability of each entry of an N-entry timestep table under diffusers'
    ``compute_density_for_timestep_sampling``: u = Q(q) for uniform q, entry floor(u * N).

    Q is the scheme's quantile function: logit-normal, sigmoid(m + s * Phi^-1(q)); "mode", SD3's
    1 - q - scale * (cos^2(pi q / 2) - 1 + q); every other scheme draws u uniformly (it weights the
    loss instead, see :func:`flow_loss_weights`). Evaluated on N * ``points_per_entry`` evenly spaced
    quantiles (uniform schemes: exact).
    Returns a float64 tensor [N] that sums to 1.
    """
    if weighting_scheme not in FLOW_WEIGHTING_SCHEMES:
        raise ConfigError(f"--weighting_scheme must be one of {', '.join(FLOW_WEIGHTING_SCHEMES)}, "
                          f"got {weighting_scheme!r}.")
    grid = num_entries * points_per_entry
    q = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    if weighting_scheme == "logit_normal":
        u = torch.sigmoid(logit_mean + logit_std * math.sqrt(2) * torch.erfinv(2 * q - 1))
    elif weighting_scheme == "mode":
        u = 1 - q - mode_scale * (torch.cos(math.pi * q / 2) ** 2 - 1 + q)
    else:
        u = q
    entries = (u * num_entries).long().clamp(0, num_entries - 1)
    return torch.bincount(entries, minlength=num_entries).double() / grid


def check_flow_density(weighting_scheme: str, logit_mean: float, logit_std: float, mode_scale: float,
                       num_entries: int = 1000) -> None:
    """Refuse a timestep density that has collapsed onto one entry of the sigma table (e.g. --logit_mean 1e6 puts
    every draw at sigma = 1, where the loss is 0 and nothing trains): checked on a table of ``num_entries`` (the
    schedulers' 1000) before any model loads."""
    probs = flow_base_probs(num_entries, weighting_scheme, logit_mean, logit_std, mode_scale, points_per_entry=64)
    top = float(probs.max())
    if top > 0.5:
        where = int(probs.argmax())
        raise ConfigError(f"--logit_mean {logit_mean} with --logit_std {logit_std} (--weighting_scheme "
                          f"{weighting_scheme}) puts {top:.0%} of the training timesteps on one sigma (u = "
                          f"{(where + 0.5) / num_entries:.3f}), which trains nothing else; keep the density spread "
                          "(SD3's default is a mean of 0 and a std of 1).")


def flow_chain_of_forgetting_probs(sigmas: torch.Tensor, base: torch.Tensor, tau: float,
                                   kind: ScheduleKind) -> torch.Tensor:
    """Probability of each table entry under psi (adaptation) or xi (retention) over sigma:

        psi(i) ∝ base(i) * sigma_i^tau,    xi(i) ∝ base(i) * (1 - sigma_i + 1/N)^tau.

    ``sigmas`` [N] is the scheduler's table (``scheduler.sigmas[:N]``, shift included), ``base`` its
    density (:func:`flow_base_probs`). tau = 0 gives the base density (upstream's training). On a linear
    table sigma_i = (N - i) / N with a uniform base these are the DDPM schedules of
    :func:`chain_of_forgetting_probs` exactly (timestep k = N - 1 - i). Float64 [N], sums to 1.
    """
    if tau < 0:
        raise ConfigError(f"The schedule power tau must be >= 0, got {tau}.")
    sigmas = sigmas.double()
    if kind == "adaptation":
        weights = sigmas.clamp(min=0) ** tau
    elif kind == "retention":
        weights = (1 - sigmas + 1 / len(sigmas)).clamp(min=0) ** tau
    else:
        raise ConfigError(f"Unknown schedule kind {kind!r}; expected 'adaptation' or 'retention'.")
    probs = base.double() * weights
    if not probs.sum() > 0:
        raise ConfigError("The timestep density is zero everywhere: check --weighting_scheme and its parameters.")
    return probs / probs.sum()


class FlowTimestepSampler:
    """Draws table entries for one objective of a flow-matching model, like :class:`TimestepSampler`:
    ``importance`` draws from psi/xi (weight 1); ``weighting`` draws from the base density and weights
    each sample by p(i) / base(i), the same expectation. ``tau`` = 0 is upstream's draw."""

    def __init__(self, sigmas: torch.Tensor, base: torch.Tensor, tau: float, kind: ScheduleKind,
                 mode: SamplingMode = "importance") -> None:
        if mode not in ("importance", "weighting"):
            raise ConfigError(f"Unknown timestep sampling mode {mode!r}; expected 'importance' or 'weighting'.")
        self.mode = mode
        self.base = base.float()
        self.probs = flow_chain_of_forgetting_probs(sigmas, base, tau, kind).float()
        self.ratio = torch.where(self.base > 0, self.probs / self.base.clamp(min=1e-30), torch.zeros(()))

    def sample(self, batch_size: int, generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(entries [B] int64, weights [B] float32)`` on ``device``; drawn on the CPU from ``generator``."""
        probs = self.probs if self.mode == "importance" else self.base
        entries = torch.multinomial(probs, batch_size, replacement=True, generator=generator)
        weights = torch.ones(batch_size) if self.mode == "importance" else self.ratio[entries]
        return entries.to(device, non_blocking=True), weights.to(device, non_blocking=True)


def flow_loss_weights(weighting_scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """diffusers' ``compute_loss_weighting_for_sd3``: sigma^-2 (sigma_sqrt), 2 / (pi (1 - 2 sigma + 2 sigma^2))
    (cosmap), else 1."""
    if weighting_scheme == "sigma_sqrt":
        return (sigmas ** -2.0).float()
    if weighting_scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas ** 2))
    return torch.ones_like(sigmas)


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------


def _mean_over_non_batch(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=list(range(1, x.ndim)))


def _gather(values: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] reshaped to broadcast over ``like`` ([B, 1, 1, ...]), float32 on like's device."""
    out = values.to(device=timesteps.device)[timesteps].float()
    return out.view(-1, *([1] * (like.ndim - 1)))


def prediction_target(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor,
                      timesteps: torch.Tensor) -> torch.Tensor:
    """What the model should predict, following the scheduler's ``prediction_type``."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if prediction_type == "sample":
        return latents
    raise ConfigError(f"Unknown prediction_type {prediction_type!r} in the noise scheduler's config.")


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    # The tanh approximation used by improved DDPM (and DiT), kept for parity with their losses.
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def _discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor,
                                         log_scales: torch.Tensor) -> torch.Tensor:
    """log p(x) of data in [-1, 1] quantised to 256 bins under N(means, exp(log_scales)^2)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


class LearnedSigmaVB:
    """Variational-bound term of improved DDPM for models that predict their variance (DiT).

    DiT outputs 2C channels: a mean prediction and ``v`` in [-1, 1] that interpolates the
    log-variance between the posterior variance (beta-tilde) and beta:
    log Σ = (v+1)/2 · log β_t + (1-(v+1)/2) · log β̃_t. The term is KL(q(x_{t-1}|x_t,x_0) ||
    p(x_{t-1}|x_t)) in bits per dimension for t > 0 and the discretised Gaussian NLL of x_0 at
    t = 0. As in DiT, the mean prediction is detached here, so this term trains only the
    variance and the MSE alone trains the mean. Coefficients are built in float64 from a
    diffusers scheduler's ``betas``/``alphas_cumprod``.
    """

    def __init__(self, scheduler: Any) -> None:
        betas = scheduler.betas.double()
        alphas_cumprod = scheduler.alphas_cumprod.double()
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        self.prediction_type: str = scheduler.config.prediction_type
        self.alphas_cumprod = alphas_cumprod
        self.log_betas = torch.log(betas)
        # beta-tilde_0 is 0: clip it to beta-tilde_1, as improved DDPM does.
        self.posterior_log_variance = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - alphas_cumprod_prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod)

    def _predicted_x0(self, model_pred: torch.Tensor, noisy_latents: torch.Tensor,
                      timesteps: torch.Tensor) -> torch.Tensor:
        acp = _gather(self.alphas_cumprod, timesteps, noisy_latents)
        if self.prediction_type == "epsilon":
            return (noisy_latents - (1.0 - acp).sqrt() * model_pred) / acp.sqrt()
        if self.prediction_type == "v_prediction":
            return acp.sqrt() * noisy_latents - (1.0 - acp).sqrt() * model_pred
        if self.prediction_type == "sample":
            return model_pred
        raise ConfigError(f"Unknown prediction_type {self.prediction_type!r} in the noise scheduler's config.")

    def posterior_mean(self, x0: torch.Tensor, noisy_latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Mean of q(x_{t-1} | x_t, x_0)."""
        return (_gather(self.posterior_mean_coef1, timesteps, x0) * x0
                + _gather(self.posterior_mean_coef2, timesteps, x0) * noisy_latents)

    def __call__(self, model_pred: torch.Tensor, model_var_values: torch.Tensor, latents: torch.Tensor,
                 noisy_latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Per-sample VB in bits/dim, shape [B]. All inputs [B, C, H, W]; ``timesteps`` [B]."""
        model_pred, latents, noisy_latents = (x.float() for x in (model_pred.detach(), latents, noisy_latents))
        min_log = _gather(self.posterior_log_variance, timesteps, latents)
        max_log = _gather(self.log_betas, timesteps, latents)
        frac = (model_var_values.float() + 1.0) / 2.0
        model_log_variance = frac * max_log + (1.0 - frac) * min_log
        model_mean = self.posterior_mean(self._predicted_x0(model_pred, noisy_latents, timesteps),
                                         noisy_latents, timesteps)
        true_mean = self.posterior_mean(latents, noisy_latents, timesteps)
        kl = 0.5 * (-1.0 + model_log_variance - min_log + torch.exp(min_log - model_log_variance)
                    + (true_mean - model_mean) ** 2 * torch.exp(-model_log_variance))
        kl = _mean_over_non_batch(kl) / math.log(2.0)
        decoder_nll = -_discretized_gaussian_log_likelihood(latents, model_mean, 0.5 * model_log_variance)
        decoder_nll = _mean_over_non_batch(decoder_nll) / math.log(2.0)
        return torch.where(timesteps == 0, decoder_nll, kl)


def per_sample_denoising_loss(model_output: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor,
                              noisy_latents: torch.Tensor, timesteps: torch.Tensor, scheduler: Any,
                              vb: LearnedSigmaVB | None = None, target: torch.Tensor | None = None) -> torch.Tensor:
    """Denoising loss of each sample, shape [B], computed in float32.

    MSE between the prediction and ``target``, by default the scheduler's (epsilon, v or x0; a
    distillation target replaces some rows, as ControlNet's ``distill`` retention does). If the model
    predicts its variance (output has 2C channels for C latent channels, like DiT), the output
    is split into mean and variance halves, the MSE uses the mean half, and ``vb`` (when given)
    adds the learned-sigma variational bound, exactly as DiT trains.
    """
    channels = latents.shape[1]
    model_var_values = None
    if model_output.shape[1] == 2 * channels:
        model_output, model_var_values = model_output.split(channels, dim=1)
    elif vb is not None:
        raise ConfigError("A learned-sigma VB term was requested but the model predicts no variance "
                         f"({model_output.shape[1]} output channels for {channels} latent channels).")
    if target is None:
        target = prediction_target(scheduler, latents, noise, timesteps)
    loss = _mean_over_non_batch((model_output.float() - target.float()) ** 2)
    if vb is not None:
        loss = loss + vb(model_output, model_var_values, latents, noisy_latents, timesteps)
    return loss


def difftuning_loss(per_sample_loss: torch.Tensor, num_target: int, retention_weight: float,
                    sample_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Combine adaptation and retention losses: mean(target) + retention_weight * mean(bank).

    ``per_sample_loss`` [B] holds the target samples first (``num_target`` of them), then the
    knowledge-bank samples. ``sample_weights`` [B] are the timestep weights of the
    ``weighting`` mode (ones, or None, in ``importance`` mode). Returns the loss and detached
    parts for logging (no host sync here: the caller decides when to read them).
    """
    if not 0 < num_target <= per_sample_loss.shape[0]:
        raise ConfigError(f"num_target must be in 1..{per_sample_loss.shape[0]}, got {num_target}.")
    if sample_weights is not None:
        per_sample_loss = per_sample_loss * sample_weights
    target_loss = per_sample_loss[:num_target].mean()
    logs = {"loss_adaptation": target_loss.detach()}
    loss = target_loss
    if num_target < per_sample_loss.shape[0]:
        retention_loss = per_sample_loss[num_target:].mean()
        loss = loss + retention_weight * retention_loss
        logs["loss_retention"] = retention_loss.detach()
    logs["loss"] = loss.detach()
    return loss, logs


def min_snr_weights(scheduler: Any, timesteps: torch.Tensor, snr_gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights [B] (Hang et al. 2023, diffusers' ``--snr_gamma``) as diffusers'
    train_dreambooth_lora_sdxl.py computes them: min(SNR(t), gamma) / SNR(t) for epsilon prediction, plus 1 for
    v-prediction (the velocity objective floored at an SNR weight of one). With Diff-Tuning they multiply the
    timestep density: the expected loss is sum_t psi(t) w_snr(t) L(t)."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps).float()
    weights = torch.minimum(snr, torch.full_like(snr, snr_gamma)) / snr
    return weights + 1 if scheduler.config.prediction_type == "v_prediction" else weights


def split_batch_size(train_batch_size: int, retention_ratio: float) -> tuple[int, int]:
    """Split a per-device batch into (target, bank) sample counts.

    The authors take ``int(0.2 * 32) = 6`` bank samples out of a batch of 32, so the compute per
    step equals plain fine-tuning at the same batch size. We round instead of truncating and keep
    at least one bank sample whenever the ratio is positive.
    """
    if retention_ratio <= 0:
        return train_batch_size, 0
    num_bank = max(1, round(train_batch_size * retention_ratio))
    return train_batch_size - num_bank, num_bank


# ----------------------------------------------------------------------------------------------
# Command-line flags, identical in every script
# ----------------------------------------------------------------------------------------------


def add_difftuning_args(parser: argparse.ArgumentParser, class_prior: bool = False) -> argparse._ArgumentGroup:
    """Add the Diff-Tuning flag group. Defaults follow the authors' released code.

    ``class_prior`` (the DreamBooth script): the bank is prior preservation's class samples, so upstream's
    --with_prior_preservation, --prior_loss_weight, --class_data_dir, --num_class_images and
    --sample_batch_size take the places of --retention_ratio, --retention_weight, --knowledge_bank_dir,
    --knowledge_bank_size and --knowledge_bank_batch_size, which are then left out."""
    group = parser.add_argument_group("Diff-Tuning")
    group.add_argument("--difftuning", action="store_true",
                       help="Train with Diff-Tuning (psi/xi timestep sampling and knowledge-bank replay) "
                            "instead of plain fine-tuning.")
    group.add_argument("--difftuning_tau", type=float, default=1.0,
                       help="Power tau of the adaptation schedule psi: p(t) ∝ (t+1)^tau. 0 = uniform. "
                            "Default 1 (authors' --prob-scale).")
    group.add_argument("--retention_tau", type=float, default=None,
                       help="Power of the retention schedule xi: p(t) ∝ (T-t)^tau. Default: same as "
                            "--difftuning_tau (as in the authors' code).")
    group.add_argument("--timestep_sampling", choices=["importance", "weighting"], default="importance",
                       help="'importance': draw t from the schedule (authors' choice, lower variance); "
                            "'weighting': uniform t, loss weighted by the schedule (same expectation).")
    if not class_prior:
        group.add_argument("--retention_ratio", type=float, default=0.2,
                           help="Fraction of each batch taken from the knowledge bank. Default 0.2 "
                                "(authors' LWF_ratio).")
        group.add_argument("--retention_weight", type=float, default=0.1,
                           help="Weight of the retention loss. Default 0.1 (authors' LWF_weight).")
        group.add_argument("--knowledge_bank_dir", type=str, default=None,
                           help="Folder of the knowledge bank; built there on first use if missing or incomplete. "
                                "Default: <output_dir>/knowledge_bank.")
        group.add_argument("--knowledge_bank_size", type=int, default=1000,
                           help="Number of samples the pre-trained model generates for the bank (the authors did not "
                                "publish theirs).")
    group.add_argument("--knowledge_bank_num_inference_steps", type=int, default=None,
                       help="Sampling steps for the bank. Default: the script's sampler default "
                            "(DiT: 250 DDPM steps as in DiT's sample.py; Stable Diffusion: 50).")
    group.add_argument("--knowledge_bank_guidance_scale", type=float, default=None,
                       help="Classifier-free guidance for the bank. Default: DiT 1.5 (DiT's FID setting); "
                            "Stable Diffusion 7.5.")
    group.add_argument("--knowledge_bank_seed", type=int, default=None,
                       help="Seed of the class images generated into --class_data_dir (images already there are used "
                            "as they are). Default: --seed." if class_prior else
                            "Seed of the bank's samples (and of which classes or captions they show), part of its "
                            "identity. Default: --seed. Give one fixed value to let runs with different --seed "
                            "share one bank instead of each building its own.")
    if not class_prior:
        group.add_argument("--knowledge_bank_batch_size", type=int, default=16,
                           help="Samples generated per sampler call (and per bank shard).")
    if class_prior:  # the class images are images: replayed as their encodings, there are no sampler latents
        return group
    group.add_argument("--knowledge_bank_replay", choices=REPLAY_MODES, default="images",
                       help="'images' (the authors' recipe): replay each bank sample as its 8-bit image would be, "
                            "re-encoded with a fresh VAE posterior sample each step (and a random flip with "
                            "--random_flip); the re-encoding is done once, when the bank is built, so a step has no "
                            "extra VAE pass. 'latents': the sampler's raw output latents, which the model never saw "
                            "in pre-training (also reads banks written before re-encoding).")
    return group


def validate_difftuning_args(args: argparse.Namespace, bank_num_inference_steps: int | None = None,
                             bank_guidance_scale: float | None = None) -> None:
    """Fail fast, naming the flag, on Diff-Tuning settings that cannot work; fill the defaults
    that depend on the script (its sampler's steps and guidance) or on ``--output_dir``."""
    if args.retention_tau is None:
        args.retention_tau = args.difftuning_tau
    if getattr(args, "knowledge_bank_dir", "") is None and getattr(args, "output_dir", None):
        args.knowledge_bank_dir = os.path.join(args.output_dir, "knowledge_bank")
    if args.knowledge_bank_seed is None:
        args.knowledge_bank_seed = getattr(args, "seed", 0)  # a parser without --seed (tests, tools)
    if args.knowledge_bank_num_inference_steps is None:
        args.knowledge_bank_num_inference_steps = bank_num_inference_steps
    if args.knowledge_bank_guidance_scale is None:
        args.knowledge_bank_guidance_scale = bank_guidance_scale
    for flag in ("difftuning_tau", "retention_tau", "retention_weight"):
        if getattr(args, flag, 0) < 0:
            raise ConfigError(f"--{flag} must be >= 0, got {getattr(args, flag)}.")
    steps = args.knowledge_bank_num_inference_steps
    if steps is not None and steps < 1:
        raise ConfigError(f"--knowledge_bank_num_inference_steps must be >= 1, got {steps}.")
    if not hasattr(args, "retention_ratio"):  # the DreamBooth script checks upstream's prior-preservation flags
        return
    if not 0 <= args.retention_ratio < 1:
        raise ConfigError(f"--retention_ratio must be in [0, 1), got {args.retention_ratio}.")
    for flag in ("knowledge_bank_size", "knowledge_bank_batch_size"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag} must be >= 1, got {getattr(args, flag)}.")
    if args.difftuning and args.retention_ratio > 0:
        if split_batch_size(args.train_batch_size, args.retention_ratio)[0] < 1:
            raise ConfigError(f"--retention_ratio {args.retention_ratio} leaves no target sample in "
                             f"--train_batch_size {args.train_batch_size}; raise the batch size.")
