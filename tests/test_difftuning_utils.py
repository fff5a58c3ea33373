"""Unit tests of difftuning_utils: the method, and only the method. Offline, CPU, tiny tensors."""

from __future__ import annotations

import argparse
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image

import difftuning_utils as du

# ----------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["adaptation", "retention"])
@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0, 1.5])
@pytest.mark.parametrize("T", [1, 4, 37, 1000])
def test_probs_sum_to_one_and_are_monotone(kind, tau, T):
    p = du.chain_of_forgetting_probs(T, tau, kind)
    assert p.shape == (T,) and p.dtype == torch.float64
    assert torch.all(p > 0)
    assert p.sum().item() == pytest.approx(1.0, abs=1e-12)
    diffs = p[1:] - p[:-1]
    if tau == 0:
        torch.testing.assert_close(p, torch.full((T,), 1.0 / T, dtype=torch.float64))
    elif kind == "adaptation":  # psi favours noisy (large t) steps
        assert torch.all(diffs > 0)
    else:  # xi favours clean (small t) steps
        assert torch.all(diffs < 0)


def test_probs_exact_values_linear():
    psi = du.chain_of_forgetting_probs(4, 1.0, "adaptation")
    xi = du.chain_of_forgetting_probs(4, 1.0, "retention")
    torch.testing.assert_close(psi, torch.tensor([1, 2, 3, 4], dtype=torch.float64) / 10)
    torch.testing.assert_close(xi, torch.tensor([4, 3, 2, 1], dtype=torch.float64) / 10)
    # tau = 2: (k+1)^2 / sum = [1, 4, 9, 16] / 30
    torch.testing.assert_close(du.chain_of_forgetting_probs(4, 2.0, "adaptation"),
                               torch.tensor([1, 4, 9, 16], dtype=torch.float64) / 30)


@pytest.mark.parametrize("T,tau,kind", [(10, -0.1, "adaptation"), (10, 1.0, "forgetting"), (0, 1.0, "adaptation")])
def test_probs_bad_inputs_raise(T, tau, kind):
    with pytest.raises(ValueError):
        du.chain_of_forgetting_probs(T, tau, kind)


# ----------------------------------------------------------------------------------------------
# Timestep sampler
# ----------------------------------------------------------------------------------------------

N_DRAWS = 200_000
# Binomial standard error of a frequency p from 200k draws is at most sqrt(0.25 / 2e5) = 0.0011,
# so 0.005 is > 4 standard errors: no false alarms, yet a wrong schedule (e.g. psi and xi swapped,
# off by one in k) is off by 0.02 or more for T = 10, tau = 1.
HIST_TOL = 0.005


