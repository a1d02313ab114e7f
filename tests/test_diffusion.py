"""Per-token diffusion head: schedule, loss, and the sampler (respacing, temperature, CFG)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mar3d.models.diffusion import (DiffusionConfig, DiffusionHead, GaussianDiffusion,
                                    cosine_betas, respaced_timesteps)


class GaussianOracle(nn.Module):
    """The exact epsilon-predictor for data x0 ~ N(z, std^2 I) (z = the mean): with
    x_t = sqrt(a) x0 + sqrt(1-a) eps, E[eps | x_t] = sqrt(1-a) (x_t - sqrt(a) z) / (a std^2 + 1 - a).
    A closed-form denoiser, so sampler errors cannot hide behind training errors."""

    def __init__(self, alphas_cumprod: torch.Tensor, std: float):
        super().__init__()
        self.register_buffer("ac", alphas_cumprod.float())
        self.std = std

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        a = self.ac[t][:, None]
        return (1 - a).sqrt() * (x - a.sqrt() * z) / (a * self.std ** 2 + 1 - a)


def oracle_diffusion(token_dim: int, std: float) -> GaussianDiffusion:
    diff = GaussianDiffusion(token_dim, token_dim, DiffusionConfig(width=8, depth=1))
    diff.head = GaussianOracle(diff.train_schedule.alphas_cumprod, std)
    return diff


def test_cosine_schedule_shape_and_range():
    betas = cosine_betas(1000)
    ac = torch.cumprod(1 - betas, 0)
    assert betas.shape == (1000,)
    assert (betas > 0).all() and (betas <= 0.999).all()
    assert (ac[1:] < ac[:-1]).all()
    assert ac[0] > 0.9999 and ac[-1] < 1e-6
    # cosine: alpha_bar at the midpoint is close to cos^2(pi/4) = 0.5
    assert abs(ac[499].item() - 0.5) < 0.02


def test_respaced_timesteps_linspace_is_guided_diffusions_spacing():
    """MAR samples with guided-diffusion's space_timesteps(1000, "100"): round(i * 999 / 99)."""
    ts = respaced_timesteps(1000, 100, "linspace")
    assert ts[0] == 0 and ts[-1] == 999 and len(set(ts.tolist())) == 100
    assert ts[:4].tolist() == [0, 10, 20, 30] and ts[50].item() == round(50 * 999 / 99)
    assert respaced_timesteps(1000, 1, "linspace").tolist() == [999]
    with pytest.raises(ValueError, match="spacing"):
        respaced_timesteps(1000, 10, "trailing")
    with pytest.raises(ValueError, match="timestep_spacing"):
        DiffusionConfig(timestep_spacing="trailing").validate()


def test_respaced_timesteps_leading_spacing():
    ts = respaced_timesteps(1000, 100)
    assert ts.tolist() == list(range(0, 1000, 10))
    ts = respaced_timesteps(1000, 7)
    assert len(ts) == 7 and ts[0] == 0 and (ts[1:] > ts[:-1]).all() and ts[-1] < 1000
    assert respaced_timesteps(1000, 1000).tolist() == list(range(1000))
    with pytest.raises(ValueError):
        respaced_timesteps(1000, 0)
    with pytest.raises(ValueError):
        respaced_timesteps(10, 11)


def test_respaced_schedule_keeps_alpha_bar():
    diff = GaussianDiffusion(4, 8, DiffusionConfig(width=16, depth=1))
    sched = diff.sample_schedule(50)
    ts = respaced_timesteps(1000, 50)
    assert torch.allclose(sched.alphas_cumprod, diff.train_schedule.alphas_cumprod[ts])
    assert torch.allclose(torch.cumprod(1 - sched.betas, 0), sched.alphas_cumprod)


def test_head_starts_at_zero_and_learn_sigma_doubles_output():
    head = DiffusionHead(token_dim=6, cond_dim=10, width=32, depth=2)
    out = head(torch.randn(5, 6), torch.randint(0, 1000, (5,)), torch.randn(5, 10))
    assert out.shape == (5, 6) and torch.count_nonzero(out) == 0
    head = DiffusionHead(token_dim=6, cond_dim=10, width=32, depth=2, learn_sigma=True)
    assert head(torch.randn(5, 6), torch.randint(0, 1000, (5,)), torch.randn(5, 10)).shape == (5, 12)


