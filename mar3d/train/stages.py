"""Training stages: what differs between training the VAE, MAR-LR and MAR-HR.

The loop (:mod:`mar3d.train.loop`) owns everything generic -- DeepSpeed, data, schedule,
EMA, checkpoints, metrics. A stage only says which module is trained, how a batch
becomes a loss, how to evaluate, and what goes into the saved model's config:

* :class:`VAEStage` trains the shape VAE; each step uses HR or LR latents
  (``vae_level``: alternate by default, so the one decoder learns both token counts).
* :class:`MARStage` trains MAR-LR or MAR-HR (a :class:`ConditionalMAR`: condition
  projection + MAR) on features of the **frozen** image encoder (``condition_model_uri``,
  never part of the trained module, its DeepSpeed checkpoints or its saved weights)
  against latents of a **frozen** VAE, computed on the fly from the
  batch's surface pyramid: posterior samples (``latent_target: sample``, as the MAR-3D
  authors) or means, normalized with the statistics the VAE stage measured
  (``latent_norm``; the values used are written into the MAR model's config). The cost
  of this encoding is measured and logged (``train/latent_ms``). With
  ``feature_cache`` the training batches carry cached encoder features and VAE
  posteriors (:mod:`mar3d.train.feature_cache`) and neither frozen network runs in a
  training step (``latent_ms`` then measures drawing z from the cached posterior);
  evaluation batches still go through both.

With ``condition.train_encoders`` (tiny random towers only) MAR-LR trains the image
encoder with its own weights: the trained module is :class:`EncoderAndMAR`, and the
final export (:meth:`Stage.export_weights`) splits it into the MAR-LR model and a new
conditioner folder (``trained_conditioner/``, logged to the run), which the LR model
records as its encoder and MAR-HR then trains on, frozen.

After the last step every rank calls :meth:`Stage.export_extra` (collective): the VAE
stage measures its latent statistics on ``latent_stats_shapes`` training shapes there,
and they are saved with its weights (``extra.latent_stats`` in config.yaml).
"""
from __future__ import annotations

import dataclasses
import time
from abc import ABC, abstractmethod
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from mar3d.config import to_dict
from mar3d.models.vae import (DiagonalGaussian, ShapeVAE, latent_stats_from_sums, latent_sums,
                              occupancy_iou, surfaces_from_batch)
from mar3d.inference import check_vae_fits_mar, load_frozen_conditioner, load_frozen_vae
from mar3d.train.config import TrainConfig
from mar3d.train.data import dataset_kwargs
from mar3d.train.distributed import all_reduce_sum

# Where MAR-LR's trained image encoder is written (in the final checkpoint and the run's
# artifacts) when condition.train_encoders is on.
TRAINED_CONDITIONER_DIR = "trained_conditioner"


class Stage(ABC):
    """Interface of a training stage (see the module docstring)."""

    kind: str  # "vae" | "lr" | "hr": the model kind written to config.yaml
    run_id: str = ""  # the MLflow run: URIs of what the stage exports point into it

    @abstractmethod
    def build_model(self) -> nn.Module:
        ...

    def setup(self, device: torch.device, tracking_uri: str) -> None:
        """Load frozen parts (another stage's model) onto ``device``; default: nothing."""

    def export_weights(self, weights: dict[str, torch.Tensor], folder) -> tuple[dict, dict]:
        """(the saved model's weights, entries for its config's ``extra``) from the trained
        module's final ``weights``; a stage may write more model folders into ``folder``
        (the final checkpoint). Default: all weights are the model's."""
        return weights, {}

    @abstractmethod
    def loss(self, engine, batch: dict, step: int) -> dict[str, torch.Tensor]:
        """Training loss of one batch (``"loss"`` plus scalar diagnostics)."""
        ...

    @abstractmethod
    def tokens_per_sample(self, step: int) -> int:
        """Latent tokens one sample of this step contributes (for tokens/s)."""
        ...

    @abstractmethod
    def evaluate(self, model: nn.Module, batch: dict) -> dict[str, float]:
        """Evaluation metrics of one held-out batch (model in eval mode, no grad)."""
        ...

    @abstractmethod
    def model_config(self) -> dict[str, Any]:
        """Plain data that rebuilds the model (written next to the weights)."""
        ...

    def export_extra(self, model: nn.Module, ema, rank: int, world: int,
                     device: torch.device) -> dict[str, Any]:
        """Extra plain data saved with the final weights (``model``'s, or their average
        when ``ema`` is kept); called on every rank, may use collectives. Default: nothing."""
        return {}