@pytest.mark.parametrize("kind", ["adaptation", "retention"])
def test_importance_histogram_matches_probs(kind):
    T = 10
    sampler = du.TimestepSampler(T, 1.0, kind, mode="importance")
    t, w = sampler.sample(N_DRAWS, generator=torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() <= T - 1
    hist = torch.bincount(t, minlength=T).double() / N_DRAWS
    expected = du.chain_of_forgetting_probs(T, 1.0, kind)
    assert (hist - expected).abs().max().item() < HIST_TOL
    assert torch.all(w == 1)


@pytest.mark.parametrize("kind", ["adaptation", "retention"])
def test_weighting_mode_uniform_t_and_weights(kind):
    T = 10
    sampler = du.TimestepSampler(T, 1.0, kind, mode="weighting")
    t, w = sampler.sample(N_DRAWS, generator=torch.Generator().manual_seed(0))
    hist = torch.bincount(t, minlength=T).double() / N_DRAWS
    assert (hist - 1.0 / T).abs().max().item() < HIST_TOL
    probs = du.chain_of_forgetting_probs(T, 1.0, kind)
    torch.testing.assert_close(w, (T * probs[t]).float())
    assert w.mean().item() == pytest.approx(1.0, abs=0.01)  # weights average to 1 under uniform t


@pytest.mark.parametrize("kind", ["adaptation", "retention"])
def test_modes_have_equal_expectation(kind):
    T = 10
    t_all = torch.arange(T, dtype=torch.float64)
    loss_fn = lambda t: torch.sin(t) + t**2 / T  # noqa: E731
    exact = (du.chain_of_forgetting_probs(T, 1.0, kind) * loss_fn(t_all)).sum().item()
    estimates = {}
    for mode in ("importance", "weighting"):
        t, w = du.TimestepSampler(T, 1.0, kind, mode=mode).sample(N_DRAWS, torch.Generator().manual_seed(1))
        values = w.double() * loss_fn(t.double())
        estimates[mode] = values.mean().item()
        # Standard error here is ~0.01 for either mode; 0.05 is about 5 standard errors.
        std_err = values.std().item() / math.sqrt(N_DRAWS)
        assert std_err < 0.012
        assert estimates[mode] == pytest.approx(exact, abs=0.05)
    assert estimates["importance"] == pytest.approx(estimates["weighting"], abs=0.07)
    # The uniform (tau = 0) expectation is far enough away that a mode ignoring the schedule fails.
    uniform = loss_fn(t_all).mean().item()
    assert abs(uniform - exact) > 0.5


@pytest.mark.parametrize("mode", ["importance", "weighting"])
def test_tau_zero_is_uniform_with_unit_weights(mode):
    T = 10
    t, w = du.TimestepSampler(T, 0.0, "adaptation", mode=mode).sample(N_DRAWS, torch.Generator().manual_seed(0))
    hist = torch.bincount(t, minlength=T).double() / N_DRAWS
    assert (hist - 1.0 / T).abs().max().item() < HIST_TOL
    torch.testing.assert_close(w, torch.ones(N_DRAWS))


@pytest.mark.parametrize("T", [1000, 37])
@pytest.mark.parametrize("mode", ["importance", "weighting"])
def test_sampler_any_scheduler_size(T, mode):
    n = 100_000
    t, w = du.TimestepSampler(T, 1.0, "adaptation", mode=mode).sample(n, torch.Generator().manual_seed(0))
    assert t.shape == (n,) and w.shape == (n,)
    assert t.min().item() >= 0 and t.max().item() == T - 1
    k = torch.arange(T, dtype=torch.float64)
    p = du.chain_of_forgetting_probs(T, 1.0, "adaptation")
    expected_mean_t = (p * k).sum().item()  # ~ 2T/3 for tau = 1
    estimate = (w.double() * t.double()).mean().item()
    # std of w*t is < T, so the standard error is < T / sqrt(1e5) = 0.0032 T; allow 0.015 T.
    assert estimate == pytest.approx(expected_mean_t, abs=0.015 * T)
    if mode == "weighting":
        torch.testing.assert_close(w, (T * p[t]).float())


def test_sampler_reproducible_and_device_dtype():
    sampler = du.TimestepSampler(1000, 1.0, "retention")
    t1, w1 = sampler.sample(64, torch.Generator().manual_seed(123))
    t2, w2 = sampler.sample(64, torch.Generator().manual_seed(123))
    t3, _ = sampler.sample(64, torch.Generator().manual_seed(124))
    assert torch.equal(t1, t2) and torch.equal(w1, w2)
    assert not torch.equal(t1, t3)
    for mode in ("importance", "weighting"):
        t, w = du.TimestepSampler(50, 1.0, "adaptation", mode).sample(8, torch.Generator().manual_seed(0))
        assert t.dtype == torch.int64 and w.dtype == torch.float32  # indices for add_noise, weights for the loss
        assert t.shape == w.shape == (8,)


def test_sampler_bad_mode_raises():
    with pytest.raises(ValueError):
        du.TimestepSampler(10, 1.0, "adaptation", mode="stratified")


# ----------------------------------------------------------------------------------------------
# Loss combination and batch split
# ----------------------------------------------------------------------------------------------


def test_difftuning_loss_hand_numbers():
    per_sample = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0], requires_grad=True)
    loss, logs = du.difftuning_loss(per_sample, num_target=3, retention_weight=0.1)
    assert loss.item() == pytest.approx(2.0 + 0.1 * 15.0)
    assert set(logs) == {"loss", "loss_adaptation", "loss_retention"}
    assert logs["loss_adaptation"].item() == pytest.approx(2.0)
    assert logs["loss_retention"].item() == pytest.approx(15.0)
    assert logs["loss"].item() == pytest.approx(3.5)
    assert all(not v.requires_grad for v in logs.values())
    loss.backward()
    torch.testing.assert_close(per_sample.grad, torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.05, 0.05]))


def test_difftuning_loss_no_bank_and_weights():
    loss, logs = du.difftuning_loss(torch.tensor([1.0, 2.0, 3.0]), num_target=3, retention_weight=0.1)
    assert loss.item() == pytest.approx(2.0)
    assert set(logs) == {"loss", "loss_adaptation"}
    weights = torch.tensor([2.0, 1.0, 0.0, 0.5, 1.0])
    loss, logs = du.difftuning_loss(torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0]), 3, 0.1, sample_weights=weights)
    # target: (2 + 2 + 0) / 3; bank: (5 + 20) / 2
    assert logs["loss_adaptation"].item() == pytest.approx(4 / 3)
    assert logs["loss_retention"].item() == pytest.approx(12.5)
    assert loss.item() == pytest.approx(4 / 3 + 1.25)


@pytest.mark.parametrize("num_target", [0, -1, 6])
def test_difftuning_loss_bad_num_target(num_target):
    with pytest.raises(ValueError, match="num_target"):
        du.difftuning_loss(torch.ones(5), num_target=num_target, retention_weight=0.1)


@pytest.mark.parametrize("batch,ratio,expected", [(32, 0.2, (26, 6)), (4, 0.2, (3, 1)), (8, 0.0, (8, 0)),
                                                  (1, 0.0, (1, 0)), (64, 0.2, (51, 13)), (10, 0.5, (5, 5))])
def test_split_batch_size(batch, ratio, expected):
    assert du.split_batch_size(batch, ratio) == expected


# ----------------------------------------------------------------------------------------------
# Prediction target and learned-sigma VB
# ----------------------------------------------------------------------------------------------

T_SMALL = 50


def _scheduler(prediction_type="epsilon"):
    return DDPMScheduler(num_train_timesteps=T_SMALL, variance_type="learned_range", prediction_type=prediction_type)


def _case(seed=0, b=4, c=3, h=4, w=4):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(b, c, h, w, generator=g)
    noise = torch.randn(b, c, h, w, generator=g)
    timesteps = torch.tensor([0, 7, 31, T_SMALL - 1])[:b]
    return latents, noise, timesteps, g


