"""Image -> mesh inference: ``MAR3DPipeline`` in the diffusers style.

    pipe = MAR3DPipeline.from_pretrained("models:/mar3d@champion")   # or a local folder
    mesh = pipe(image, num_inference_steps=64, guidance_scale=3.0).meshes[0]
    out = pipe([im0, im1, im2], seed=0)                 # one batch -> out.meshes, out.latents

The cascade: the release's frozen image encoder (CLIP + DINOv2, run once per image) ->
each stage's condition projection -> MAR-LR samples LR latent tokens ->
MAR-HR samples HR tokens conditioned on the image and the LR tokens (skipped with
``use_hr=False``) -> the frozen Pyramid VAE decodes the tokens into an occupancy field
-> marching cubes (hierarchical by default). Weights come only from safetensors folders
(``mar3d.weights``); nothing is unpickled.

Reproducibility: one ``torch.Generator`` per image (seeded with its seed, or given
diffusers style) drives all of that image's sampling, so the same image, seed and
settings give the same mesh, whatever else is generated in the same process and whatever
batch the image is sampled in (up to float summation order in batched matrix products).
"""
from __future__ import annotations

import dataclasses
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
import trimesh

from mar3d.config import from_dict
from mar3d.geometry.extract import ExtractionResult, extract_mesh, latent_occupancy_fn
from mar3d.models.attention import KVSelect
from mar3d.models.condition import (ConditionConfig, EncoderFeatures, EncoderSpec, ImageEncoder,
                                    encoder_config, encoder_differences)
from mar3d.models.mar import ConditionalMAR, MARConfig, SamplingConfig
from mar3d.models.rng import Generators
from mar3d.models.vae import ShapeVAE, VAEConfig
from mar3d.weights import content_id, load_model_dir, save_model_dir


class InvalidImageError(ValueError):
    """An input image that cannot be used as a condition (corrupt, tiny, wrong mode...)."""


@dataclass
class PipelineConfig:
    """How a :class:`MAR3DPipeline` samples and extracts meshes.

    ``sampling`` holds overrides of the models' own sampling defaults (None: the model's);
    a call's arguments override both."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    use_hr: bool = True                   # False: LR tokens only (the --no-hr path)
    resolution: int = 128                 # marching-cubes cells per axis
    extraction: Literal["hierarchical", "dense"] = "hierarchical"
    query_batch_size: int = 65536
    # Adaptive KV selection (FlashVDM): blocks of kv_block nearby query points attend only
    # to the kv_top_k latent tokens that kv_score_queries of their points rank highest.
    # None: exact decoding; >= the VAE's token count: exact too (same mesh).
    kv_top_k: int | None = None
    kv_block: int = 1024
    kv_score_queries: int = 32
    remove_small_components: float | None = 0.01  # drop floaters below this face fraction
    min_image_side: int = 32
    max_image_pixels: int = 4096 * 4096

    def validate(self) -> None:
        self.sampling.validate()
        if not 16 <= self.resolution <= 1024:
            raise ValueError(f"resolution must be in [16, 1024], got {self.resolution}")
        if self.query_batch_size < 1024:
            raise ValueError(f"query_batch_size must be >= 1024, got {self.query_batch_size}")
        if self.min_image_side < 1 or self.max_image_pixels < self.min_image_side ** 2:
            raise ValueError("need 1 <= min_image_side and max_image_pixels >= min_image_side**2")
        try:  # KVSelect's own checks, also for the block settings when kv_top_k is None
            KVSelect(1 if self.kv_top_k is None else self.kv_top_k, self.kv_block, self.kv_score_queries)
        except ValueError as e:
            raise ValueError(f"kv_top_k / kv_block / kv_score_queries: {e}") from None

    def kv_select(self) -> KVSelect | None:
        """The decoder's KV selection, None for exact decoding."""
        return None if self.kv_top_k is None else KVSelect(self.kv_top_k, self.kv_block, self.kv_score_queries)


