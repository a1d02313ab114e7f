"""Per-token diffusion head of MAR (Li et al. 2024), as used by MAR-3D.

The MAR decoder emits one condition vector ``z`` per masked token; a small MLP denoiser
models p(x | z) for each continuous token ``x`` with a DDPM. No vector quantisation is
needed: the "loss" of a token is the diffusion loss of its denoiser.

* ``DiffusionHead``: SimpleMLPAdaLN. Residual MLP blocks whose LayerNorms are modulated
  (shift, scale, gate) by timestep embedding + projected ``z``; predicts epsilon, plus an
  interpolation weight for the variance when ``learn_sigma`` is on.
* ``GaussianDiffusion``: cosine noise schedule (Nichol & Dhariwal 2021) with 1000 training
  steps, epsilon-prediction MSE loss, and DDPM ancestral sampling on an evenly respaced
  subset of steps (100 by default; "leading" or MAR's "linspace" spacing, see
  ``respaced_timesteps``), with temperature and classifier-free guidance.

Learned variance (``learn_sigma``, used by the MAR/MAR-3D code and by
``mar3d/configs/mar_paper.yaml``) is off in the dataclass default and the tiny configs: for the
tiny CPU models it measured the same as the fixed posterior variance (README) and the
loss stays a plain MSE. When on, the head's second half of
outputs sets log-variance between log(beta_tilde) and log(beta) and a variational-bound
term (computed with a stopped-gradient mean, as in improved DDPM) is added. At t = 0 the
decoder term is a continuous Gaussian NLL, since latent tokens are not 8-bit pixels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from mar3d.models.rng import Generators, draw


@dataclass
class DiffusionConfig:
    """Hyper-parameters of the per-token diffusion head."""

    width: int = 1024                  # MLP width of the denoiser
    depth: int = 6                     # number of AdaLN residual blocks
    train_steps: int = 1000            # diffusion steps of the training schedule
    batch_mul: int = 4                 # noise draws per token per training step
    learn_sigma: bool = False          # see module docstring
    # Which training timesteps a respaced sampler visits (see ``respaced_timesteps``):
    # "linspace" = MAR's / guided-diffusion's even spacing including T-1; "leading" =
    # floor(i * T / n), which stops at T - T/n.
    timestep_spacing: str = "leading"

    def validate(self) -> None:
        if self.width < 1 or self.depth < 1:
            raise ValueError(f"diffusion width/depth must be >= 1, got {self.width}/{self.depth}")
        if self.train_steps < 2:
            raise ValueError(f"diffusion.train_steps must be >= 2, got {self.train_steps}")
        if self.batch_mul < 1:
            raise ValueError(f"diffusion.batch_mul must be >= 1, got {self.batch_mul}")
        if self.timestep_spacing not in SPACINGS:
            raise ValueError(f"diffusion.timestep_spacing must be one of {SPACINGS}, got "
                             f"{self.timestep_spacing!r}")


def gaussian_noise(shape: tuple[int, ...], generator: Generators,
                   like: torch.Tensor) -> torch.Tensor:
    """Gaussian noise drawn on the generator's device (so a CPU generator gives the same
    numbers whatever device the model is on), then moved to ``like``'s device/dtype.
    A list of generators splits the rows between them (:func:`mar3d.models.rng.draw`)."""
    return draw(torch.randn, shape, generator, like.device).to(like.device, like.dtype)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [N, dim] of (possibly fractional) timesteps [N]."""
    half = dim // 2
    steps = torch.arange(half, device=t.device, dtype=torch.float32)
    freqs = torch.exp(-math.log(max_period) * steps / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class AdaLNResBlock(nn.Module):
    """x + gate * MLP(modulate(LN(x), shift, scale)), with (shift, scale, gate) from the condition."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.ada(c).chunk(3, dim=-1)
        return x + gate * self.mlp(_modulate(self.norm(x), shift, scale))


class DiffusionHead(nn.Module):
    """SimpleMLPAdaLN denoiser: (x_t [N,C], t [N], z [N,D]) -> epsilon [N,C] (or [N,2C])."""

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int, learn_sigma: bool = False):
        super().__init__()
        self.token_dim = token_dim
        self.learn_sigma = learn_sigma
        self.out_dim = token_dim * 2 if learn_sigma else token_dim
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(token_dim, width)
        self.blocks = nn.ModuleList(AdaLNResBlock(width) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.final_linear = nn.Linear(width, self.out_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        # Zero modulations/output: every block starts as the identity and the head predicts
        # epsilon = 0, which keeps the first steps of a deep stack stable.
        for block in self.blocks:
            nn.init.zeros_(block.ada[-1].weight)
            nn.init.zeros_(block.ada[-1].bias)
        nn.init.zeros_(self.final_ada[-1].weight)
        nn.init.zeros_(self.final_ada[-1].bias)
        nn.init.zeros_(self.final_linear.weight)
        nn.init.zeros_(self.final_linear.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        # The diffusion chain runs in float32; match the weights when the module itself was
        # cast (e.g. DeepSpeed bf16). Under autocast the weights stay float32 and this is a no-op.
        dtype = self.input_proj.weight.dtype
        c = self.time_embed(t) + self.cond_embed(z.to(dtype))
        h = self.input_proj(x.to(dtype))
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        return self.final_linear(_modulate(self.final_norm(h), shift, scale))


def cosine_betas(num_steps: int, max_beta: float = 0.999, s: float = 0.008) -> torch.Tensor:
    """Betas whose cumulative product follows alpha_bar(t) = cos^2((t/T + s)/(1 + s) * pi/2)."""
    def alpha_bar(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
             for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float64)


SPACINGS = ("leading", "linspace")


def respaced_timesteps(train_steps: int, sample_steps: int, spacing: str = "leading") -> torch.Tensor:
    """``sample_steps`` of the ``train_steps`` training timesteps, ascending.

    * ``"leading"``: ``floor(i * T / n)``, i = 0..n-1; it ends at T - T/n, not at T - 1.
    * ``"linspace"``: ``round(i * (T - 1) / (n - 1))``, the even spacing of
      guided-diffusion's ``space_timesteps(T, "n")`` that MAR samples with; it includes
      T - 1.

    The cosine schedule clips the last beta to 0.999, so alpha_bar(T-1) ~ 2e-9 and a first
    reverse step from T-1 amplifies epsilon-prediction errors ~500x: on *unnormalized*
    VAE latents (std ~2) a briefly trained head diverged there, which is why "leading"
    exists (at T - T/n alpha_bar is ~8e-4 for n = 100), and the tests' toy heads trained
    on deterministic targets still diverge there. On VAE latents normalized to unit spread
    (``MARConfig.latent_scale``, as MAR scales its latents) MAR's spacing was as good or
    better for the tiny CPU models, with fixed or learned variance (README): the tiny and
    paper configs use it; "leading" stays the dataclass default as the robust choice.
    """
    if not 1 <= sample_steps <= train_steps:
        raise ValueError(f"sample_steps must be in [1, {train_steps}], got {sample_steps}")
    if spacing == "linspace":
        if sample_steps == 1:
            return torch.tensor([train_steps - 1])
        return torch.round(torch.arange(sample_steps, dtype=torch.float64) * (train_steps - 1)
                           / (sample_steps - 1)).long()
    if spacing != "leading":
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    return torch.div(torch.arange(sample_steps) * train_steps, sample_steps, rounding_mode="floor")


class _Schedule:
    """Per-step coefficients of a DDPM, for training steps or a respaced subset of them.

    ``timesteps`` maps each step index of this schedule to the training timestep that the
    head was trained with (so the head always sees training-time t values).
    """

    def __init__(self, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor):
        ac = alphas_cumprod.double()
        ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        self.timesteps = timesteps.long()
        self.betas = 1 - ac / ac_prev
        self.alphas_cumprod = ac
        self.sqrt_ac = ac.sqrt()
        self.sqrt_one_minus_ac = (1 - ac).sqrt()
        self.sqrt_recip_ac = (1 / ac).sqrt()
        self.sqrt_recipm1_ac = (1 / ac - 1).sqrt()
        post_var = self.betas * (1 - ac_prev) / (1 - ac)
        self.posterior_variance = post_var
        # posterior variance is 0 at step 0; clip its log with the next value, as in DDPM.
        self.posterior_log_var = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
        self.posterior_mean_coef_x0 = self.betas * ac_prev.sqrt() / (1 - ac)
        self.posterior_mean_coef_xt = (1 - ac_prev) * (1 - self.betas).sqrt() / (1 - ac)
        self.log_betas = torch.log(self.betas)
        self.num_steps = len(ac)
        self._cache: dict[tuple[str, torch.device], torch.Tensor] = {}

    def at(self, name: str, idx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Coefficient ``name`` at step indices ``idx`` [N] as float32 [N, 1] on ``like``'s device.

        Coefficients are kept in float64 and handed out in float32 (never bf16: 1/sqrt(alpha_bar)
        reaches ~600 at the last step), cached per device so sampling loops copy nothing.
        """
        key = (name, like.device)
        if key not in self._cache:
            self._cache[key] = getattr(self, name).float().to(like.device)
        return self._cache[key][idx][:, None]


class GaussianDiffusion(nn.Module):
    """Diffusion loss and sampler around a :class:`DiffusionHead`."""

    def __init__(self, token_dim: int, cond_dim: int, cfg: DiffusionConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.token_dim = token_dim
        self.head = DiffusionHead(token_dim, cond_dim, cfg.width, cfg.depth, cfg.learn_sigma)
        betas = cosine_betas(cfg.train_steps)
        self.train_schedule = _Schedule(torch.cumprod(1 - betas, 0), torch.arange(cfg.train_steps))
        self._sample_schedules: dict[tuple[int, str], _Schedule] = {}

    def sample_schedule(self, num_steps: int, spacing: str | None = None) -> _Schedule:
        key = (num_steps, spacing or self.cfg.timestep_spacing)
        if key not in self._sample_schedules:
            timesteps = respaced_timesteps(self.cfg.train_steps, *key)
            self._sample_schedules[key] = _Schedule(self.train_schedule.alphas_cumprod[timesteps], timesteps)
        return self._sample_schedules[key]

    # ------------------------------------------------------------------ training
    def training_loss(self, target: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None = None,
                      batch_mul: int | None = None) -> torch.Tensor:
        """Mean diffusion loss of tokens ``target`` [N, C] given conditions ``z`` [N, D].

        Each token is noised ``batch_mul`` times (independent t and epsilon): the head is
        cheap next to the transformer, so more draws per forward pass lower the loss
        variance almost for free. ``mask`` [N] (1 = counts) restricts the mean to those
        tokens; in MAR only masked tokens are supervised.
        """
        if target.dim() != 2 or z.dim() != 2 or target.shape[0] != z.shape[0]:
            raise ValueError(f"expected target [N, C] and z [N, D], got {tuple(target.shape)} "
                             f"and {tuple(z.shape)}")
        mul = self.cfg.batch_mul if batch_mul is None else batch_mul
        target = target.float().repeat(mul, 1)
        z = z.repeat(mul, 1)
        per_token = self._per_token_loss(target, z)
        if mask is None:
            return per_token.mean()
        mask = mask.to(per_token.dtype).repeat(mul)
        if mask.sum() == 0:
            raise ValueError("training_loss: mask selects no token")
        return (per_token * mask).sum() / mask.sum()

    def _per_token_loss(self, x0: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        sched = self.train_schedule
        t = torch.randint(0, sched.num_steps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        x_t = sched.at("sqrt_ac", t, x0) * x0 + sched.at("sqrt_one_minus_ac", t, x0) * noise
        out = self.head(x_t, t, z).float()
        eps = out[:, : self.token_dim]
        loss = (eps - noise).pow(2).mean(dim=1)
        if self.cfg.learn_sigma:
            # The variational bound trains only the variance: the mean path is detached so
            # the MSE alone drives epsilon (improved-DDPM hybrid loss).
            frozen = torch.cat([eps.detach(), out[:, self.token_dim:]], dim=1)
            loss = loss + self._vb_term(sched, frozen, x0, x_t, t)
        return loss

    def _vb_term(self, sched: _Schedule, out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
                 t: torch.Tensor) -> torch.Tensor:
        """KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) in bits per dim; Gaussian NLL at t = 0."""
        true_mean = sched.at("posterior_mean_coef_x0", t, x0) * x0 + \
            sched.at("posterior_mean_coef_xt", t, x0) * x_t
        true_log_var = sched.at("posterior_log_var", t, x0)
        mean, log_var = self._p_mean_logvar(sched, out, x_t, t)
        kl = 0.5 * (-1.0 + log_var - true_log_var + torch.exp(true_log_var - log_var)
                    + (true_mean - mean).pow(2) * torch.exp(-log_var))
        nll = 0.5 * (math.log(2 * math.pi) + log_var + (x0 - mean).pow(2) * torch.exp(-log_var))
        per_dim = torch.where((t == 0)[:, None], nll, kl) / math.log(2.0)
        return per_dim.mean(dim=1)

    def _p_mean_logvar(self, sched: _Schedule, out: torch.Tensor, x_t: torch.Tensor,
                       idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of p(x_{t-1} | x_t) from the head output at step ``idx``."""
        eps = out[:, : self.token_dim]
        if self.cfg.learn_sigma:
            frac = (out[:, self.token_dim:] + 1) / 2
            min_log = sched.at("posterior_log_var", idx, x_t)
            max_log = sched.at("log_betas", idx, x_t)
            log_var = frac * max_log + (1 - frac) * min_log
        else:
            log_var = sched.at("posterior_log_var", idx, x_t).expand_as(x_t)
        x0 = sched.at("sqrt_recip_ac", idx, x_t) * x_t - sched.at("sqrt_recipm1_ac", idx, x_t) * eps
        mean = sched.at("posterior_mean_coef_x0", idx, x_t) * x0 + \
            sched.at("posterior_mean_coef_xt", idx, x_t) * x_t
        return mean, log_var

    # ------------------------------------------------------------------ sampling
    def _guided_output(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor,
                       cfg: torch.Tensor | float | None) -> torch.Tensor:
        """Head output; with ``cfg``, z = [z_cond; z_uncond] and both halves share x.

        Classifier-free guidance on epsilon: eps = eps_u + cfg * (eps_c - eps_u), written
        to both halves so the pair stays identical (MAR convention). ``cfg`` may be a
        scalar or a per-row tensor [N/2].
        """
        if cfg is None:
            return self.head(x, t, z)
        half = x[: x.shape[0] // 2]
        out = self.head(torch.cat([half, half]), t, z)
        eps, rest = out[:, : self.token_dim], out[:, self.token_dim:]
        cond_eps, uncond_eps = eps.chunk(2, dim=0)
        scale = cfg if not torch.is_tensor(cfg) else cfg.to(eps.dtype).reshape(-1, 1)
        guided = uncond_eps + scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([guided, guided]), rest], dim=1)

    @torch.no_grad()
    def sample(self, z: torch.Tensor, num_steps: int = 100, temperature: float = 1.0,
               guidance_scale: torch.Tensor | float | None = None,
               generator: Generators = None, spacing: str | None = None) -> torch.Tensor:
        """Sample tokens [N, C] for conditions ``z`` [N, D] by ancestral DDPM sampling.

        ``temperature`` scales the noise added at each step (not the initial noise), as in
        MAR. With ``guidance_scale`` (scalar or [N/2]) ``z`` must be [z_cond; z_uncond] (N even) and
        the result is [N, C] with identical halves; callers keep the first half. With a
        list of G generators the rows (of each half) are G item-major groups, one per generator.
        """
        if z.dim() != 2:
            raise ValueError(f"z must be [N, D], got {tuple(z.shape)}")
        if guidance_scale is not None and z.shape[0] % 2:
            raise ValueError("with guidance_scale, z must stack conditional and unconditional halves (even N)")
        sched = self.sample_schedule(num_steps, spacing)
        n = z.shape[0]
        like = z.float()  # the chain runs in float32 whatever the head's precision
        if guidance_scale is None:
            x = gaussian_noise((n, self.token_dim), generator, like)
        else:
            half = gaussian_noise((n // 2, self.token_dim), generator, like)
            x = torch.cat([half, half])
        for i in reversed(range(sched.num_steps)):
            idx = torch.full((n,), i, device=z.device, dtype=torch.long)
            t = sched.timesteps.to(z.device)[idx]
            out = self._guided_output(x, t, z, guidance_scale).float()
            mean, log_var = self._p_mean_logvar(sched, out, x, idx)
            if i > 0:
                if guidance_scale is None:
                    noise = gaussian_noise(tuple(x.shape), generator, x)
                else:  # one draw per pair, so guided and unguided runs consume the same stream
                    noise = gaussian_noise((n // 2, self.token_dim), generator, x)
                    noise = torch.cat([noise, noise])
                x = mean + torch.exp(0.5 * log_var) * noise * temperature
            else:
                x = mean
        return x
