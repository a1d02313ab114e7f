"""Shape VAE: config, shapes, pyramid/standard and query modes, LR/HR latents, loss,
gradients, and a real overfit on one analytic shape followed by mesh extraction."""
from __future__ import annotations

import math

import fpsample
import numpy as np
import pytest
import torch
import trimesh

from mar3d.config import ConfigError, from_dict, load_config, to_dict
from mar3d.geometry import extract_mesh, latent_occupancy_fn
from mar3d.models.vae import ShapeVAE, VAEConfig, farthest_point_sample

from _ycb import ycb_mesh

SIZES = (512, 128, 32)


def torus_inside(points: np.ndarray, major: float = 0.55, minor: float = 0.25) -> np.ndarray:
    q = np.stack([np.linalg.norm(points[:, :2], axis=-1) - major, points[:, 2]], axis=-1)
    return np.linalg.norm(q, axis=-1) < minor


def shape_batch(mesh: trimesh.Trimesh, inside, sizes=SIZES, num_vol=768, num_near=256, seed=0,
                batch=1) -> dict:
    """A dataset-contract batch (surface pyramid + occupancy labels) for one mesh."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, n in enumerate(sizes):
        p, fi = trimesh.sample.sample_surface(mesh, n, seed=seed + k)
        surf = np.concatenate([p, mesh.face_normals[fi]], axis=1)
        out[f"surface_{k}"] = torch.tensor(surf, dtype=torch.float32).expand(batch, -1, -1).contiguous()
    near = trimesh.sample.sample_surface(mesh, num_near, seed=seed + 99)[0] + rng.normal(0, 0.02, (num_near, 3))
    pts = np.concatenate([rng.uniform(-1, 1, (num_vol, 3)), near]).astype(np.float32)
    out["occ_points"] = torch.tensor(pts).expand(batch, -1, -1).contiguous()
    out["occ_labels"] = torch.tensor(inside(pts), dtype=torch.float32).expand(batch, -1).contiguous()
    out["near_mask"] = torch.cat([torch.zeros(num_vol, dtype=torch.bool),
                                  torch.ones(num_near, dtype=torch.bool)]).expand(batch, -1)
    return out


@pytest.fixture(scope="module")
def torus():
    return trimesh.creation.torus(major_radius=0.55, minor_radius=0.25, major_sections=48, minor_sections=24)


@pytest.fixture(scope="module")
def batch(torus):
    return shape_batch(torus, torus_inside, batch=2)


def tiny(**kw) -> VAEConfig:
    """The vae_tiny preset with fewer tokens, and ``kw``, validated."""
    base = to_dict(load_config(VAEConfig, "vae_tiny"))
    return from_dict(VAEConfig, {**base, "hr_tokens": 32, "lr_tokens": 16, **kw})


def test_config_files_load_and_validate():
    # Every value of every preset: tests/test_presets.py.
    tiny_cfg = load_config(VAEConfig, "vae_tiny")
    assert tiny_cfg.width == 64 and tiny_cfg.kind == "pyramid"
    paper = load_config(VAEConfig, "vae_paper")
    assert (paper.width, paper.heads, paper.enc_layers, paper.dec_layers) == (768, 12, 8, 16)
    assert (paper.latent_channels, paper.lr_tokens, paper.hr_tokens) == (64, 256, 1024)
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(VAEConfig, overrides=["widht=3"])
    assert load_config(VAEConfig, "vae_tiny", ["kind=standard"]).kind == "standard"


@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="octree"), "kind"),
    (dict(query_mode="grid"), "query_mode"),
    (dict(width=66, heads=4), "divisible"),
    (dict(kind="pyramid", num_levels=1), "num_levels"),
    (dict(logvar_min=5.0, logvar_max=1.0), "logvar_min"),
    (dict(kl_weight=-1.0), "kl_weight"),
    (dict(dropout=1.0), "dropout"),
])
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny(**kwargs)


@pytest.mark.parametrize("kind", ["pyramid", "standard"])
@pytest.mark.parametrize("query_mode", ["fps", "learnable", "random"])
def test_encode_decode_shapes(batch, kind, query_mode):
    torch.manual_seed(0)
    model = ShapeVAE(tiny(kind=kind, query_mode=query_mode))
    surfaces = [batch[f"surface_{k}"] for k in range(3)]
    for level, tokens in (("hr", 32), ("lr", 16)):
        assert model.num_tokens(level) == tokens
        z = model.encode(surfaces, level=level)
        assert z.shape == (2, tokens, 16)
        kv = model.decode(z)
        assert kv.shape == (2, tokens, 64)
        logits = model.query(kv, batch["occ_points"][:, :100])
        assert logits.shape == (2, 100)
    # eval mode + mode() is deterministic (no random FPS start, subset or sampling)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.encode(surfaces, "lr", sample=False), model.encode(surfaces, "lr", sample=False))


def test_pyramid_and_standard_differ_in_structure():
    pyramid, standard = ShapeVAE(tiny(kind="pyramid")), ShapeVAE(tiny(kind="standard"))
    assert len(pyramid.encoder.cross_blocks) == 3 and len(standard.encoder.cross_blocks) == 1
    assert pyramid.required_levels() == 3 and standard.required_levels() == 1


def test_lr_pyramid_is_shifted_one_level_down(batch):
    model = ShapeVAE(tiny()).eval()
    surfaces = [batch[f"surface_{k}"] for k in range(3)]
    hr = model.encoder.input_levels(surfaces, "hr")
    lr = model.encoder.input_levels(surfaces, "lr")
    assert [s.shape[1] for s in hr] == [512, 128, 32]
    assert [s.shape[1] for s in lr] == [128, 32, 8]
    assert lr[0] is surfaces[1] and lr[1] is surfaces[2]
    # the extra coarsest level is a subset of level K-1
    extra = lr[2][0, :, :3]
    assert (extra[:, None, :] == surfaces[2][0, None, :, :3]).all(-1).any(1).all()


def test_learnable_queries_are_separate_per_level():
    model = ShapeVAE(tiny(query_mode="learnable"))
    assert model.encoder.queries["hr"].shape == (32, 64)
    assert model.encoder.queries["lr"].shape == (16, 64)


def test_forward_loss_kl_iou_and_gradients(batch):
    torch.manual_seed(0)
    model = ShapeVAE(tiny())
    out = model(batch, level="hr")
    assert set(out) >= {"loss", "bce", "kl", "logits", "iou"}
    assert torch.isfinite(out["loss"]) and out["kl"] >= 0 and 0 <= out["iou"] <= 1
    assert not out["iou"].requires_grad
    assert out["logits"].shape == batch["occ_labels"].shape
    assert torch.allclose(out["loss"], out["bce"] + 1e-3 * out["kl"])
    out["loss"].backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert no_grad == []


def test_learnable_lr_step_trains_lr_queries_only(batch):
    model = ShapeVAE(tiny(query_mode="learnable"))
    model(batch, level="lr")["loss"].backward()
    assert model.encoder.queries["lr"].grad is not None
    assert model.encoder.queries["hr"].grad is None


def test_near_weight_weights_near_surface_points(batch):
    torch.manual_seed(0)
    model = ShapeVAE(tiny()).eval()
    no_mask = {k: v for k, v in batch.items() if k != "near_mask"}
    with torch.no_grad():
        plain = model(no_mask, sample=False)["bce"]
        same = model(batch, sample=False)["bce"]            # near_weight 1.0 == plain mean
        model.cfg.near_weight = 0.0
        vol_only = model(batch, sample=False)
        logits, labels = vol_only["logits"], batch["occ_labels"]
    assert torch.allclose(plain, same, atol=1e-6)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, :768], labels[:, :768])
    assert torch.allclose(vol_only["bce"], expected, atol=1e-6)


def test_bad_inputs_are_rejected(batch):
    model = ShapeVAE(tiny(hr_tokens=1024))
    with pytest.raises(ValueError, match="needs 1024 tokens"):
        model(batch)
    with pytest.raises(KeyError, match="surface_2"):
        ShapeVAE(tiny())({k: v for k, v in batch.items() if k != "surface_2"})
    with pytest.raises(ValueError, match="level"):
        ShapeVAE(tiny()).encode([batch["surface_0"]] * 3, level="mid")
    with pytest.raises(ValueError, match=r"\[B, n, 6\]"):
        ShapeVAE(tiny()).encode([batch["surface_0"][..., :3]] * 3)


@pytest.mark.parametrize("backend", ["torch", "fpsample"])
def test_farthest_point_sampling_spreads_points(backend):
    line = torch.linspace(0, 1, 101).view(1, -1, 1) * torch.tensor([1.0, 0, 0])
    idx = farthest_point_sample(line.expand(2, -1, -1), 3, backend=backend)
    assert idx.tolist() == [[0, 100, 50], [0, 100, 50]]
    idx = farthest_point_sample(torch.rand(3, 200, 3), 50, start="random", backend=backend)
    assert all(len(set(row.tolist())) == 50 for row in idx)
    # Canonical start: the same order whatever the listing of the points.
    cloud = torch.rand(1, 300, 3)
    perm = torch.randperm(300)
    a = farthest_point_sample(cloud, 20, start="canonical", backend=backend)[0]
    b = farthest_point_sample(cloud[:, perm], 20, start="canonical", backend=backend)[0]
    assert torch.equal(cloud[0, a], cloud[0, perm][b])


def fps_both(xyz: torch.Tensor, k: int, start: str, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(torch loop, ``backend``) indices from the same RNG state (the random start)."""
    torch.manual_seed(7)
    reference = farthest_point_sample(xyz, k, start=start, backend="torch")
    torch.manual_seed(7)
    return reference, farthest_point_sample(xyz, k, start=start, backend=backend)