class VAEStage(Stage):
    kind = "vae"

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def build_model(self) -> nn.Module:
        return ShapeVAE(self.cfg.vae)

    def level(self, step: int) -> str:
        if self.cfg.vae_level == "alternate":
            return "hr" if step % 2 == 0 else "lr"
        return self.cfg.vae_level

    def loss(self, engine, batch: dict, step: int) -> dict[str, torch.Tensor]:
        level = self.level(step)
        out = engine(batch, level=level, sample=True)
        return {"loss": out["loss"], "bce": out["bce"], "kl": out["kl"], f"iou_{level}": out["iou"]}

    def tokens_per_sample(self, step: int) -> int:
        return self.cfg.vae.hr_tokens if self.level(step) == "hr" else self.cfg.vae.lr_tokens

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch: dict) -> dict[str, float]:
        labels = batch["occ_labels"]
        metrics: dict[str, float] = {}
        levels = ("hr", "lr") if self.cfg.vae_level == "alternate" else (self.cfg.vae_level,)
        for level in levels:
            out = model(batch, level=level, sample=False)
            metrics[f"iou_{level}"] = float(out["iou"])
            metrics[f"bce_{level}"] = float(out["bce"])
        # Trivial baseline: predicting "inside" everywhere (IoU = inside fraction; the
        # all-outside prediction scores 0). A VAE that learned nothing scores about this.
        metrics["iou_all_inside"] = float(occupancy_iou(torch.ones_like(labels), labels))
        return metrics

    def model_config(self) -> dict[str, Any]:
        return to_dict(self.cfg.vae)

    @torch.no_grad()
    def export_extra(self, model: nn.Module, ema, rank: int, world: int,
                     device: torch.device) -> dict[str, Any]:
        """``latent_stats``: shift and spread of the HR and LR latents on training shapes
        (of the exported weights), and the ``surface_sizes`` the VAE was trained on."""
        from mar3d.data.dataset import ShapeDataset

        cfg = self.cfg
        model = ema.averaged_copy(model) if ema is not None else model
        dataset = ShapeDataset(cfg.data, **{**dataset_kwargs(cfg, cfg.seed + 104729), "rotate": False})
        count = min(cfg.latent_stats_shapes, len(dataset))
        was_training = model.training
        model.eval()
        sums = {level: torch.zeros(5, dtype=torch.float64, device=device) for level in ("hr", "lr")}
        try:
            torch.manual_seed(cfg.seed + 104729 + rank)  # posterior samples; eval-mode FPS is fixed
            for i in range(rank, count, world):
                item = dataset[i]
                surfaces = [item[f"surface_{k}"].unsqueeze(0).to(device)
                            for k in range(model.required_levels())]
                for level in sums:
                    sums[level] += latent_sums(model, surfaces, level)
        finally:
            model.train(was_training)
        stats = {level: latent_stats_from_sums(torch.tensor(all_reduce_sum(v.tolist(), device)))
                 for level, v in sums.items()}
        return {"latent_stats": {**stats, "num_shapes": count},
                "surface_sizes": list(dataset.surface_sizes)}