def load_image(source: Any, cfg: PipelineConfig | None = None) -> np.ndarray:
    """A path, bytes, PIL image or array -> RGBA uint8 [H, W, 4], validated.

    Accepts 8-bit L/LA/RGB/RGBA/P images (converted to RGBA); refuses 16-bit or float
    data, CMYK, animations, images smaller than ``min_image_side`` or larger than
    ``max_image_pixels`` (decompression bombs), with an :class:`InvalidImageError`."""
    from PIL import Image, UnidentifiedImageError

    cfg = cfg or PipelineConfig()
    if isinstance(source, np.ndarray) or torch.is_tensor(source):
        arr = np.asarray(source.cpu() if torch.is_tensor(source) else source)
        if arr.dtype != np.uint8:
            raise InvalidImageError(f"image array must be uint8, got {arr.dtype}")
        if arr.ndim == 2:
            arr = np.stack([arr] * 3 + [np.full_like(arr, 255)], axis=-1)
        if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
            raise InvalidImageError(f"image array must be [H,W], [H,W,3] or [H,W,4], got {arr.shape}")
        if arr.shape[-1] == 3:
            arr = np.concatenate([arr, np.full(arr.shape[:2] + (1,), 255, np.uint8)], axis=-1)
        _check_size(arr.shape[1], arr.shape[0], cfg)
        return np.array(arr, copy=True, order="C")  # writable: torch.from_numpy needs it
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise InvalidImageError(f"image file {path} does not exist")
        data: Any = path
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = io.BytesIO(bytes(source))
    elif isinstance(source, Image.Image):
        data = None
    else:
        raise InvalidImageError(f"unsupported image input of type {type(source).__name__}")
    Image.MAX_IMAGE_PIXELS = cfg.max_image_pixels
    try:
        im = source if data is None else Image.open(data)
        _check_size(im.width, im.height, cfg)
        if getattr(im, "n_frames", 1) > 1:
            raise InvalidImageError(f"animated image with {im.n_frames} frames; give one frame")
        if im.mode not in ("1", "L", "LA", "P", "PA", "RGB", "RGBA"):
            raise InvalidImageError(f"unsupported image mode {im.mode!r} (need 8-bit L/LA/P/RGB/RGBA; "
                                    "16-bit, float and CMYK images are refused)")
        im.load()
        return np.asarray(im.convert("RGBA")).copy()
    except InvalidImageError:
        raise
    except Image.DecompressionBombError as e:
        raise InvalidImageError(f"image too large: {e}") from e
    except UnidentifiedImageError:
        what = f"{source}" if isinstance(source, (str, Path)) else f"{len(bytes(source))} bytes"
        raise InvalidImageError(f"unreadable image: {what} in no format Pillow reads "
                                "(PNG, JPEG, WebP, BMP, TIFF, GIF, ...)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise InvalidImageError(f"unreadable image: {e}") from e


def _check_size(width: int, height: int, cfg: PipelineConfig) -> None:
    if min(width, height) < cfg.min_image_side:
        raise InvalidImageError(f"image is {width}x{height}; the smaller side must be at least "
                                f"{cfg.min_image_side} px")
    if width * height > cfg.max_image_pixels:
        raise InvalidImageError(f"image is {width}x{height} = {width * height} px, over the "
                                f"limit of {cfg.max_image_pixels}")


def as_image_list(images: Any) -> list:
    """A list/tuple of images (a batch) as a list; one image (an array, PIL, path...) as a
    list of one."""
    if not isinstance(images, (list, tuple)):
        return [images]
    if not images:
        raise ValueError("no images given")
    return list(images)


def _device(device: str | torch.device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_vae(directory: str | Path, device: str | torch.device = "cpu") -> tuple[ShapeVAE, dict[str, Any]]:
    """The VAE of a model folder, frozen and in eval mode, and the ``extra`` data saved
    with it (``latent_stats``, the ``surface_sizes`` it was trained on, ...)."""
    state, doc = load_model_dir(directory, kind="vae")
    vae = ShapeVAE(from_dict(VAEConfig, doc["model"]))
    vae.load_state_dict(state)
    return vae.requires_grad_(False).eval().to(device), dict(doc.get("extra") or {})


def load_frozen_vae(uri: str, tracking_uri: str | None,
                    device: str | torch.device = "cpu") -> tuple[ShapeVAE, dict[str, Any]]:
    """:func:`load_vae` of a model URI (a folder, ``runs:/..`` or ``models:/..``)."""
    from mar3d.registry import resolve_model_dir

    return load_vae(resolve_model_dir(uri, tracking_uri), device)


def check_vae_fits_mar(vae_cfg: VAEConfig, mar_cfg: MARConfig) -> None:
    """A MAR model (LR or HR) must produce exactly the VAE's latents: same channels,
    same token counts. Checked before training and when a release is loaded."""
    level = mar_cfg.target_level
    tokens = vae_cfg.hr_tokens if level == "hr" else vae_cfg.lr_tokens
    problems = []
    if mar_cfg.token_dim != vae_cfg.latent_channels:
        problems.append(f"mar.token_dim={mar_cfg.token_dim} but the VAE has "
                        f"latent_channels={vae_cfg.latent_channels}")
    if mar_cfg.seq_len != tokens:
        problems.append(f"mar.seq_len={mar_cfg.seq_len} but the VAE's {level} latents "
                        f"have {tokens} tokens")
    if mar_cfg.stage == "hr" and mar_cfg.lr_seq_len != vae_cfg.lr_tokens:
        problems.append(f"mar.lr_seq_len={mar_cfg.lr_seq_len} but the VAE's LR latents have "
                        f"{vae_cfg.lr_tokens} tokens")
    if problems:
        raise ValueError("MAR config does not fit the frozen VAE: " + "; ".join(problems))


def save_conditioner(encoder: ImageEncoder, directory: str | Path,
                     extra: dict[str, Any] | None = None) -> str:
    """Write the frozen image encoder as a model folder of kind ``cond``; returns its
    ``conditioner_id`` (content hash of the weights, also stored in config.yaml)."""
    state = encoder.state_dict()
    conditioner_id = content_id(state)
    save_model_dir(directory, state, {"condition": encoder_config(encoder.cfg),
                                      "encoder": dataclasses.asdict(encoder.spec)},
                   kind="cond", extra={"conditioner_id": conditioner_id, **(extra or {})})
    return conditioner_id


def encoder_from_state(cfg: ConditionConfig, state: dict[str, torch.Tensor],
                       device: str | torch.device = "cpu") -> ImageEncoder:
    """An :class:`ImageEncoder` holding ``state``: the towers are built on the meta device
    (no random init, no pretrained download) and take the given tensors."""
    with torch.device("meta"):
        encoder = ImageEncoder(dataclasses.replace(cfg, clip_pretrained=None, dino_pretrained=None))
    encoder.load_state_dict(state, assign=True)
    encoder.cfg = cfg  # remember where the weights came from
    return encoder.requires_grad_(False).eval().to(device)


def load_conditioner(directory: str | Path,
                     device: str | torch.device = "cpu") -> tuple[ImageEncoder, str]:
    """The shared image encoder of a ``cond`` model folder and its ``conditioner_id``;
    weights that do not hash to the recorded id are refused."""
    state, doc = load_model_dir(directory, kind="cond")
    recorded = (doc.get("extra") or {}).get("conditioner_id")
    actual = content_id(state)
    if recorded != actual:
        raise ValueError(f"{directory}: conditioner weights hash to {actual}, but the folder records "
                         f"conditioner_id {recorded!r}: the folder is damaged or was edited")
    return encoder_from_state(from_dict(ConditionConfig, doc["model"]["condition"]), state, device), actual


def load_frozen_conditioner(uri: str, expected: ConditionConfig, tracking_uri: str | None,
                            device: str | torch.device = "cpu") -> tuple[ImageEncoder, str]:
    """:func:`load_conditioner` of a model URI, refused unless it is the encoder that the
    ``expected`` condition config describes (a stage trained on another encoder than its
    config says would be a silent mix-up)."""
    from mar3d.registry import resolve_model_dir

    encoder, conditioner_id = load_conditioner(resolve_model_dir(uri, tracking_uri), device)
    differences = encoder_differences(expected, encoder.cfg)
    if differences:
        raise ValueError(f"conditioner {uri} is not the image encoder this config describes ("
                         + "; ".join(differences) + "): give the matching condition settings, or "
                         "leave condition_model_uri empty to build one from them")
    return encoder, conditioner_id


@dataclass
class LoadedStage:
    """A MAR model folder: the model and the id of the conditioner it was trained with."""
    model: ConditionalMAR
    conditioner_id: str


def load_mar(directory: str | Path, kind: str, device: str | torch.device = "cpu") -> LoadedStage:
    """A MAR-LR / MAR-HR model folder (the frozen image encoder is the release's ``cond/``)."""
    state, doc = load_model_dir(directory, kind=kind)
    model_doc = doc["model"]
    conditioner_id = (doc.get("extra") or {}).get("conditioner_id")
    if "encoder" not in model_doc or not conditioner_id:
        raise ValueError(f"{directory}: a {kind} model folder must record model.encoder and "
                         "extra.conditioner_id; it was not written by mar3d")
    model = ConditionalMAR(from_dict(ConditionConfig, model_doc["condition"]),
                           from_dict(MARConfig, model_doc["mar"]), EncoderSpec(**model_doc["encoder"]))
    model.load_state_dict(state)
    return LoadedStage(model.requires_grad_(False).eval().to(device), conditioner_id)


def release_encoder(stages: dict[str, LoadedStage], cond_dir: Path | None,
                    device: str | torch.device = "cpu") -> ImageEncoder:
    """The release's conditioner (``cond/``), refused unless every stage was trained with it."""
    if cond_dir is None:
        raise ValueError("this release has no conditioner (cond/): its MAR models cannot be fed")
    encoder, conditioner_id = load_conditioner(cond_dir, device)
    for name, stage in stages.items():
        if stage.conditioner_id != conditioner_id:
            raise ValueError(f"MAR-{name.upper()} was trained with image encoder {stage.conditioner_id}, "
                             f"but its conditioner is {conditioner_id}: this release mixes models of "
                             "different conditioners")
    return encoder


def resolve_component_dirs(uri: str, tracking_uri: str | None = None) -> dict[str, Path]:
    """``models:/NAME@ALIAS`` / ``models:/NAME/VERSION`` of a release, or a local folder
    with ``vae/``, ``cond/`` (the shared image encoder), ``lr/`` and optionally ``hr/``
    model folders -> component -> folder."""
    from mar3d.registry import download_release, get_release
    from mar3d.uris import validate_model_uri

    uri = validate_model_uri(uri)
    if uri.startswith("models:/"):
        return download_release(get_release(uri, tracking_uri), tracking_uri=tracking_uri)
    if uri.startswith("runs:/"):
        raise ValueError(f"{uri}: a run holds one component; give a release (models:/NAME@ALIAS) "
                         "or a folder with vae/, lr/ and hr/")
    root = Path(uri)
    dirs = {c: root / c for c in ("vae", "cond", "lr", "hr") if (root / c).is_dir()}
    missing = {"vae", "lr"} - set(dirs)
    if missing:
        raise FileNotFoundError(f"{root} is not a mar3d release folder: missing {sorted(missing)} "
                                "(expected vae/, cond/, lr/ and optionally hr/ model folders)")
    return dirs


@dataclass
class MAR3DPipelineOutput:
    """What one :class:`MAR3DPipeline` call returns: one entry per image, in input order
    (one image is a batch of one)."""
    meshes: list[trimesh.Trimesh] | None  # None with output_type="latent"
    latents: torch.Tensor                 # the decoded stage's VAE latents [B, T, C]
    level: str                            # that stage: "hr" or "lr"
    sample_seconds: float                 # sampling the whole batch
    decode_seconds: list[float] = field(default_factory=list)  # per mesh
    num_queries: list[int] = field(default_factory=list)       # decoder queries per mesh

    def split(self) -> list["MAR3DPipelineOutput"]:
        """One output per image; each carries an even share of the batch's sampling time."""
        n = len(self.latents)
        return [MAR3DPipelineOutput(
            meshes=None if self.meshes is None else [self.meshes[i]], latents=self.latents[i:i + 1],
            level=self.level, sample_seconds=self.sample_seconds / n,
            decode_seconds=self.decode_seconds[i:i + 1], num_queries=self.num_queries[i:i + 1])
            for i in range(n)]


class MAR3DPipeline:
    """The whole cascade for inference; construct with :meth:`from_pretrained`.

    ``encoder`` is the frozen image encoder both stages were trained with: each image is
    encoded once and its features feed MAR-LR and MAR-HR."""

    def __init__(self, vae: ShapeVAE, encoder: ImageEncoder, lr: ConditionalMAR,
                 hr: ConditionalMAR | None, config: PipelineConfig | None = None,
                 device: str | torch.device = "cpu", vae_surface_sizes: list[int] | None = None):
        self.config = config or PipelineConfig()
        self.config.validate()
        self.device = _device(device)
        # Points per pyramid level the VAE was trained on (None: unknown); encoding a
        # ground-truth surface for reconstruction uses subsets of these sizes.
        self.vae_surface_sizes = list(vae_surface_sizes) if vae_surface_sizes else None
        self.vae, self.lr, self.hr = vae.to(self.device), lr.to(self.device), hr.to(self.device) if hr else None
        self.encoder = encoder.to(self.device)
        self._check_shapes()

    def _check_shapes(self) -> None:
        if self.hr is not None and self.lr.mar.cfg.target_level != "lr":
            raise ValueError("the first stage generates HR latents itself (mar.latents: hr, the "
                             "single-stage ablation): it has no MAR-HR after it; load it with use_hr=False")
        for model in (self.lr, self.hr):
            if model is not None:
                check_vae_fits_mar(self.vae.cfg, model.mar.cfg)
                if model.conditioner.spec != self.encoder.spec:
                    raise ValueError(f"MAR-{model.mar.cfg.stage.upper()} was built for encoder features "
                                     f"{model.conditioner.spec}, the encoder gives {self.encoder.spec}")

    @classmethod
    def from_pretrained(cls, uri: str, config: PipelineConfig | None = None, device: str = "auto",
                        tracking_uri: str | None = None, use_hr: bool | None = None) -> "MAR3DPipeline":
        return cls.from_folders(resolve_component_dirs(uri, tracking_uri), config, device, use_hr, source=uri)

    @classmethod
    def from_folders(cls, dirs: dict[str, str | Path], config: PipelineConfig | None = None,
                     device: str = "auto", use_hr: bool | None = None,
                     source: str | None = None) -> "MAR3DPipeline":
        """The pipeline of a release's model folders (component -> folder: ``vae``,
        ``cond``, ``lr`` and optionally ``hr``), wherever they were put."""
        dirs = {c: Path(d) for c, d in dirs.items()}
        missing = {"vae", "lr"} - set(dirs)
        if missing:
            raise FileNotFoundError(f"{source or 'the release'} lacks the {sorted(missing)} model folder(s)")
        config = dataclasses.replace(config) if config else PipelineConfig()  # never mutate the caller's
        if use_hr is not None:
            config.use_hr = use_hr
        dev = _device(device)
        stages = {"lr": load_mar(dirs["lr"], "lr", dev)}
        if config.use_hr and "hr" in dirs:
            stages["hr"] = load_mar(dirs["hr"], "hr", dev)
        elif config.use_hr:
            raise FileNotFoundError(f"{source or 'the release'} has no MAR-HR model; pass use_hr=False "
                                    "for LR-only generation")
        encoder = release_encoder(stages, dirs.get("cond"), dev)
        vae, vae_extra = load_vae(dirs["vae"], dev)
        hr = stages.get("hr")
        return cls(vae, encoder, stages["lr"].model, hr.model if hr else None, config, dev,
                   vae_surface_sizes=vae_extra.get("surface_sizes"))

    @property
    def uses_hr(self) -> bool:
        return self.config.use_hr and self.hr is not None

    @property
    def output_level(self) -> str:
        """The VAE latents a call returns by default: ``"hr"`` after MAR-HR, else those
        the first stage generates (``"lr"``, or ``"hr"`` for a single-stage model)."""
        return "hr" if self.uses_hr else self.lr.mar.cfg.target_level

    def check_settings(self, resolution: int | None = None, **sampling) -> SamplingConfig:
        """Refuse a call's settings before any work (ValueError): its sampling settings over
        the pipeline's, and its marching-cubes resolution; returns the sampling settings."""
        if resolution is not None:
            dataclasses.replace(self.config, resolution=resolution).validate()
        return self.sampling_config(**sampling)

    def sampling_config(self, **overrides) -> SamplingConfig:
        """The pipeline's sampling settings with a call's (not None) on top."""
        sampling = SamplingConfig(**overrides).over(self.config.sampling)
        sampling.validate()
        return sampling

    def item_generators(self, count: int, seed: int | Sequence[int] = 0,
                        generator: Generators = None) -> list[torch.Generator]:
        """One generator per item, so every item samples as if it were alone.

        ``generator``: one per item (diffusers style), or a single one, used as is for one
        item and, for several, drawing one child seed per item. Without it ``seed`` is one
        seed per item, or an int: item i of the batch gets ``seed + i`` (so mesh i of
        ``pipe(images, seed=s)`` is the mesh of ``pipe(images[i], seed=s + i)``)."""
        if isinstance(generator, torch.Generator):
            if count == 1:
                return [generator]
            children = torch.randint(0, 2 ** 62, (count,), generator=generator, device=generator.device)
            seed, generator = [int(c) for c in children], None
        if generator is not None:
            gens = list(generator)
            if len(gens) != count:
                raise ValueError(f"got {len(gens)} generators for {count} images: give one per image")
            return gens
        seeds = [int(seed) + i for i in range(count)] if np.ndim(seed) == 0 else [int(x) for x in seed]
        if len(seeds) != count:
            raise ValueError(f"got {len(seeds)} seeds for {count} images: give one per image or one int")
        return [torch.Generator(device=self.device).manual_seed(x) for x in seeds]

    @torch.no_grad()
    def encode(self, rgba: Any) -> EncoderFeatures:
        """RGBA uint8 images [B, H, W, 4] (or a list of [H, W, 4]) -> encoder features."""
        return self.encoder.encode(rgba)

    @torch.no_grad()
    def sample_lr(self, features: EncoderFeatures, generator: Generators, **sampling) -> torch.Tensor:
        """MAR-LR: encoder features (:meth:`encode`) -> LR VAE latents. ``sampling``:
        :class:`SamplingConfig` settings over the pipeline's."""
        tokens = self.lr.sample(features, generator=generator, **self.sampling_config(**sampling).overrides())
        return self.lr.mar.denormalize(tokens)

    @torch.no_grad()
    def sample_hr(self, features: EncoderFeatures, lr_latents: torch.Tensor, generator: Generators,
                  **sampling) -> torch.Tensor:
        """MAR-HR: encoder features + LR VAE latents -> HR VAE latents."""
        if self.hr is None:
            raise ValueError("this pipeline has no MAR-HR model")
        tokens = self.hr.sample(features, lr_tokens=self.hr.mar.normalize_lr(lr_latents),
                                generator=generator, **self.sampling_config(**sampling).overrides())
        return self.hr.mar.denormalize(tokens)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, resolution: int | None = None) -> ExtractionResult:
        kv = self.vae.decode(tokens.to(self.device).float())
        c = self.config
        return extract_mesh(latent_occupancy_fn(self.vae, kv, kv_select=c.kv_select()),
                            resolution=resolution or c.resolution,
                            batch_size=c.query_batch_size, method=c.extraction,
                            remove_small_components=c.remove_small_components)

    @torch.no_grad()
    def occupancy(self, tokens: torch.Tensor, points: np.ndarray) -> np.ndarray:
        """Decoder logits of one shape's tokens at ``points`` [N, 3]."""
        kv = self.vae.decode(tokens.to(self.device).float())
        return latent_occupancy_fn(self.vae, kv, kv_select=self.config.kv_select())(points)

    @torch.no_grad()
    def __call__(self, images: Any, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, generator: Generators = None,
                 seed: int | Sequence[int] = 0, temperature: float | None = None,
                 diffusion_steps: int | None = None, timestep_spacing: str | None = None,
                 use_hr: bool | None = None, resolution: int | None = None,
                 output_type: Literal["mesh", "latent"] = "mesh") -> MAR3DPipelineOutput:
        """One image (path, bytes, PIL or uint8 array) or a list, sampled as one batch ->
        :class:`MAR3DPipelineOutput` with one mesh per image.

        Sampling settings left None are the pipeline config's, else the models' own.
        Randomness: ``generator`` (one per image, or one for all), else ``seed`` (see
        :meth:`item_generators`); an item's mesh does not depend on its batch mates.
        Each image is encoded once; its features condition both stages. Each MAR model
        samples in its own normalized token space; the tokens are mapped back to VAE
        latents with the statistics stored in its config (and, for MAR-HR, the LR latents
        into its prefix space). ``output_type="latent"``: latents only, nothing decoded."""
        if output_type not in ("mesh", "latent"):
            raise ValueError(f"output_type must be 'mesh' or 'latent', got {output_type!r}")
        sampling = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                        temperature=temperature, diffusion_steps=diffusion_steps,
                        timestep_spacing=timestep_spacing)
        self.check_settings(resolution, **sampling)
        t0 = time.perf_counter()
        rgba = [load_image(im, self.config) for im in as_image_list(images)]
        gens = self.item_generators(len(rgba), seed, generator)
        features = self.encode(rgba)
        latents = self.sample_lr(features, gens, **sampling)
        level = self.lr.mar.cfg.target_level
        if (self.uses_hr if use_hr is None else use_hr):
            latents, level = self.sample_hr(features, latents, gens, **sampling), "hr"
        out = MAR3DPipelineOutput(meshes=None, latents=latents, level=level,
                                  sample_seconds=time.perf_counter() - t0)
        if output_type == "mesh":
            extractions = [self.decode(item, resolution) for item in latents.split(1)]
            out.meshes = [e.mesh for e in extractions]
            out.decode_seconds = [e.seconds for e in extractions]
            out.num_queries = [e.num_queries for e in extractions]
        return out