@pytest.mark.parametrize("start", ["first", "random", "canonical"])
def test_fast_fps_returns_the_torch_loops_indices(start):
    """CPU tensors go to fpsample's exact FPS (``auto``): index for index the torch loop,
    at a tiny and a paper-like (N, K), on strided xyz as the encoder passes them."""
    torch.manual_seed(0)
    for b, n, k in [(4, 1024, 128), (2, 4096, 256)]:
        surface = torch.rand(b, n, 6) * 2 - 1
        reference, fast = fps_both(surface[..., :3], k, start)
        assert fast.dtype == torch.long and fast.shape == (b, k)
        assert torch.equal(fast, reference)


def test_fast_fps_breaks_ties_like_the_torch_loop():
    """On a regular grid most candidates are equally far; both take the first of them."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(6.0)] * 3, indexing="ij"), -1).reshape(1, -1, 3)
    cross = torch.tensor([[[0.0, 0, 0], [1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0]]])
    for cloud, k in [(grid, 60), (cross, 5)]:
        for start in ("first", "canonical"):
            reference, fast = fps_both(cloud, k, start, backend="fpsample")
            assert torch.equal(fast, reference)
    assert farthest_point_sample(cross, 5, backend="fpsample").tolist() == [[0, 1, 2, 3, 4]]


def test_fast_fps_matches_on_a_real_ycb_surface_and_bucket_fps_would_not():
    """A real scanned surface (YCB mug, 4096 points, 256 samples, as the paper's LR
    queries): the same indices, in the same order, as the torch loop. fpsample's faster
    bucket (kd-tree) variant does not give them (it ignores the start index), which is
    why the exact ``fps_sampling`` is the one used."""
    from mar3d.data.mesh_io import load_mesh
    from mar3d.data.sampling import sample_surface

    loaded = load_mesh(ycb_mesh("025_mug"), max_faces=10**7, max_file_bytes=10**9)
    mesh = trimesh.Trimesh(loaded.vertices, loaded.faces, process=False)
    surface = torch.from_numpy(sample_surface(mesh, 4096, np.random.default_rng(0))).unsqueeze(0)
    cloud = surface[..., :3]
    for start in ("random", "canonical"):
        reference, fast = fps_both(cloud, 256, start)
        assert torch.equal(fast, reference)
        assert set(fast[0].tolist()) == set(reference[0].tolist())
    bucket = fpsample.bucket_fps_kdline_sampling(cloud[0].contiguous().numpy(), 256, 7,
                                                 start_idx=int(reference[0, 0]))
    assert bucket.astype(np.int64).tolist() != reference[0].tolist()


def test_fps_rejects_unknown_backend_and_start():
    with pytest.raises(ValueError, match="backend"):
        farthest_point_sample(torch.rand(1, 10, 3), 2, backend="cuda")
    with pytest.raises(ValueError, match="start"):
        farthest_point_sample(torch.rand(1, 10, 3), 2, start="last")


def test_tiny_vae_overfits_one_shape_and_extracts_its_mesh(torus):
    """Real training on CPU (~6 s): one torus, 400 AdamW steps (one-cycle lr) alternating
    HR/LR, fresh occupancy queries each step (as the dataset draws them), then mesh
    extraction from the trained decoder."""
    torch.manual_seed(0)
    steps = 400
    pools = [shape_batch(torus, torus_inside, seed=s, num_vol=1024, num_near=341) for s in range(16)]
    surfaces = {f"surface_{k}": pools[0][f"surface_{k}"] for k in range(3)}
    model = ShapeVAE(tiny(hr_tokens=64, lr_tokens=32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps, pct_start=0.1)
    for step in range(steps):
        batch = {**pools[step % len(pools)], **surfaces}
        loss = model(batch, level="hr" if step % 2 == 0 else "lr")["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    model.eval()
    held_out = {**shape_batch(torus, torus_inside, seed=100), **surfaces}
    with torch.no_grad():
        for level in ("hr", "lr"):
            assert model({**pools[0], **surfaces}, level=level, sample=False)["iou"] > 0.9, level
            assert model(held_out, level=level, sample=False)["iou"] > 0.85, level
        kv = model.decode(model.encode([surfaces[f"surface_{k}"] for k in range(3)], "hr", sample=False))
    fn = latent_occupancy_fn(model, kv)
    dense = extract_mesh(fn, resolution=64, method="dense", return_grid=True)
    fast = extract_mesh(fn, resolution=64, method="hierarchical", return_grid=True)
    a, b = dense.grid > 0, fast.grid > 0
    assert (a & b).sum() / (a | b).sum() >= 0.99
    assert fast.num_queries < dense.num_queries
    # a torus: genus 1, volume near 2 pi^2 R r^2
    assert math.isclose(fast.mesh.volume, 2 * math.pi ** 2 * 0.55 * 0.25 ** 2, rel_tol=0.25)


def test_logvar_init_sets_the_initial_posterior_spread(batch):
    surfaces = [batch[f"surface_{k}"] for k in range(3)]
    torch.manual_seed(0)
    default = ShapeVAE(tiny(logvar_init=0.0)).encode_posterior(surfaces)
    torch.manual_seed(0)
    tight = ShapeVAE(tiny(logvar_init=-4.0)).encode_posterior(surfaces)
    assert abs(default.logvar.mean().item()) < 1.0  # PyTorch's default bias init: about 0
    assert tight.logvar.mean().item() == pytest.approx(-4.0, abs=1.0)
    with pytest.raises(ValueError, match="logvar_init"):
        tiny(logvar_init=-40.0)


def test_latent_stats_are_summable_across_batches_and_ranks(batch):
    """Sums of two halves (as two ranks would all-reduce them) give the statistics of the
    whole; shift/std match a direct computation on the same posterior samples."""
    from mar3d.models.vae import latent_stats_from_sums, latent_sums

    vae = ShapeVAE(tiny()).eval()
    surfaces = [batch[f"surface_{k}"] for k in range(3)]
    halves = [[s[:1] for s in surfaces], [s[1:] for s in surfaces]]
    torch.manual_seed(0)
    parts = [latent_sums(vae, h, "hr") for h in halves]
    torch.manual_seed(0)
    means, samples = [], []
    for h in halves:
        post = vae.encode_posterior(h, "hr")
        means.append(post.mean.double())
        samples.append(post.sample().double())
    stats = latent_stats_from_sums(parts[0] + parts[1])
    mean, sample = torch.cat(means), torch.cat(samples)
    assert stats["shift"] == pytest.approx(mean.mean().item(), rel=1e-6)
    assert stats["std_mean"] == pytest.approx(mean.std(unbiased=False).item(), rel=1e-5)
    assert stats["std_sample"] == pytest.approx((sample - mean.mean()).pow(2).mean().sqrt().item(), rel=1e-5)
    assert stats["std_sample"] > stats["std_mean"]  # samples add the posterior's own spread
    with pytest.raises(ValueError, match="no latents"):
        latent_stats_from_sums(torch.zeros(5, dtype=torch.float64))