def test_prediction_target_types():
    latents, noise, timesteps, _ = _case()
    assert torch.equal(du.prediction_target(_scheduler("epsilon"), latents, noise, timesteps), noise)
    assert torch.equal(du.prediction_target(_scheduler("sample"), latents, noise, timesteps), latents)
    sched = _scheduler("v_prediction")
    v = du.prediction_target(sched, latents, noise, timesteps)
    torch.testing.assert_close(v, sched.get_velocity(latents, noise, timesteps))
    acp = sched.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    torch.testing.assert_close(v, acp.sqrt() * noise - (1 - acp).sqrt() * latents)
    with pytest.raises(ValueError, match="prediction_type"):
        du.prediction_target(SimpleNamespace(config=SimpleNamespace(prediction_type="flow")), latents, noise,
                             timesteps)


def _reference_vb(sched, eps_pred, var_values, latents, noisy, timesteps):
    """Textbook DDPM posterior + improved-DDPM learned range, exact normal CDF, float64."""
    betas = sched.betas.double()
    acp = sched.alphas_cumprod.double()
    out = []
    for i, t in enumerate(timesteps.tolist()):
        x0, xt, eps, v = (a[i].double() for a in (latents, noisy, eps_pred, var_values))
        abar, beta = acp[t], betas[t]
        abar_prev = acp[t - 1] if t > 0 else torch.tensor(1.0, dtype=torch.float64)

        def post_mean(x_start, abar=abar, beta=beta, abar_prev=abar_prev, xt=xt):
            return (abar_prev.sqrt() * beta / (1 - abar) * x_start
                    + (1 - beta).sqrt() * (1 - abar_prev) / (1 - abar) * xt)

        x0_hat = (xt - (1 - abar).sqrt() * eps) / abar.sqrt()
        model_mean = post_mean(x0_hat)
        # beta-tilde_t; for t = 0 it is 0, and improved DDPM uses beta-tilde_1 in the log instead.
        t_clip = max(t, 1)
        beta_tilde = betas[t_clip] * (1 - acp[t_clip - 1]) / (1 - acp[t_clip])
        frac = (v + 1) / 2
        model_log_var = frac * beta.log() + (1 - frac) * beta_tilde.log()
        model_std = (0.5 * model_log_var).exp()
        if t > 0:
            kl = torch.distributions.kl_divergence(torch.distributions.Normal(post_mean(x0), beta_tilde.sqrt()),
                                                   torch.distributions.Normal(model_mean, model_std))
            out.append(kl.mean() / math.log(2))
        else:
            normal = torch.distributions.Normal(model_mean, model_std)
            cdf_plus, cdf_min = normal.cdf(x0 + 1 / 255), normal.cdf(x0 - 1 / 255)
            log_p = torch.where(x0 < -0.999, cdf_plus.clamp(min=1e-12).log(),
                                torch.where(x0 > 0.999, (1 - cdf_min).clamp(min=1e-12).log(),
                                            (cdf_plus - cdf_min).clamp(min=1e-12).log()))
            out.append(-log_p.mean() / math.log(2))
    return torch.stack(out)


