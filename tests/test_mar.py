"""MAR-LR / MAR-HR: schedules, masking, CFG dropout, condition augmentation, cascade, generation."""
from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from mar3d.config import ConfigError, from_dict, load_config, to_dict
from mar3d.models.condition import ConditionConfig, ImageEncoder
from mar3d.models.diffusion import DiffusionConfig
from mar3d.models.mar import MAR, ConditionalMAR, MARConfig, SamplingConfig, augment_lr
from mar3d.models.schedules import (guidance_ramp, cosine_mask_schedule, mask_from_orders,
                                    random_orders, sample_mask_ratio)

COND_LEN, COND_DIM = 5, 12


def tiny_cfg(stage: str = "lr", **overrides) -> MARConfig:
    """The mar_tiny preset's ``stage`` section with ``overrides``, validated."""
    base = to_dict(load_config(MARConfig, "mar_tiny", section=stage))
    return from_dict(MARConfig, {**base, **overrides})


def small_cfg(stage: str = "lr", **overrides) -> MARConfig:
    base = dict(seq_len=32 if stage == "lr" else 48, lr_seq_len=32, token_dim=4,
                enc_layers=1, dec_layers=1, diffusion=DiffusionConfig(width=32, depth=1),
                sampling=SamplingConfig(num_inference_steps=4, guidance_scale=2.0, temperature=1.0, diffusion_steps=10))
    base.update(overrides)
    return tiny_cfg(stage, **base)


def small_mar(stage: str = "lr", seed: int = 0, **overrides) -> MAR:
    torch.manual_seed(seed)
    return MAR(small_cfg(stage, **overrides), cond_dim=COND_DIM, cond_len=COND_LEN)


def wake_head(model: MAR) -> MAR:
    """Randomise the diffusion head's zero-initialised layers. At init its AdaLN modulations
    and output are zero, so it ignores z (and its input) until trained; tests that trace
    what reaches the loss or the samples need a head that listens."""
    for module in model.diffusion.head.modules():
        if isinstance(module, torch.nn.Linear) and torch.count_nonzero(module.weight) == 0:
            torch.nn.init.normal_(module.weight, std=0.1)
    return model