class MARStage(Stage):
    """MAR-LR (``level="lr"``) or MAR-HR (``level="hr"``) on a frozen VAE's latents."""

    def __init__(self, cfg: TrainConfig, level: str):
        if level not in ("lr", "hr"):
            raise ValueError(f"MARStage level must be 'lr' or 'hr', got {level!r}")
        if cfg.mar.stage != level:
            raise ValueError(f"training stage {level!r} needs mar.stage: {level} (got {cfg.mar.stage!r})")
        self.cfg = cfg
        self.kind = level
        self.vae: ShapeVAE | None = None
        self.encoder = None                 # frozen ImageEncoder, loaded by setup()
        self.conditioner_id = ""
        # MAR-LR with condition.train_encoders: the towers train inside the model.
        self.trains_encoder = level == "lr" and cfg.condition.train_encoders
        self.precision = cfg.resolved_precision()
        self.latent_seconds = 0.0
        self.latent_calls = 0

    def build_model(self) -> nn.Module:
        from mar3d.models.mar import ConditionalMAR

        if self.encoder is None:
            raise RuntimeError("MARStage.setup() must load the image encoder before the model is built")
        model = ConditionalMAR(self.cfg.condition, self.cfg.mar, self.encoder.spec)
        return EncoderAndMAR(self.encoder.unfreeze(), model) if self.trains_encoder else model

    def setup(self, device: torch.device, tracking_uri: str) -> None:
        if self.cfg.condition_model_uri:
            self.encoder, self.conditioner_id = load_frozen_conditioner(
                self.cfg.condition_model_uri, self.cfg.condition, tracking_uri, device)
        else:  # a stage used outside run_training (benchmarks): the encoder its config describes
            from mar3d.models.condition import ImageEncoder
            from mar3d.weights import content_id

            self.encoder = ImageEncoder(self.cfg.condition).to(device)
            self.conditioner_id = content_id(self.encoder.state_dict())
        self.vae, extra = load_frozen_vae(self.cfg.vae_model_uri, tracking_uri, device)
        check_vae_fits_mar(self.vae.cfg, self.cfg.mar)
        if self.cfg.latent_norm:
            # Before the model is built: the normalization becomes part of its config.
            apply_latent_stats(self.cfg.mar, extra.get("latent_stats"), self.cfg.latent_target,
                               self.cfg.vae_model_uri)

    @torch.no_grad()
    def latents(self, batch: dict, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(target tokens, LR tokens for HR or None): frozen-VAE latents of the batch's
        shapes, in ``model``'s normalized token space."""
        lr, hr = self.vae_latents(batch)
        mar = model.mar
        return (mar.normalize(hr), mar.normalize_lr(lr)) if self.kind == "hr" else (mar.normalize(lr), None)

    @torch.no_grad()
    def vae_latents(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(LR latents, HR latents for HR or None) of the batch's shapes from the frozen
        VAE, unnormalized; the time it takes is what ``latent_ms`` reports."""
        if self.vae is None:
            raise RuntimeError("MARStage.setup() must load the frozen VAE before training")
        start = time.perf_counter()
        sample = self.cfg.latent_target == "sample"
        levels = ("lr", "hr") if self.kind == "hr" else (self.cfg.mar.target_level,)
        if f"{levels[0]}_mean" in batch:  # a feature-cache batch: the VAE's posterior is in it
            posteriors = [DiagonalGaussian(batch[f"{lv}_mean"], batch[f"{lv}_logvar"]) for lv in levels]
            latents = [p.sample() if sample else p.mode() for p in posteriors]
        else:
            surfaces = surfaces_from_batch(batch, self.vae.required_levels())
            # Autocast off: the frozen VAE runs in its own (fp32) precision, so targets do
            # not depend on the precision the MAR model trains in.
            with torch.autocast(device_type=surfaces[0].device.type, enabled=False):
                surfaces = [s.float() for s in surfaces]
                latents = [self.vae.encode(surfaces, level=lv, sample=sample) for lv in levels]
        self.latent_seconds += time.perf_counter() - start
        self.latent_calls += 1
        return latents[0], (latents[1] if self.kind == "hr" else None)

    @torch.no_grad()
    def features(self, batch: dict) -> dict[str, torch.Tensor]:
        """Frozen image-encoder features of the batch's views (in bf16 when training in bf16,
        as the encoder ran inside the model's autocast before it was split out), or the
        cached ones a feature-cache batch carries."""
        if "clip" in batch:
            return {"clip": batch["clip"], "dino": batch["dino"]}
        with autocast_context(batch["image"].device, self.precision):
            return self.encoder(batch["image"])

    def condition_inputs(self, batch: dict):
        """What the trained module takes as its condition: the images themselves when it
        trains the encoder, else the frozen encoder's features."""
        return batch["image"] if self.trains_encoder else self.features(batch)

    def loss(self, engine, batch: dict, step: int) -> dict[str, torch.Tensor]:
        tokens, lr_tokens = self.latents(batch, engine.module)
        out = engine(self.condition_inputs(batch), tokens, lr_tokens)
        return {"loss": out["loss"], "mask_ratio": out["mask_ratio"].detach().float()}

    def latent_ms(self) -> float:
        """Mean wall time of the frozen-VAE encoding per batch so far (ms)."""
        return 1000.0 * self.latent_seconds / max(1, self.latent_calls)

    def tokens_per_sample(self, step: int) -> int:
        return self.cfg.mar.seq_len

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch: dict) -> dict[str, float]:
        # The diffusion loss on held-out shapes/views with the training masking is the
        # cheap, comparable number; generation quality is the evaluation job's business.
        tokens, lr_tokens = self.latents(batch, model)
        out = model(self.condition_inputs(batch), tokens, lr_tokens)
        return {"loss": float(out["loss"])}

    def model_config(self) -> dict[str, Any]:
        return {"mar": to_dict(self.cfg.mar), "condition": to_dict(self.cfg.condition),
                "encoder": dataclasses.asdict(self.encoder.spec)}

    def export_extra(self, model: nn.Module, ema, rank: int, world: int,
                     device: torch.device) -> dict[str, Any]:
        """Which conditioner the model was trained with (a release must pair them)."""
        return {"conditioner_id": self.conditioner_id,
                "condition_model_uri": self.cfg.condition_model_uri}

    def export_weights(self, weights: dict[str, torch.Tensor], folder) -> tuple[dict, dict]:
        """With a trained encoder: MAR-LR's own weights, and the towers saved as the
        conditioner ``folder/trained_conditioner`` that the model now records."""
        if not self.trains_encoder:
            return weights, {}
        from pathlib import Path

        from mar3d.inference import encoder_from_state, save_conditioner

        parts = EncoderAndMAR.split_state(weights)
        encoder = encoder_from_state(self.cfg.condition, parts["encoder"])
        trained_id = save_conditioner(encoder, Path(folder) / TRAINED_CONDITIONER_DIR,
                                      extra={"trained_with": "lr",
                                             "initial_conditioner_id": self.conditioner_id})
        uri = f"runs:/{self.run_id}/{TRAINED_CONDITIONER_DIR}" if self.run_id else ""
        return parts["model"], {"conditioner_id": trained_id, "condition_model_uri": uri,
                                "initial_conditioner_id": self.conditioner_id}


class EncoderAndMAR(nn.Module):
    """MAR-LR that trains its image encoder (``condition.train_encoders``): images in,
    the towers' features into the :class:`ConditionalMAR`. Saved as two models."""

    def __init__(self, encoder: nn.Module, model: nn.Module):
        super().__init__()
        self.encoder, self.model = encoder, model

    @property
    def mar(self):
        return self.model.mar

    def forward(self, images, tokens: torch.Tensor, lr_tokens: torch.Tensor | None = None):
        return self.model(self.encoder.features(images), tokens, lr_tokens)

    @staticmethod
    def split_state(weights: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        parts: dict[str, dict[str, torch.Tensor]] = {"encoder": {}, "model": {}}
        for key, value in weights.items():
            owner, _, name = key.partition(".")
            if owner not in parts:
                raise KeyError(f"unexpected weight {key!r} in an encoder-training MAR-LR")
            parts[owner][name] = value
        return parts


def make_stage(cfg: TrainConfig) -> Stage:
    if cfg.stage == "vae":
        return VAEStage(cfg)
    return MARStage(cfg, cfg.stage)


def apply_latent_stats(mar_cfg, stats: dict | None, target: str, vae_uri: str) -> None:
    """Fill ``mar_cfg``'s latent normalization from a VAE's measured ``latent_stats``:
    the spread of what the model is trained on (posterior samples or means)."""
    if not stats:
        raise ValueError(f"the VAE {vae_uri} carries no latent_stats (it was saved before the VAE "
                         "stage measured them): retrain it, or set latent_norm=false to train "
                         "MAR on unnormalized latents")
    spread = f"std_{target}"
    own = stats[mar_cfg.target_level]
    mar_cfg.latent_shift, mar_cfg.latent_scale = float(own["shift"]), float(own[spread])
    if mar_cfg.stage == "hr":
        mar_cfg.lr_latent_shift = float(stats["lr"]["shift"])
        mar_cfg.lr_latent_scale = float(stats["lr"][spread])
    mar_cfg.validate()


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast for evaluation when training in bf16 (DeepSpeed's torch_autocast
    covers the training forward); nothing in fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()