def test_learned_sigma_vb_matches_independent_computation():
    sched = _scheduler()
    latents, noise, timesteps, g = _case(b=4)
    noisy = sched.add_noise(latents, noise, timesteps)
    eps_pred = noise + 0.3 * torch.randn(noise.shape, generator=g)
    var_values = torch.rand(noise.shape, generator=g) * 2 - 1
    got = du.LearnedSigmaVB(sched)(eps_pred, var_values, latents, noisy, timesteps)
    want = _reference_vb(sched, eps_pred, var_values, latents, noisy, timesteps)
    assert got.shape == (4,) and got.dtype == torch.float32
    # Posterior mean given the predicted x0, by DDPM's other form (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t);
    # at t = 0 the posterior mean is x0 itself. (At t = 0, 1 - abar_0 = beta_0 = 1e-4 is only known to ~3e-4
    # relative from the scheduler's float32 alphas_cumprod, so that step is checked on its own, to 1e-3.)
    vb = du.LearnedSigmaVB(sched)
    x0_hat = vb._predicted_x0(eps_pred, noisy, timesteps)
    beta, acp = (a[timesteps].double().view(-1, 1, 1, 1) for a in (sched.betas, sched.alphas_cumprod))
    ddpm_mean = (noisy.double() - beta / (1 - acp).sqrt() * eps_pred.double()) / (1 - beta).sqrt()
    torch.testing.assert_close(vb.posterior_mean(x0_hat, noisy, timesteps)[1:].double(), ddpm_mean[1:],
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(vb.posterior_mean(latents, noisy, timesteps)[0], latents[0], rtol=1e-3, atol=1e-6)
    # t > 0: the KL is exact; only float32 vs float64 rounding differs.
    torch.testing.assert_close(got[1:].double(), want[1:], rtol=1e-4, atol=1e-6)
    # t = 0: the code uses improved DDPM's tanh approximation of the normal CDF (max abs error
    # 2e-4 in the CDF). On this case it moves the mean NLL by 2.5e-4 relative (measured); allow
    # 2e-3, which a wrong variance, mean or bin edge would exceed by far.
    assert want[0].item() > 1.0
    assert got[0].item() == pytest.approx(want[0].item(), rel=2e-3)


def test_learned_sigma_vb_gradient_only_through_variance():
    sched = _scheduler()
    latents, noise, timesteps, g = _case()
    noisy = sched.add_noise(latents, noise, timesteps)
    model_output = torch.randn(4, 6, 4, 4, generator=g).mul(0.5).requires_grad_()
    model_pred, var_values = model_output.split(3, dim=1)
    du.LearnedSigmaVB(sched)(model_pred, var_values, latents, noisy, timesteps).sum().backward()
    assert torch.all(model_output.grad[:, :3] == 0)
    assert model_output.grad[:, 3:].abs().sum(dim=(1, 2, 3)).min() > 0  # every sample, t = 0 included


def test_learned_sigma_vb_nonnegative_and_zero_for_perfect_model():
    for prediction_type in ("epsilon", "v_prediction", "sample"):
        sched = _scheduler(prediction_type)
        vb = du.LearnedSigmaVB(sched)
        latents, noise, _, g = _case(seed=3, b=8)
        timesteps = torch.tensor([1, 2, 5, 10, 20, 30, 40, 49])
        noisy = sched.add_noise(latents, noise, timesteps)
        target = du.prediction_target(sched, latents, noise, timesteps)
        wrong = vb(target + torch.randn(target.shape, generator=g), torch.rand(target.shape, generator=g) * 2 - 1,
                   latents, noisy, timesteps)
        assert torch.all(wrong >= 0) and torch.all(wrong > 1e-3)
        # v = -1 puts the log variance at the posterior's; the true target gives the true mean.
        perfect = vb(target, -torch.ones_like(target), latents, noisy, timesteps)
        assert perfect.abs().max().item() < 1e-5, prediction_type
        # v = +1 (variance beta_t) is a valid but worse variance: KL > 0.
        assert torch.all(vb(target, torch.ones_like(target), latents, noisy, timesteps) > 0)


# ----------------------------------------------------------------------------------------------
# Per-sample denoising loss
# ----------------------------------------------------------------------------------------------


def test_per_sample_loss_learned_sigma_adds_vb():
    sched = _scheduler()
    latents, noise, timesteps, g = _case()
    noisy = sched.add_noise(latents, noise, timesteps)
    model_output = torch.randn(4, 6, 4, 4, generator=g)
    vb = du.LearnedSigmaVB(sched)
    got = du.per_sample_denoising_loss(model_output, latents, noise, noisy, timesteps, sched, vb=vb)
    mean_half, var_half = model_output[:, :3], model_output[:, 3:]
    mse = ((mean_half - noise) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(got, mse + vb(mean_half, var_half, latents, noisy, timesteps))
    assert torch.all(got > mse)
    # Without a VB term, the variance half is ignored and the MSE uses the mean half only.
    torch.testing.assert_close(du.per_sample_denoising_loss(model_output, latents, noise, noisy, timesteps, sched),
                               mse)


def test_per_sample_loss_vb_without_variance_channels_raises():
    sched = _scheduler()
    latents, noise, timesteps, _ = _case()
    with pytest.raises(ValueError, match="predicts no variance"):
        du.per_sample_denoising_loss(noise.clone(), latents, noise, latents, timesteps, sched,
                                     vb=du.LearnedSigmaVB(sched))


def test_per_sample_loss_mse_only_and_v_prediction():
    latents, noise, timesteps, g = _case()
    model_output = torch.randn(latents.shape, generator=g).to(torch.bfloat16)
    sched = _scheduler()
    noisy = sched.add_noise(latents, noise, timesteps)
    got = du.per_sample_denoising_loss(model_output, latents, noise, noisy, timesteps, sched)
    assert got.shape == (4,) and got.dtype == torch.float32
    torch.testing.assert_close(got, ((model_output.float() - noise) ** 2).mean(dim=(1, 2, 3)))
    sched_v = _scheduler("v_prediction")
    got_v = du.per_sample_denoising_loss(model_output, latents, noise, noisy, timesteps, sched_v)
    velocity = sched_v.get_velocity(latents, noise, timesteps)
    torch.testing.assert_close(got_v, ((model_output.float() - velocity) ** 2).mean(dim=(1, 2, 3)))
    assert not torch.allclose(got_v, got)


# ----------------------------------------------------------------------------------------------
# Knowledge bank
# ----------------------------------------------------------------------------------------------

SETTINGS = {"base_model": "tiny/dit", "revision": None, "fingerprint": "f" * 64, "scheduler": "DDPMScheduler",
            "num_inference_steps": 2, "guidance_scale": 1.5}
CLASSES = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]  # 10 conditions, batch 3 -> 4 shards (the last one short)
PROMPTS = ["a dog", "a cat", "x" * 20, "", "eine Straßenbahn"]  # unsorted within each shard of 2


def class_sample_fn(conditions, generator):
    return torch.randn(len(conditions), 4, 2, 2, generator=generator) + torch.tensor(conditions)[:, None, None, None]


def prompt_sample_fn(prompts, generator):
    lengths = torch.tensor([float(len(p)) for p in prompts])
    return torch.randn(len(prompts), 4, 2, 2, generator=generator) + lengths[:, None, None, None]


def _expected_latents(sample_fn, conditions, batch_size, seed):
    shards = []
    for i in range(math.ceil(len(conditions) / batch_size)):
        generator = torch.Generator().manual_seed(du.derive_seed(seed, "bank", i))
        shards.append(sample_fn(conditions[i * batch_size:(i + 1) * batch_size], generator))
    return torch.cat(shards)


def test_bank_round_trip_classes(tmp_path):
    manifest = du.build_knowledge_bank(str(tmp_path), class_sample_fn, CLASSES, 3, 7, SETTINGS)
    assert manifest["format_version"] == du.BANK_FORMAT_VERSION
    assert manifest["complete"] is True
    assert manifest["settings"] == {**SETTINGS, "seed": 7, "size": 10, "batch_size": 3}
    assert manifest["count"] == 10 and manifest["latent_shape"] == [4, 2, 2] and manifest["dtype"] == "torch.float32"
    assert [s["file"] for s in manifest["shards"]] == [f"shard-{i:05d}.safetensors" for i in range(4)]
    assert all(len(s["sha256"]) == 64 for s in manifest["shards"])
    with open(tmp_path / du.MANIFEST_NAME) as f:
        assert json.load(f) == manifest
    bank = du.load_knowledge_bank(str(tmp_path), fingerprint="f" * 64, latent_shape=(4, 2, 2))
    assert len(bank) == 10 and bank.latents.shape == (10, 4, 2, 2) and bank.latents.dtype == torch.float32
    assert bank.conditions == CLASSES
    assert torch.equal(bank.latents, _expected_latents(class_sample_fn, CLASSES, 3, 7))
    # Calling build again on a complete bank does no work, touches nothing and returns the same manifest.
    stat = os.stat(tmp_path / du.MANIFEST_NAME)
    assert du.build_knowledge_bank(str(tmp_path), _raising_sample_fn, CLASSES, 3, 7, SETTINGS) == manifest
    after = os.stat(tmp_path / du.MANIFEST_NAME)
    assert (after.st_ino, after.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)


def _raising_sample_fn(conditions, generator):
    raise AssertionError("a complete bank must not be sampled again")


def test_bank_round_trip_prompts(tmp_path):
    du.build_knowledge_bank(str(tmp_path), prompt_sample_fn, PROMPTS, 2, 0, SETTINGS)
    bank = du.load_knowledge_bank(str(tmp_path))
    assert bank.conditions == PROMPTS
    assert torch.equal(bank.latents, _expected_latents(prompt_sample_fn, PROMPTS, 2, 0))


def test_bank_interrupted_build_resumes(tmp_path):
    calls = []

    def failing(conditions, generator):
        calls.append(list(conditions))
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return class_sample_fn(conditions, generator)

    bank_dir = tmp_path / "bank"
    with pytest.raises(RuntimeError, match="out of memory"):
        du.build_knowledge_bank(str(bank_dir), failing, CLASSES, 3, 7, SETTINGS)
    files = sorted(os.listdir(bank_dir))
    assert files == [".lock", du.MANIFEST_NAME, "shard-00000.safetensors", "shard-00001.safetensors"]
    assert not any(".tmp" in name for name in files)
    with open(bank_dir / du.MANIFEST_NAME) as f:
        assert json.load(f)["complete"] is False
    with pytest.raises(ValueError, match="incomplete"):
        du.load_knowledge_bank(str(bank_dir))

    resumed_calls = []

    def counting(conditions, generator):
        resumed_calls.append(list(conditions))
        return class_sample_fn(conditions, generator)

    resumed = du.build_knowledge_bank(str(bank_dir), counting, CLASSES, 3, 7, SETTINGS)
    assert resumed_calls == [CLASSES[6:9], CLASSES[9:]]
    fresh = du.build_knowledge_bank(str(tmp_path / "fresh"), class_sample_fn, CLASSES, 3, 7, SETTINGS)
    assert resumed == fresh  # same settings, shard files byte for byte (sha256)
    fresh_latents = du.load_knowledge_bank(str(tmp_path / "fresh")).latents
    assert torch.equal(du.load_knowledge_bank(str(bank_dir)).latents, fresh_latents)


@pytest.mark.parametrize("change", [{"seed": 8}, {"batch_size": 2},
                                    {"settings": {**SETTINGS, "fingerprint": "0" * 64}}])
def test_bank_rebuild_with_other_settings_refused(tmp_path, change):
    du.build_knowledge_bank(str(tmp_path), class_sample_fn, CLASSES, 3, 7, SETTINGS)
    kwargs = {"batch_size": 3, "seed": 7, "settings": SETTINGS, **change}
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ValueError, match="--knowledge_bank_dir"):
        du.build_knowledge_bank(str(tmp_path), class_sample_fn, CLASSES, **kwargs)
    assert sorted(os.listdir(tmp_path)) == before  # nothing already written is destroyed
    du.load_knowledge_bank(str(tmp_path))


