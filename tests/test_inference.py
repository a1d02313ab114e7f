import io

import numpy as np
import pytest
import trimesh
from PIL import Image

from mar3d.inference import InvalidImageError, MAR3DPipeline, MAR3DPipelineOutput, PipelineConfig, load_image
from mar3d.models.mar import SamplingConfig

from _tiny_release import write_tiny_release

FAST = dict(sampling=SamplingConfig(num_inference_steps=4, diffusion_steps=5), resolution=32)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return write_tiny_release(tmp_path_factory.mktemp("release"))


def _rgba(seed=0, size=64):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (size, size, 4), dtype=np.uint8)
    img[..., 3] = 255
    return img


def _pipe(release, **kw):
    cfg = PipelineConfig(**{**FAST, **kw})
    return MAR3DPipeline.from_pretrained(str(release), config=cfg, device="cpu")


def test_pipeline_generates_mesh_reproducibly(release):
    pipe = _pipe(release)
    out1 = pipe(_rgba(), seed=3)
    out2 = pipe(_rgba(), seed=3)
    out3 = pipe(_rgba(), seed=4)
    assert isinstance(out1, MAR3DPipelineOutput) and out1.level == "hr"
    assert tuple(out1.latents.shape) == (1, pipe.vae.cfg.hr_tokens, pipe.vae.cfg.latent_channels)
    assert np.array_equal(out1.latents.numpy(), out2.latents.numpy())
    assert not np.array_equal(out1.latents.numpy(), out3.latents.numpy())
    assert len(out1.meshes) == 1 and isinstance(out1.meshes[0], trimesh.Trimesh)
    assert len(out1.decode_seconds) == len(out1.num_queries) == 1 and out1.sample_seconds > 0


def test_call_arguments_override_the_config_and_the_models_defaults(release):
    """diffusers' names: num_inference_steps and guidance_scale per call, over the
    pipeline config's sampling, over each model's own defaults; bad values are refused
    before any work; output_type="latent" decodes nothing."""
    pipe = _pipe(release, use_hr=False)
    assert pipe.lr.mar.cfg.sampling.num_inference_steps == 16  # the tiny model's own
    steps = []
    original = pipe.lr.mar._sample
    pipe.lr.mar._sample = lambda cond, s, *a: steps.append(s) or original(cond, s, *a)
    pipe(_rgba(), output_type="latent")
    pipe(_rgba(), num_inference_steps=2, guidance_scale=1.5, output_type="latent")
    assert [(s.num_inference_steps, s.guidance_scale, s.diffusion_steps) for s in steps] == [
        (4, 3.0, 5), (2, 1.5, 5)]
    out = pipe([_rgba(0), _rgba(1)], num_inference_steps=2, output_type="latent")
    assert out.meshes is None and out.latents.shape[0] == 2 and len(out.split()) == 2
    for bad, match in [(dict(guidance_scale=0.5), "guidance_scale must be >= 1"),
                       (dict(num_inference_steps=0), "num_inference_steps must be >= 1"),
                       (dict(output_type="pil"), "output_type")]:
        with pytest.raises(ValueError, match=match):
            pipe(_rgba(), **bad)
    assert len(steps) == 3


def test_lr_only_path(release):
    pipe = _pipe(release, use_hr=False)
    assert pipe.hr is None
    out = pipe(_rgba(), seed=0, output_type="latent")
    assert out.level == "lr" and out.latents.shape[1] == pipe.vae.cfg.lr_tokens


def test_single_stage_model_generates_hr_latents_alone(tmp_path):
    # The paper's "joint" ablation: one MAR generates the HR token set from the image.
    joint = write_tiny_release(tmp_path / "joint", lr_overrides=("latents=hr", "seq_len=128"))
    with pytest.raises(ValueError, match="no MAR-HR after it"):
        _pipe(joint)
    pipe = _pipe(joint, use_hr=False)
    assert pipe.output_level == "hr"
    out = pipe(_rgba(), seed=0, output_type="latent")
    assert out.level == "hr" and out.latents.shape[1] == pipe.vae.cfg.hr_tokens == 128
    wrong = write_tiny_release(tmp_path / "wrong", lr_overrides=("latents=hr",))  # 64 tokens
    with pytest.raises(ValueError, match="mar.seq_len=64 but the VAE's hr latents have 128 tokens"):
        _pipe(wrong, use_hr=False)