def randn(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("seq_len,num_steps", [(64, 16), (256, 64), (1024, 64), (1024, 256),
                                               (128, 128), (5, 5), (7, 1), (100, 3)])
def test_cosine_schedule_sums_and_reveals_few_tokens_early(seq_len, num_steps):
    counts = cosine_mask_schedule(seq_len, num_steps)
    assert len(counts) == num_steps and sum(counts) == seq_len
    assert min(counts) >= 1
    if num_steps >= 4:
        quarter = num_steps // 4
        assert sum(counts[:quarter]) <= sum(counts[-quarter:])
        if 2 * num_steps <= seq_len:   # room for more than one token per step
            assert sum(counts[:quarter]) < sum(counts[-quarter:])
        # Non-decreasing up to the +-1 jitter of the floor().
        assert all(b >= a - 1 for a, b in zip(counts, counts[1:]))


def test_cosine_schedule_matches_mar_formula():
    seq_len, num_steps = 256, 64
    masked = seq_len
    expected = []
    for step in range(num_steps):  # LTH14/mar sample_tokens, clamps included
        after = 0 if step == num_steps - 1 else max(1, min(
            masked - 1, math.floor(seq_len * math.cos(math.pi / 2 * (step + 1) / num_steps))))
        expected.append(masked - after)
        masked = after
    assert cosine_mask_schedule(seq_len, num_steps) == expected
    with pytest.raises(ValueError):
        cosine_mask_schedule(8, 9)


def test_cfg_scale_ramps_linearly():
    assert guidance_ramp(3.0, 0, 256) == 1.0
    assert guidance_ramp(3.0, 128, 256) == 2.0
    assert guidance_ramp(3.0, 256, 256) == 3.0
    values = [guidance_ramp(7.5, g, 100) for g in range(0, 101, 10)]
    steps = [b - a for a, b in zip(values, values[1:])]
    assert all(abs(s - steps[0]) < 1e-12 for s in steps)
    assert guidance_ramp(1.0, 37, 100) == 1.0
    with pytest.raises(ValueError):
        guidance_ramp(3.0, 101, 100)


def test_mask_ratio_truncated_normal():
    ratios = sample_mask_ratio(20000, torch.Generator().manual_seed(0))
    assert ratios.min() >= 0.7 and ratios.max() <= 1.0
    reference = stats.truncnorm((0.7 - 1.0) / 0.25, 0.0, loc=1.0, scale=0.25)
    assert abs(ratios.mean().item() - reference.mean()) < 0.003
    assert abs(ratios.std().item() - reference.std()) < 0.003
    again = sample_mask_ratio(5, torch.Generator().manual_seed(1))
    assert torch.equal(again, sample_mask_ratio(5, torch.Generator().manual_seed(1)))


def test_orders_and_masks():
    orders = random_orders(3, 10, torch.Generator().manual_seed(0))
    assert all(sorted(o.tolist()) == list(range(10)) for o in orders)
    mask = mask_from_orders(orders, 4)
    assert mask.sum(1).tolist() == [4, 4, 4]
    assert all(mask[b, orders[b, :4]].all() for b in range(3))
    assert (mask_from_orders(orders, 2) <= mask).all()   # nested: fewer masked is a subset


# ---------------------------------------------------------------------------- training
def test_forward_masks_within_ratio_and_returns_loss():
    model = small_mar()
    model.train()
    tokens, cond = randn(3, 32, 4), randn(3, COND_LEN, COND_DIM, seed=1)
    for _ in range(5):
        out = model(tokens, cond)
        assert torch.isfinite(out["loss"])
        n = out["mask"].sum(1)
        assert (n == n[0]).all()
        assert math.ceil(0.7 * 32) <= n[0] <= 32
        assert n[0] == math.ceil(32 * out["mask_ratio"].item())


def test_loss_uses_only_masked_tokens():
    model = wake_head(small_mar())
    # Cut the encoder's view of the tokens: any gradient w.r.t. tokens must come from the
    # diffusion targets, so it must vanish exactly on the unmasked (known) tokens.
    torch.nn.init.zeros_(model.token_proj.weight)
    tokens = randn(2, 32, 4).requires_grad_(True)
    torch.manual_seed(3)
    out = model(tokens, randn(2, COND_LEN, COND_DIM, seed=1))
    out["loss"].backward()
    mask = out["mask"]
    assert (~mask).any(), "this seed should leave some tokens unmasked"
    assert torch.count_nonzero(tokens.grad[~mask]) == 0
    assert (tokens.grad[mask].abs().sum(-1) > 0).all()


def test_encoder_never_sees_masked_tokens():
    model = small_mar().eval()
    tokens = randn(2, 32, 4)
    mask = mask_from_orders(random_orders(2, 32, torch.Generator().manual_seed(0)), 20)
    prefix = model.build_prefix(randn(2, COND_LEN, COND_DIM, seed=1))
    changed = tokens.clone()
    changed[mask] = 100.0
    a = model.encode(tokens, mask, prefix)
    assert a.shape == (2, model.prefix_len + 12, model.cfg.width)
    assert torch.equal(a, model.encode(changed, mask, prefix))


def test_cfg_dropout_replaces_the_condition():
    tokens = randn(4, 32, 4)
    cond_a, cond_b = randn(4, COND_LEN, COND_DIM, seed=1), randn(4, COND_LEN, COND_DIM, seed=2)

    def loss(model, cond):
        torch.manual_seed(7)
        return model(tokens, cond)

    always = wake_head(small_mar(cfg_dropout=1.0)).train()
    out_a, out_b = loss(always, cond_a), loss(always, cond_b)
    assert out_a["cond_dropped"].all()
    assert torch.equal(out_a["loss"], out_b["loss"])          # the image no longer matters
    never = wake_head(small_mar(cfg_dropout=0.0)).train()
    out_a, out_b = loss(never, cond_a), loss(never, cond_b)
    assert not out_a["cond_dropped"].any()
    assert not torch.equal(out_a["loss"], out_b["loss"])
    # The unconditional prefix is exactly the learned fake latent.
    drop = torch.tensor([True, False, True, False])
    prefix = never.build_prefix(cond_a, drop=drop)
    assert torch.equal(prefix[0], never.fake_cond[0]) and torch.equal(prefix[2], never.fake_cond[0])
    assert torch.allclose(prefix[1], never.cond_proj(cond_a[1]), atol=1e-6)
    # p = 0.1 drops about one sample in ten.
    p = small_mar(cfg_dropout=0.1).train()
    torch.manual_seed(0)
    dropped = torch.cat([p(randn(16, 32, 4), randn(16, COND_LEN, COND_DIM))["cond_dropped"]
                         for _ in range(20)])
    assert 0.03 < dropped.float().mean().item() < 0.2


def test_condition_augmentation_formula_and_range():
    x = randn(3, 6, 4)
    assert torch.equal(augment_lr(x, 0.0), x)
    eps = torch.randn(3, 6, 4, generator=torch.Generator().manual_seed(5))
    pure = augment_lr(x, 1.0, torch.Generator().manual_seed(5))
    assert torch.allclose(pure, eps)
    t = torch.tensor([0.4, 0.5, 0.6])
    mixed = augment_lr(x, t, torch.Generator().manual_seed(5))
    assert torch.allclose(mixed, t[:, None, None] * eps + (1 - t[:, None, None]) * x)
    with pytest.raises(ValueError):
        augment_lr(x, 1.5)

    hr = small_mar("hr")
    ts = hr.sample_aug_t(5000)
    assert ts.min() >= 0.4 and ts.max() <= 0.6
    assert ts.min() < 0.41 and ts.max() > 0.59
    out = hr.train()(randn(2, 48, 4), randn(2, COND_LEN, COND_DIM), lr_tokens=randn(2, 32, 4))
    assert torch.isfinite(out["loss"]) and ((out["aug_t"] >= 0.4) & (out["aug_t"] <= 0.6)).all()


def test_stage_inputs_are_checked():
    lr, hr = small_mar("lr"), small_mar("hr")
    cond = randn(2, COND_LEN, COND_DIM)
    with pytest.raises(ValueError, match="needs lr_tokens"):
        hr(randn(2, 48, 4), cond)
    with pytest.raises(ValueError, match="lr_tokens must be"):
        hr(randn(2, 48, 4), cond, lr_tokens=randn(2, 31, 4))
    with pytest.raises(ValueError, match="takes no lr_tokens"):
        lr(randn(2, 32, 4), cond, lr_tokens=randn(2, 32, 4))
    with pytest.raises(ValueError, match="tokens must be"):
        lr(randn(2, 30, 4), cond)
    with pytest.raises(ValueError, match="cond must be"):
        lr(randn(2, 32, 4), randn(2, COND_LEN + 1, COND_DIM))


# ---------------------------------------------------------------------------- generation
def test_sample_is_reproducible_per_seed():
    model = wake_head(small_mar()).train()
    cond = randn(2, COND_LEN, COND_DIM)
    a = model.sample(cond, generator=torch.Generator().manual_seed(0))
    b = model.sample(cond, generator=torch.Generator().manual_seed(0))
    c = model.sample(cond, generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 32, 4) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert model.training                                   # sample restores the mode
    unguided = model.sample(cond, guidance_scale=1.0, num_inference_steps=8, temperature=0.5,
                            diffusion_steps=5,
                            generator=torch.Generator().manual_seed(0))
    assert unguided.shape == (2, 32, 4)
    with pytest.raises(ValueError):
        model.sample(cond, guidance_scale=0.5)


def test_every_token_is_generated_once_per_step_schedule():
    model = small_mar(sampling=SamplingConfig(num_inference_steps=5, guidance_scale=1.0, temperature=1.0,
                                              diffusion_steps=4))
    seen = []
    original = model.diffusion.sample

    def counting_sample(z, *args, **kwargs):
        seen.append(z.shape[0])
        return original(z, *args, **kwargs)

    model.diffusion.sample = counting_sample
    out = model.sample(randn(3, COND_LEN, COND_DIM), generator=torch.Generator().manual_seed(0))
    assert seen == [3 * n for n in cosine_mask_schedule(32, 5)]
    assert (out.abs().sum(-1) > 0).all()                    # no token left at its zero init


def test_hr_consumes_lr_tokens():
    hr = wake_head(small_mar("hr"))
    cond, lr_a, lr_b = randn(2, COND_LEN, COND_DIM), randn(2, 32, 4, seed=1), randn(2, 32, 4, seed=2)

    def gen(lr_tokens):
        return hr.sample(cond, lr_tokens=lr_tokens, generator=torch.Generator().manual_seed(0))

    a = gen(lr_a)
    assert a.shape == (2, 48, 4)
    assert torch.equal(a, gen(lr_a))
    assert not torch.allclose(a, gen(lr_b))
    # The prefix really carries the (augmented) LR tokens after the image tokens.
    prefix = hr.build_prefix(cond, lr_a)
    assert prefix.shape[1] == COND_LEN + 32
    assert torch.allclose(prefix[:, COND_LEN:], hr.lr_proj(lr_a))


@pytest.mark.parametrize("stage,guidance", [("lr", 2.0), ("lr", 1.0), ("hr", 2.0)])
def test_per_item_generators_make_samples_batch_invariant(stage, guidance):
    """With one generator per sample, a sample's mask order, condition augmentation and
    diffusion noise come from its own generator only: sampled in a batch of 3 or alone,
    guided or not, it gets the same tokens, up to float32 rounding: CPU matrix kernels
    may sum in another order for another batch size (seen: 2e-6 relative on guided
    tokens of magnitude ~5), which no random draw explains."""
    model = wake_head(small_mar(stage))
    cond = randn(3, COND_LEN, COND_DIM)
    lr = randn(3, 32, 4, seed=1) if stage == "hr" else None

    def gens(*seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    def sample(rows, seeds):
        return model.sample(cond[rows], lr_tokens=None if lr is None else lr[rows], guidance_scale=guidance,
                            generator=gens(*seeds))

    batch = sample([0, 1, 2], [5, 6, 7])
    for i, seed in enumerate([5, 6, 7]):
        torch.testing.assert_close(batch[i:i + 1], sample([i], [seed]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sample([2, 0], [7, 5]), batch[[2, 0]], rtol=1e-5, atol=1e-5)
    # A one-sample list is that sample's plain generator: the same stream as before.
    alone = model.sample(cond[:1], lr_tokens=None if lr is None else lr[:1], guidance_scale=guidance,
                         generator=torch.Generator().manual_seed(5))
    assert torch.equal(alone, sample([0], [5]))
    with pytest.raises(ValueError, match="one per item"):
        sample([0, 1], [5])


def test_lr_only_cascade_from_images():
    """The --no-hr path: RGBA images -> tiny CLIP/DINOv2 features -> MAR-LR tokens."""
    torch.manual_seed(0)
    cond_cfg = ConditionConfig(tiny=True, out_dim=32)
    encoder = ImageEncoder(cond_cfg)
    model = ConditionalMAR(cond_cfg, small_cfg("lr"), encoder.spec)
    assert not any(n.startswith(("conditioner.clip.", "conditioner.dino.")) for n in model.state_dict())
    features = encoder(torch.randint(0, 256, (2, 128, 128, 4), dtype=torch.uint8))
    out = model(features, randn(2, 32, 4))
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert model.conditioner.clip_proj.weight.grad is not None
    tokens = model.sample(features, generator=torch.Generator().manual_seed(0), num_inference_steps=4)
    assert tokens.shape == (2, 32, 4)
    assert torch.equal(tokens, model.sample(features, generator=torch.Generator().manual_seed(0),
                                            num_inference_steps=4))


def test_tiny_lr_model_overfits_two_conditions():
    """Sanity: two conditions, two fixed token sets; after training each generation lands on
    its own target (well below the distance to the other one)."""
    torch.manual_seed(0)
    # Deterministic targets: the robust "leading" spacing (MAR's "linspace" starts at
    # alpha_bar ~ 2e-9, where a briefly trained head's errors on a point mass blow up).
    cfg = tiny_cfg("lr", seq_len=16, token_dim=4, enc_layers=1, dec_layers=1, cfg_dropout=0.0,
                   diffusion=DiffusionConfig(width=64, depth=2, timestep_spacing="leading"),
                   sampling=SamplingConfig(num_inference_steps=4, guidance_scale=1.0, temperature=1.0,
                                           diffusion_steps=25))
    model = MAR(cfg, cond_dim=8, cond_len=2)
    targets, conds = randn(2, 16, 4, seed=0), randn(2, 2, 8, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    index = torch.arange(4) % 2
    for _ in range(250):
        loss = model(targets[index], conds[index])["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = model.sample(conds, generator=torch.Generator().manual_seed(1))
    dist = torch.cdist(out.flatten(1), targets.flatten(1)) ** 2 / targets[0].numel()
    assert dist[0, 0] < 0.1 * dist[0, 1] and dist[1, 1] < 0.1 * dist[1, 0]
    assert dist[0, 0] < 0.1 and dist[1, 1] < 0.1


# ---------------------------------------------------------------------------- configs
def test_configs_load_and_validate():
    # Every value of every preset: tests/test_presets.py.
    for name in ("mar_tiny", "mar_paper"):
        lr, hr = (load_config(MARConfig, name, section=s) for s in ("lr", "hr"))
        assert lr.stage == "lr" and hr.stage == "hr"
        assert hr.lr_seq_len == lr.seq_len and hr.token_dim == lr.token_dim  # HR reads LR's tokens
        load_config(ConditionConfig, name, section="condition")
    lr, hr = (load_config(MARConfig, "mar_paper", section=s) for s in ("lr", "hr"))
    assert (lr.width, lr.heads, lr.enc_layers, lr.dec_layers) == (1024, 16, 16, 16)
    assert (hr.seq_len, lr.seq_len, hr.diffusion.depth) == (1024, 256, 6)
    assert (hr.cond_aug_t_min, hr.cond_aug_t_max, hr.cond_aug_t_infer) == (0.4, 0.6, 0.5)


@pytest.mark.parametrize("section,override,match", [
    ("lr", "heads=5", "divisible"),
    ("hr", "cond_aug_t_min=0.7", "cond_aug_t_min"),
    ("hr", "lr_seq_len=0", "lr_seq_len"),
    ("lr", "cfg_dropout=1.5", "cfg_dropout"),
    ("lr", "sampling.num_inference_steps=65", "num_inference_steps"),
    ("lr", "sampling.guidance_scale=0.5", "guidance_scale"),
    ("lr", "sampling.temperature=null", "must set temperature"),
    ("lr", "stage=mr", "stage"),
])
def test_bad_configs_are_rejected(section, override, match):
    with pytest.raises(ValueError, match=match):
        load_config(MARConfig, "mar_tiny", [override], section=section)


def test_unknown_keys_are_rejected():
    with pytest.raises(ConfigError, match="unknown"):
        load_config(MARConfig, "mar_tiny", ["mask_ratio=0.5"], section="lr")


def test_latent_normalization_roundtrip_and_stats_from_the_vae():
    """MAR works on (z - shift) / scale with the frozen VAE's measured statistics of its
    training target; the saved config carries them, so generated tokens map back."""
    from mar3d.train.stages import apply_latent_stats

    stats = {"hr": {"shift": 0.2, "std_mean": 1.5, "std_sample": 1.9},
             "lr": {"shift": 0.1, "std_mean": 1.4, "std_sample": 1.8}, "num_shapes": 8}
    cfg = small_cfg("hr")
    apply_latent_stats(cfg, stats, "sample", "vae-folder")
    assert (cfg.latent_shift, cfg.latent_scale) == (0.2, 1.9)
    assert (cfg.lr_latent_shift, cfg.lr_latent_scale) == (0.1, 1.8)
    lr_cfg = small_cfg("lr")
    apply_latent_stats(lr_cfg, stats, "mean", "vae-folder")
    assert (lr_cfg.latent_shift, lr_cfg.latent_scale) == (0.1, 1.4)
    model = MAR(cfg, cond_dim=COND_DIM, cond_len=COND_LEN)
    z = randn(2, cfg.seq_len, cfg.token_dim) * 1.9 + 0.2
    x = model.normalize(z)
    assert torch.allclose(model.denormalize(x), z, atol=1e-6)
    assert x.std().item() == pytest.approx(1.0, abs=0.1) and abs(x.mean().item()) < 0.1
    assert torch.allclose(model.normalize_lr(torch.full((1, 2), 1.9)), torch.full((1, 2), 1.0))
    with pytest.raises(ValueError, match="latent_stats"):
        apply_latent_stats(small_cfg("lr"), None, "sample", "old-vae")
    with pytest.raises(ValueError, match="latent_scale"):
        small_cfg("lr", latent_scale=0.0)