def test_bank_load_refusals(tmp_path):
    with pytest.raises(du.ConfigError, match="manifest.json is missing"):
        du.load_knowledge_bank(str(tmp_path / "nothing"))
    du.build_knowledge_bank(str(tmp_path), class_sample_fn, CLASSES, 3, 7, SETTINGS)
    with pytest.raises(ValueError, match="another base model"):
        du.load_knowledge_bank(str(tmp_path), fingerprint="0" * 64)
    with pytest.raises(ValueError, match="shape"):
        du.load_knowledge_bank(str(tmp_path), latent_shape=(4, 4, 4))
    shard = tmp_path / "shard-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # flip the last byte of the latent data: the file still parses, the hash does not match
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt"):
        du.load_knowledge_bank(str(tmp_path))
    shard.unlink()
    with pytest.raises(ValueError, match="corrupt"):
        du.load_knowledge_bank(str(tmp_path))


def _reencode(latents):
    """A stand-in for decode -> 8 bits -> encode: a deterministic posterior per view (view 1 = mirror)."""
    views = torch.stack([latents, latents.flip(-1)], dim=1)
    return views * 2, views.abs() + 0.1


def test_bank_stores_reencoded_posteriors_and_replays_them(tmp_path):
    du.build_knowledge_bank(str(tmp_path), class_sample_fn, CLASSES, 3, 7, SETTINGS, reencode_fn=_reencode)
    bank = du.load_knowledge_bank(str(tmp_path))
    mean, std = _reencode(bank.latents)
    assert torch.equal(bank.posterior_mean, mean) and torch.equal(bank.posterior_std, std)
    # images replay without flips: view 0 only; with flips: both views, sample i at rows 2i, 2i+1
    means, stds, views = du.replay_tensors(bank, "images", random_flip=False)
    assert views == 1 and torch.equal(means, mean[:, 0]) and torch.equal(stds, std[:, 0])
    means, stds, views = du.replay_tensors(bank, "images", random_flip=True)
    assert views == 2 and torch.equal(means[1::2], mean[:, 1])
    raw, no_std, one = du.replay_tensors(bank, "latents", random_flip=True)
    assert raw is bank.latents and no_std is None and one == 1