def test_release_folder_must_hold_vae_and_lr(release, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        MAR3DPipeline.from_pretrained(str(tmp_path))


def _png_bytes(arr, mode=None):
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def test_load_image_accepts_common_modes(tmp_path):
    rgb = np.zeros((40, 50, 3), np.uint8)
    assert load_image(rgb).shape == (40, 50, 4)
    assert load_image(_png_bytes(rgb)).shape == (40, 50, 4)
    path = tmp_path / "a.png"
    Image.fromarray(rgb[..., 0]).save(path)
    assert load_image(path)[..., 3].min() == 255


@pytest.mark.parametrize("make,match", [
    (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n garbage"), "unreadable"),
    (lambda p: Image.new("RGB", (1, 1)).save(p, format="PNG"), "at least"),
    (lambda p: Image.new("CMYK", (64, 64)).save(p, format="JPEG"), "mode"),
    (lambda p: Image.fromarray(np.zeros((64, 64), np.uint16)).save(p, format="PNG"), "mode"),
    (lambda p: Image.new("RGB", (64, 64)).save(p, format="GIF", save_all=True,
                                               append_images=[Image.new("RGB", (64, 64), "red")]), "animated"),
    (lambda p: None, "does not exist"),
])
def test_load_image_refuses_bad_inputs(tmp_path, make, match):
    path = tmp_path / "bad.img"
    make(path)
    with pytest.raises(InvalidImageError, match=match):
        load_image(path)


def test_decompression_bomb_refused(tmp_path):
    path = tmp_path / "big.png"
    Image.new("L", (300, 300)).save(path)
    with pytest.raises(InvalidImageError, match="limit|too large"):
        load_image(path, PipelineConfig(max_image_pixels=200 * 200))


def _mesh_distance(a, b) -> float:
    """Symmetric Chamfer distance between two meshes' vertex sets."""
    from scipy.spatial import cKDTree

    return float(cKDTree(a.vertices).query(b.vertices)[0].mean() + cKDTree(b.vertices).query(a.vertices)[0].mean())


def test_batch_items_match_items_sampled_alone(release):
    """An item's tokens and mesh do not depend on its batch mates: one generator per item."""
    pipe = _pipe(release)
    images, seeds = [_rgba(0), _rgba(1), _rgba(2, size=80)], [3, 8, 5]  # mixed sizes too
    batch = pipe(images, seed=seeds).split()
    other = pipe([_rgba(7), images[1]], seed=[0, 8]).split()[1]  # item 1 with another batch mate
    assert len(batch) == 3 and all(b.level == "hr" for b in batch)
    for image, seed, out in zip(images, seeds, batch):
        alone = pipe(image, seed=seed)
        np.testing.assert_allclose(out.latents.numpy(), alone.latents.numpy(), rtol=0, atol=1e-4)
        assert len(out.meshes[0].vertices) == len(alone.meshes[0].vertices) > 0
        assert _mesh_distance(out.meshes[0], alone.meshes[0]) < 1e-4
    np.testing.assert_allclose(other.latents.numpy(), batch[1].latents.numpy(), rtol=0, atol=1e-4)
    assert not np.allclose(batch[0].latents.numpy(), batch[1].latents.numpy())


def test_batch_seeds_and_generators(release):
    """An int seed gives item i seed + i; per-item generators (diffusers style) are the
    same as their seeds; a single generator for a batch derives one child per item."""
    import torch

    pipe = _pipe(release, use_hr=False)
    images = [_rgba(0), _rgba(1)]
    def latents(**kw):
        return pipe(images, output_type="latent", **kw).latents

    by_int = latents(seed=10)
    by_list = latents(seed=[10, 11])
    by_gens = latents(generator=[torch.Generator().manual_seed(s) for s in (10, 11)])
    assert tuple(by_int.shape) == (2, pipe.vae.cfg.lr_tokens, pipe.vae.cfg.latent_channels)
    np.testing.assert_allclose(by_int.numpy(), by_list.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(by_int.numpy(), by_gens.numpy(), rtol=0, atol=1e-5)
    one_a = latents(generator=torch.Generator().manual_seed(1))
    one_b = latents(generator=torch.Generator().manual_seed(1))
    assert np.array_equal(one_a.numpy(), one_b.numpy())
    assert isinstance(pipe(images[0], seed=10).meshes[0], trimesh.Trimesh)
    assert len(pipe(images, seed=10).meshes) == 2
    with pytest.raises(ValueError, match="one per image"):
        latents(seed=[1, 2, 3])
    with pytest.raises(ValueError, match="one per image"):
        latents(generator=[torch.Generator()])


def test_kv_selection_with_every_token_gives_the_same_mesh(release):
    exact = _pipe(release)
    tokens = exact(_rgba(), seed=3, output_type="latent").latents
    every = _pipe(release, kv_top_k=exact.vae.cfg.hr_tokens, kv_block=256, kv_score_queries=8)
    assert exact.config.kv_select() is None
    assert every.config.kv_select().top_k == exact.vae.cfg.hr_tokens
    reference, selected = exact.decode(tokens), every.decode(tokens)
    assert len(selected.mesh.faces) == len(reference.mesh.faces) > 0
    assert selected.num_queries == reference.num_queries
    assert _mesh_distance(selected.mesh, reference.mesh) < 1e-4
    points = np.random.default_rng(0).uniform(-1, 1, (2000, 3)).astype(np.float32)
    np.testing.assert_allclose(every.occupancy(tokens, points), exact.occupancy(tokens, points), atol=1e-4)
    few = _pipe(release, kv_top_k=4, kv_block=256, kv_score_queries=8)
    assert not np.allclose(few.occupancy(tokens, points), exact.occupancy(tokens, points), atol=1e-4)


@pytest.mark.parametrize("bad,match", [(dict(kv_top_k=0), "top_k"), (dict(kv_top_k=8, kv_block=0), "block"),
                                       (dict(kv_block=16, kv_score_queries=32), "score_queries")])
def test_kv_selection_settings_are_validated(bad, match):
    with pytest.raises(ValueError, match=f"kv_top_k / kv_block / kv_score_queries: .*{match}"):
        PipelineConfig(**bad).validate()