def test_training_loss_mask_and_batch_mul():
    torch.manual_seed(0)
    diff = GaussianDiffusion(4, 8, DiffusionConfig(width=16, depth=1, batch_mul=3))
    target = torch.randn(10, 4, requires_grad=True)
    z = torch.randn(10, 8, requires_grad=True)
    mask = torch.zeros(10)
    mask[:4] = 1
    nn.init.normal_(diff.head.final_linear.weight, std=0.1)  # zero init would block input grads
    loss = diff.training_loss(target, z, mask)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    # Unmasked rows get no gradient, masked ones do (through the targets).
    assert torch.count_nonzero(target.grad[4:]) == 0
    assert torch.count_nonzero(target.grad[:4]) > 0
    # A zero-initialised head predicts eps = 0, so the loss is E[eps^2] = 1.
    nn.init.zeros_(diff.head.final_linear.weight)
    big = diff.training_loss(torch.randn(2000, 4), torch.randn(2000, 8))
    assert abs(big.item() - 1.0) < 0.05
    with pytest.raises(ValueError, match="no token"):
        diff.training_loss(torch.randn(3, 4), torch.randn(3, 8), torch.zeros(3))
    with pytest.raises(ValueError):
        diff.training_loss(torch.randn(3, 4), torch.randn(4, 8))


def test_learned_variance_loss_trains_both_outputs():
    torch.manual_seed(0)
    diff = GaussianDiffusion(4, 8, DiffusionConfig(width=16, depth=1, learn_sigma=True))
    nn.init.normal_(diff.head.final_linear.weight, std=0.1)  # leave the zero init behind
    loss = diff.training_loss(torch.randn(64, 4), torch.randn(64, 8))
    loss.backward()
    assert torch.isfinite(loss)
    grad = diff.head.final_linear.weight.grad
    assert grad[:4].abs().sum() > 0 and grad[4:].abs().sum() > 0
    out = diff.sample(torch.randn(6, 8), num_steps=10, generator=torch.Generator().manual_seed(0))
    assert out.shape == (6, 4) and torch.isfinite(out).all()


def test_sampler_recovers_gaussian_and_temperature_narrows_it():
    diff = oracle_diffusion(token_dim=3, std=0.5)
    mean = torch.tensor([1.5, -2.0, 0.25])
    z = mean.expand(4000, 3)
    samples = diff.sample(z, num_steps=100, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(samples.mean(0), mean, atol=0.05)
    assert torch.allclose(samples.std(0), torch.full((3,), 0.5), rtol=0.1)
    cold = diff.sample(z, num_steps=100, temperature=0.3, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(cold.mean(0), mean, atol=0.05)
    assert (cold.std(0) < 0.6 * samples.std(0)).all()


def test_sampler_is_reproducible_with_a_generator():
    diff = oracle_diffusion(token_dim=2, std=0.3)
    z = torch.randn(16, 2)
    a = diff.sample(z, num_steps=20, generator=torch.Generator().manual_seed(3))
    b = diff.sample(z, num_steps=20, generator=torch.Generator().manual_seed(3))
    c = diff.sample(z, num_steps=20, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_classifier_free_guidance_extrapolates_from_uncond_to_cond():
    diff = oracle_diffusion(token_dim=2, std=0.1)
    n = 2000
    cond_mean, uncond_mean = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.5])
    z = torch.cat([cond_mean.expand(n, 2), uncond_mean.expand(n, 2)])
    # Epsilon is affine in the mean, so guidance w samples around uncond + w (cond - uncond).
    for w in (1.0, 2.5):
        out = diff.sample(z, num_steps=50, guidance_scale=w, generator=torch.Generator().manual_seed(0))
        assert out.shape == (2 * n, 2) and torch.equal(out[:n], out[n:])
        expected = uncond_mean + w * (cond_mean - uncond_mean)
        assert torch.allclose(out[:n].mean(0), expected, atol=0.03)
    # cfg = 1 is exactly the unguided sampler on the conditional half (same noise stream).
    guided = diff.sample(z[:8].repeat(2, 1), num_steps=20, guidance_scale=1.0,
                         generator=torch.Generator().manual_seed(5))
    plain = diff.sample(z[:8], num_steps=20, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(guided[:8], plain, atol=1e-5)
    # Per-row scales are accepted too.
    rows = diff.sample(z[:4].repeat(2, 1), num_steps=5, guidance_scale=torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert rows.shape == (8, 2)
    with pytest.raises(ValueError, match="even"):
        diff.sample(torch.randn(3, 2), guidance_scale=2.0)


def test_learned_head_fits_a_conditional_distribution():
    """A real (trained) head learns two z-dependent modes; sampling lands on the right one."""
    torch.manual_seed(0)
    diff = GaussianDiffusion(2, 2, DiffusionConfig(width=64, depth=2, batch_mul=1))
    opt = torch.optim.AdamW(diff.parameters(), lr=2e-3)
    modes = torch.tensor([[2.0, -1.0], [-1.5, 1.0]])
    for _ in range(600):
        label = torch.randint(0, 2, (256,))
        x = modes[label] + 0.1 * torch.randn(256, 2)
        loss = diff.training_loss(x, F.one_hot(label, 2).float())
        opt.zero_grad()
        loss.backward()
        opt.step()
    for k in range(2):
        z = F.one_hot(torch.full((300,), k), 2).float()
        out = diff.sample(z, num_steps=50, generator=torch.Generator().manual_seed(k))
        assert torch.allclose(out.mean(0), modes[k], atol=0.15)
        assert (out.std(0) < 0.3).all()