def test_bank_replay_follows_the_posterior_of_a_random_view(tmp_path):
    """Replayed latents are mean + std * N(0, 1) of a uniformly chosen view: checked over many draws."""
    du.build_knowledge_bank(str(tmp_path), class_sample_fn, CLASSES[:2], 2, 7, SETTINGS, reencode_fn=_reencode)
    bank = du.load_knowledge_bank(str(tmp_path))
    replay = du.BankReplay(bank, "images", True, batch_size=2, seed=0, rank=0, device="cpu")
    generator, noise_gen = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    draws = {0: [], 1: []}
    for _ in range(4000):
        latents, indices = replay.next(generator, lambda shape: torch.randn(shape, generator=noise_gen))
        for latent, index in zip(latents, indices.tolist(), strict=True):
            draws[index].append(latent)
    for index, samples in draws.items():
        samples = torch.stack(samples)
        # a 50/50 mixture of N(mean_v, std_v^2) over the two views v
        mean, std = bank.posterior_mean[index], bank.posterior_std[index]
        mixture_mean = mean.mean(0)
        mixture_var = (std ** 2 + mean ** 2).mean(0) - mixture_mean ** 2
        standard_error = (mixture_var / len(samples)).sqrt()
        assert ((samples.mean(0) - mixture_mean).abs() < 5 * standard_error).all()
        assert torch.allclose(samples.var(0), mixture_var, rtol=0.15)
    state = replay.state_dict()
    after = replay.next(torch.Generator().manual_seed(5), lambda shape: torch.zeros(shape))
    replay.load_state_dict(state)
    again = replay.next(torch.Generator().manual_seed(5), lambda shape: torch.zeros(shape))
    assert torch.equal(after[0], again[0]) and torch.equal(after[1], again[1])


def test_bank_of_an_earlier_format_refused_and_kept(tmp_path):
    """A bank written before re-encoding existed (format 1) is refused by name, when reused and when loaded,
    and left as it is; a bank without re-encoded samples replays as latents and is refused as images."""
    du.build_knowledge_bank(str(tmp_path), class_sample_fn, CLASSES, 3, 7, SETTINGS)
    bank = du.load_knowledge_bank(str(tmp_path))
    assert bank.posterior_mean is None and du.replay_tensors(bank, "latents", random_flip=True)[0] is bank.latents
    with pytest.raises(du.ConfigError, match="no re-encoded samples.*--knowledge_bank_replay latents"):
        du.replay_tensors(bank, "images", random_flip=True, bank_dir=str(tmp_path))
    manifest = json.loads((tmp_path / du.MANIFEST_NAME).read_text())
    (tmp_path / du.MANIFEST_NAME).write_text(json.dumps({**manifest, "format_version": 1}))
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(du.ConfigError, match="format 1.*delete the folder to rebuild it"):
        du.build_knowledge_bank(str(tmp_path), _raising_sample_fn, CLASSES, 3, 7, SETTINGS)
    with pytest.raises(du.ConfigError, match="format 1"):
        du.load_knowledge_bank(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == before


def test_bank_bad_batch_size(tmp_path):
    with pytest.raises(ValueError, match="--knowledge_bank_batch_size"):
        du.build_knowledge_bank(str(tmp_path), class_sample_fn, CLASSES, 0, 7, SETTINGS)


def test_model_fingerprint():
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    torch.manual_seed(0)
    b = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    torch.manual_seed(1)
    c = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    fa = du.model_fingerprint(a)
    assert isinstance(fa, str) and len(fa) == 64
    assert du.model_fingerprint(b) == fa
    assert du.model_fingerprint(c) != fa
    with torch.no_grad():
        b[1].bias[2] += 1e-3
    assert du.model_fingerprint(b) != fa
    # A large tensor (subsampled): a change at a sampled position is caught.
    big = torch.nn.Linear(256, 256)
    before = du.model_fingerprint(big)
    with torch.no_grad():
        big.weight[0, 0] += 1.0
    assert du.model_fingerprint(big) != before


# ----------------------------------------------------------------------------------------------
# Replay stream
# ----------------------------------------------------------------------------------------------


def _take(stream, n_batches):
    return [stream.next_indices() for _ in range(n_batches)]


def test_replay_stream_every_index_once_per_pass():
    stream = du.ReplayStream(10, 3, seed=0)
    batches = _take(stream, 10)  # 30 indices = 3 passes
    assert all(b.shape == (3,) and b.dtype == torch.int64 for b in batches)
    flat = torch.cat(batches).tolist()
    passes = [flat[i:i + 10] for i in range(0, 30, 10)]
    for p in passes:
        assert sorted(p) == list(range(10))
    assert passes[0] != passes[1]  # a new shuffle each pass
    assert stream.state_dict()["epoch"] == 2 and stream.state_dict()["position"] == 10


def test_replay_stream_batch_larger_than_bank():
    flat = torch.cat(_take(du.ReplayStream(4, 6, seed=0), 2)).tolist()
    for i in range(0, 12, 4):
        assert sorted(flat[i:i + 4]) == [0, 1, 2, 3]


def test_replay_stream_seeds_and_ranks():
    first = torch.cat(_take(du.ReplayStream(50, 5, seed=0, rank=0), 10))
    assert torch.equal(first, torch.cat(_take(du.ReplayStream(50, 5, seed=0, rank=0), 10)))
    assert not torch.equal(first, torch.cat(_take(du.ReplayStream(50, 5, seed=0, rank=1), 10)))
    assert not torch.equal(first, torch.cat(_take(du.ReplayStream(50, 5, seed=1, rank=0), 10)))


@pytest.mark.parametrize("k", [0, 3, 7])
def test_replay_stream_resume(k):
    reference = _take(du.ReplayStream(10, 3, seed=5, rank=1), k + 20)
    stream = du.ReplayStream(10, 3, seed=5, rank=1)
    _take(stream, k)
    state = json.loads(json.dumps(stream.state_dict()))  # survives a checkpoint file
    resumed = du.ReplayStream(10, 3, seed=999, rank=0)  # seed and rank come from the state
    resumed.load_state_dict(state)
    for got, want in zip(_take(resumed, 20), reference[k:], strict=True):
        assert torch.equal(got, want)


def test_replay_stream_empty_bank_raises():
    with pytest.raises(ValueError, match="empty"):
        du.ReplayStream(0, 3, seed=0)


# ----------------------------------------------------------------------------------------------
# Command-line flags
# ----------------------------------------------------------------------------------------------


def _parse(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--train_batch_size", type=int, default=32)
    du.add_difftuning_args(parser)
    return parser.parse_args(argv)


def test_args_defaults():
    args = _parse([])
    assert args.difftuning is False
    assert args.difftuning_tau == 1.0 and args.retention_tau is None
    assert args.timestep_sampling == "importance"
    assert args.retention_ratio == 0.2 and args.retention_weight == 0.1
    assert args.knowledge_bank_dir is None
    assert args.knowledge_bank_size == 1000 and args.knowledge_bank_batch_size == 16
    assert args.knowledge_bank_num_inference_steps is None and args.knowledge_bank_guidance_scale is None
    du.validate_difftuning_args(args)
    assert args.retention_tau == 1.0
    args = _parse(["--difftuning", "--difftuning_tau", "0.5", "--retention_tau", "1.5"])
    du.validate_difftuning_args(args)
    assert args.difftuning_tau == 0.5 and args.retention_tau == 1.5
    args = _parse(["--difftuning_tau", "0.75"])
    du.validate_difftuning_args(args)
    assert args.retention_tau == 0.75


@pytest.mark.parametrize("argv,flag", [
    (["--retention_ratio", "1.0"], "--retention_ratio"),
    (["--retention_ratio", "-0.1"], "--retention_ratio"),
    (["--difftuning_tau", "-1"], "--difftuning_tau"),
    (["--retention_tau", "-0.5"], "--retention_tau"),
    (["--retention_weight", "-0.1"], "--retention_weight"),
    (["--knowledge_bank_size", "0"], "--knowledge_bank_size"),
    (["--knowledge_bank_batch_size", "0"], "--knowledge_bank_batch_size"),
    (["--knowledge_bank_num_inference_steps", "0"], "--knowledge_bank_num_inference_steps"),
    (["--difftuning", "--train_batch_size", "1"], "--train_batch_size"),
])
def test_args_bad_values_name_the_flag(argv, flag):
    args = _parse(argv)
    with pytest.raises(ValueError, match=flag):
        du.validate_difftuning_args(args)


def test_args_small_batch_fine_without_difftuning_or_bank():
    du.validate_difftuning_args(_parse(["--train_batch_size", "1"]))
    du.validate_difftuning_args(_parse(["--difftuning", "--train_batch_size", "1", "--retention_ratio", "0"]))
    du.validate_difftuning_args(_parse(["--difftuning", "--train_batch_size", "2"]))



# ----------------------------------------------------------------------------------------------
# Bank preview
# ----------------------------------------------------------------------------------------------


def _decode(latents):
    return [Image.new("RGB", (8, 6), (int(i) * 40 % 256, 100, 200)) for i in range(latents.shape[0])]


@pytest.mark.parametrize("n,rows,size", [(6, 2, (24, 12)), (6, 4, (16, 24)), (1, 1, (8, 6))])
def test_save_bank_preview(tmp_path, n, rows, size):
    path = tmp_path / "preview.png"
    du.save_bank_preview(torch.arange(n, dtype=torch.float32), _decode, str(path), rows=rows)
    assert os.listdir(tmp_path) == ["preview.png"]
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == size
        assert img.convert("RGB").getpixel((0, 0)) == (0, 100, 200)  # first image, top-left cell
        if rows * math.ceil(n / rows) > n:  # padding cells are black
            assert img.convert("RGB").getpixel((size[0] - 1, size[1] - 1)) == (0, 0, 0)


def test_second_builder_waits_for_the_first(tmp_path, caplog):
    """Two runs given one new bank folder: the second waits on the first's lock, then finds the bank complete
    instead of racing it shard by shard."""
    import fcntl
    import threading

    bank_dir = tmp_path / "bank"
    bank_dir.mkdir()
    holder = open(bank_dir / ".lock", "w")
    fcntl.flock(holder, fcntl.LOCK_EX)  # "another run" is building
    result = {}
    thread = threading.Thread(target=lambda: result.update(manifest=du.build_knowledge_bank(
        str(bank_dir), class_sample_fn, CLASSES, 3, 7, SETTINGS)))
    with caplog.at_level("WARNING"):
        thread.start()
        thread.join(timeout=1.0)
        assert thread.is_alive() and not (bank_dir / du.MANIFEST_NAME).exists()  # waiting, nothing written
        fcntl.flock(holder, fcntl.LOCK_UN)
        holder.close()
        thread.join(timeout=60)
    assert result["manifest"]["complete"] and "Another run is building the knowledge bank" in caplog.text


# ---- flow matching: psi and xi over the scheduler's sigma table -----------------------------------------


def sd3_sigmas(shift: float = 3.0) -> torch.Tensor:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=shift).sigmas


@pytest.mark.parametrize("scheme, kwargs", [("logit_normal", {"logit_mean": 0.0, "logit_std": 1.0}),
                                            ("logit_normal", {"logit_mean": 0.5, "logit_std": 1.5}),
                                            ("mode", {"mode_scale": 1.29}), ("none", {}), ("cosmap", {})])
def test_flow_base_density_is_diffusers_draw(scheme, kwargs):
    """The base density is the distribution of the entry upstream's scripts train at."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    n = 1000
    u = compute_density_for_timestep_sampling(scheme, 400_000, generator=torch.Generator().manual_seed(0),
                                              **{"logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29, **kwargs})
    empirical = torch.bincount((u * n).long().clamp(0, n - 1), minlength=n).double() / len(u)
    probs = du.flow_base_probs(n, scheme, **kwargs)
    assert abs(probs.sum().item() - 1) < 1e-12
    assert 0.5 * (probs - empirical).abs().sum() < 0.03  # total variation: sampling noise only


@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0, 3.0])
def test_flow_schedules_reduce_to_ddpm_on_a_linear_table(tau):
    """sigma_i = (N - i) / N, uniform base: psi and xi are the DDPM schedules (timestep k = N - 1 - i)."""
    n = 1000
    sigmas = (n - torch.arange(n, dtype=torch.float64)) / n
    base = du.flow_base_probs(n, "none")
    for kind in ("adaptation", "retention"):
        flow = du.flow_chain_of_forgetting_probs(sigmas, base, tau, kind)
        ddpm = du.chain_of_forgetting_probs(n, tau, kind)
        assert torch.allclose(flow, ddpm.flip(0), atol=1e-9)


def test_flow_schedules_moments_support_and_shift():
    sigmas = sd3_sigmas()
    base = du.flow_base_probs(len(sigmas), "logit_normal")
    mean = {}
    for kind in ("adaptation", "retention"):
        probs = du.flow_chain_of_forgetting_probs(sigmas, base, 1.0, kind)
        assert abs(probs.sum().item() - 1) < 1e-9 and (probs[base == 0] == 0).all()
        mean[kind] = (probs * sigmas.double()).sum().item()
    base_mean = (base * sigmas.double()).sum().item()
    assert mean["retention"] < base_mean - 0.02 and mean["adaptation"] > base_mean + 0.02
    assert torch.allclose(du.flow_chain_of_forgetting_probs(sigmas, base, 0.0, "adaptation"), base)
    # The model's shift moves every density toward sigma = 1: psi's mean sigma is higher with shift 3 than 1.
    unshifted = sd3_sigmas(1.0)
    psi_mean = lambda s: (du.flow_chain_of_forgetting_probs(s, base, 1.0, "adaptation") * s.double()).sum()  # noqa: E731
    assert psi_mean(sigmas) > psi_mean(unshifted) + 0.1
    with pytest.raises(du.ConfigError, match="--weighting_scheme must be one of"):
        du.flow_base_probs(10, "uniform")


def test_flow_sampler_modes_agree_in_expectation():
    sigmas = sd3_sigmas()
    base = du.flow_base_probs(len(sigmas), "logit_normal")
    exact = (du.flow_chain_of_forgetting_probs(sigmas, base, 1.0, "retention") * sigmas.double()).sum().item()
    for mode in ("importance", "weighting"):
        sampler = du.FlowTimestepSampler(sigmas, base, 1.0, "retention", mode)
        entries, weights = sampler.sample(200_000, torch.Generator().manual_seed(1))
        estimate = (weights.double() * sigmas[entries].double()).mean().item()
        assert abs(estimate - exact) < 0.01, (mode, estimate, exact)
        assert entries.dtype == torch.int64 and (weights == 1).all() == (mode == "importance")
