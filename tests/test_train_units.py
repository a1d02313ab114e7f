"""Fast unit tests of the training machinery (no Ray, no DeepSpeed engine)."""
from __future__ import annotations

import socket
import time

import pytest
import torch
import yaml

from mar3d.config import ConfigError, load_config, to_dict
from mar3d.tracking import TrackingError, check_reachable, default_tracking_uri
from mar3d.train.config import TrainConfig, load_train_config
from mar3d.train.loop import deepspeed_config
from mar3d.train.optim import EMA, build_optimizer, lr_multiplier, param_groups
from mar3d.registry import resolve_model_dir
from mar3d.weights import load_model_dir, save_model_dir



# --- learning-rate schedule ------------------------------------------------------------

def test_lr_warmup_is_linear_then_cosine_to_min():
    warmup, total, floor = 10, 110, 0.1
    mults = [lr_multiplier(s, warmup, total, floor) for s in range(total)]
    assert mults[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    assert mults[warmup] == pytest.approx(1.0)
    # Cosine: half way through the decay the multiplier is half way to the floor.
    assert mults[warmup + 50] == pytest.approx(floor + (1 - floor) * 0.5)
    decay = mults[warmup:]
    assert all(a >= b for a, b in zip(decay, decay[1:])), "cosine part must not increase"
    assert lr_multiplier(total, warmup, total, floor) == pytest.approx(floor)
    assert lr_multiplier(10 * total, warmup, total, floor) == pytest.approx(floor)


def test_scheduler_drives_optimizer_lr():
    model = torch.nn.Linear(3, 2)
    opt, sched = build_optimizer(model, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1,
                                 warmup_steps=4, total_steps=20, min_lr_ratio=0.0)
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(1e-3 / 4)
    assert seen[3] == pytest.approx(1e-3)
    assert seen[-1] < 1e-4
    assert opt.param_groups[0]["betas"] == (0.9, 0.99)


def test_weight_decay_only_on_matrices():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    groups = param_groups(model, 0.05)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model[0].weight)}


def _no_decay_matrices(model) -> set[str]:
    """Trainable parameters of >= 2 dims that are exempt from decay (1-D ones always are)."""
    from mar3d.train.optim import no_decay_reason

    return {n for n, p in model.named_parameters()
            if p.requires_grad and p.ndim >= 2 and no_decay_reason(n, p)}


def _diffusion_matrices(model) -> set[str]:
    return {n for n, p in model.named_parameters() if ".diffusion." in f".{n}" and p.ndim >= 2}


@pytest.mark.parametrize("size", ["tiny", "paper"])
def test_weight_decay_exempts_embeddings_tokens_queries_and_the_diffusion_head(size):
    """The decay groups of the real models: every positional embedding, learned token and
    VAE query set, and the whole diffusion head (as MAR exempts ``diffloss``) are exempt;
    every other weight matrix is decayed. The paper models are built on the meta device."""
    from mar3d.models.condition import ConditionConfig, ImageEncoder
    from mar3d.models.mar import ConditionalMAR, MARConfig
    from mar3d.models.vae import ShapeVAE, VAEConfig
    from mar3d.train.optim import no_decay_reason

    with torch.device("meta" if size == "paper" else "cpu"):
        vae = ShapeVAE(load_config(VAEConfig, f"vae_{size}", ["query_mode=learnable"]))
        cond = load_config(ConditionConfig, f"mar_{size}", section="condition")
        hr = ConditionalMAR(cond, load_config(MARConfig, f"mar_{size}", section="hr"), ImageEncoder(cond).spec)
    assert _no_decay_matrices(vae) == {"encoder.queries.hr", "encoder.queries.lr"}
    # The frozen image encoder is not part of the trained model (it never sees the optimizer).
    embeddings = {"mar.fake_cond", "mar.fake_lr", "mar.enc_pos", "mar.mask_token", "mar.dec_pos",
                  "mar.diff_pos"}
    head = _diffusion_matrices(hr)
    assert len(head) >= 10 and all(n.startswith("mar.diffusion.head.") for n in head)
    assert _no_decay_matrices(hr) == embeddings | head
    decayed = {n for n, p in hr.named_parameters() if not no_decay_reason(n, p)}
    assert {"mar.cond_proj.weight", "mar.enc_blocks.0.attn.qkv.weight",
            "conditioner.clip_proj.weight", "conditioner.dino_proj.weight"} <= decayed
    assert not any(".diffusion." in f".{n}" or n.endswith("_pos") for n in decayed)
    groups = param_groups(hr, 0.05)
    exempt = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert {id(p) for n, p in hr.named_parameters() if n in head | embeddings} <= exempt


# --- EMA ----------------------------------------------------------------------------------

def test_ema_tracks_parameters_and_roundtrips():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 3)
    ema = EMA(model, decay=0.9)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    d = ema.current_decay()  # warm-up: min(0.9, 1/10) = 0.1 on the first update
    assert d == pytest.approx(0.1)
    ema.update(model)
    for n, p in model.named_parameters():
        expected = d * start[n] + (1 - d) * p.detach()
        assert torch.allclose(ema.shadow[n], expected)
    for _ in range(200):
        ema.update(model)
    for n, p in model.named_parameters():
        assert torch.allclose(ema.shadow[n], p.detach(), atol=1e-4), "EMA converges to constant weights"
    restored = EMA(model, decay=0.9)
    restored.load_tensors(ema.tensors())
    assert restored.num_updates == ema.num_updates == 201
    state = restored.state_dict_for(model)
    assert set(state) == set(model.state_dict())
    with pytest.raises(ValueError):
        EMA(model, decay=1.0)


# --- weights folder -----------------------------------------------------------------------

def test_model_dir_roundtrip_is_safetensors_and_yaml(tmp_path):
    from mar3d.models.vae import ShapeVAE, VAEConfig

    cfg = load_config(VAEConfig, "vae_tiny")
    model = ShapeVAE(cfg)
    save_model_dir(tmp_path / "m", model.state_dict(), to_dict(cfg), "vae", extra={"global_step": 7})
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert files == ["MLmodel", "config.yaml", "model.safetensors"]
    assert yaml.safe_load((tmp_path / "m" / "MLmodel").read_text())["flavors"]["mar3d"]["kind"] == "vae"
    state, doc = load_model_dir(tmp_path / "m", kind="vae")
    assert doc["extra"] == {"global_step": 7} and doc["model"] == to_dict(cfg)
    reference = model.state_dict()
    assert set(state) == set(reference)
    assert all(torch.equal(state[k], reference[k]) for k in reference)
    with pytest.raises(ValueError, match="holds a 'vae' model"):
        load_model_dir(tmp_path / "m", kind="lr")
    with pytest.raises(FileNotFoundError):
        load_model_dir(tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown model kind"):
        save_model_dir(tmp_path / "x", {}, {}, "gan")
    with pytest.raises(FileNotFoundError):
        resolve_model_dir(str(tmp_path / "nope"))


# --- config -------------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("num_workers=0", "num_workers"),
    ("zero_stage=3", "zero_stage"),
    ("precision=bf16", "GPU"),
    ("backend=nccl", "nccl"),
    ("warmup_steps=5000", "warmup_steps"),
    ("ema_decay=1.5", "ema_decay"),
    ("betas=[0.9,1.0]", "betas"),
    ("grad_clip=-1", "grad_clip"),
    ("run_name=a/b", "run_name"),
    ("tracking_retry_s=0", "tracking_retry_s"),
])
def test_config_validation_errors(override, message):
    with pytest.raises(ValueError, match=message):
        load_train_config("vae", None, [override])


def test_config_unknown_key_and_stage_mismatch(tmp_path):
    with pytest.raises(ConfigError, match="unknown key"):
        load_train_config("vae", None, ["learning_rate=1e-3"])
    with pytest.raises(ValueError, match="vae_model_uri"):
        load_train_config("lr", None, ["mar.stage=lr"])
    with pytest.raises(ValueError, match="for stage 'vae'"):
        load_train_config("lr", "train_vae_tiny")
    with pytest.raises(ValueError, match="contradicts"):
        load_train_config("vae", None, ["stage=hr"])


@pytest.mark.parametrize("stage, yaml_text, overrides, unread", [
    ("lr", "vae:\n  width: 512\n", [], "['vae']"),
    ("hr", "", ["vae.width=512"], "['vae']"),
    ("lr", "vae_level: hr\n", [], "['vae_level']"),
    ("hr", "", ["latent_stats_shapes=8"], "['latent_stats_shapes']"),
    ("vae", "mar:\n  width: 8\ncondition: {tiny: true}\n", [], "['condition', 'mar']"),
    ("vae", "", ["vae_model_uri=runs:/x/model"], "['vae_model_uri']"),
    ("vae", "", ["latent_target=mean"], "['latent_target']"),
])
def test_a_key_the_stage_does_not_read_is_an_error(tmp_path, stage, yaml_text, overrides, unread):
    """Editing e.g. vae.width for MAR-LR would change nothing (it encodes with the frozen
    VAE's own config), so it is refused rather than silently ignored."""
    path = tmp_path / "c.yaml"
    path.write_text(f"stage: {stage}\n{yaml_text}")
    vae = [] if stage == "vae" else ["vae_model_uri=/some/vae"]
    with pytest.raises(ConfigError, match=rf"stage '{stage}' does not read \{unread}") as err:
        load_train_config(stage, path, [*vae, *overrides])
    assert ("vae_model_uri" if stage != "vae" else "lr/hr") in str(err.value)


def test_tiny_configs_load():
    cfg = load_train_config("vae", "train_vae_tiny")
    assert cfg.stage == "vae" and cfg.vae.width == 64 and cfg.num_workers == 2
    assert cfg.resolved_precision() == "fp32" and cfg.resolved_backend() == "gloo"
    for stage in ("lr", "hr"):
        cfg = load_train_config(stage, f"train_{stage}_tiny", ["vae_model_uri=/some/vae"])
        assert cfg.stage == stage and cfg.mar.stage == stage and cfg.condition.tiny


def test_deepspeed_config_follows_train_config():
    cfg = TrainConfig(batch_size=3, zero_stage=2, grad_clip=0.5)
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["train_batch_size"] == 6 and ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_clipping"] == 0.5
    assert not ds["torch_autocast"]["enabled"]
    gpu = TrainConfig(use_gpu=True)
    assert gpu.resolved_precision() == "bf16" and gpu.resolved_backend() == "nccl"
    assert deepspeed_config(gpu, 8)["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}


# --- tracking -----------------------------------------------------------------------------

def test_unreachable_tracking_server_fails_fast():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(TrackingError, match="not reachable"):
        check_reachable(f"http://127.0.0.1:{port}", timeout_s=2)
    assert time.monotonic() - start < 10
    with pytest.raises(TrackingError, match="unsupported"):
        check_reachable("ftp://example")


def test_default_tracking_uri_is_sqlite_next_to_outputs(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = default_tracking_uri(tmp_path / "train")
    assert uri == f"sqlite:///{(tmp_path / 'train' / 'mlflow.db').resolve()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert default_tracking_uri(tmp_path) == "http://mlflow:5000"


def test_feature_cache_is_a_mar_key_and_refuses_rotation():
    """The cache holds latents of unrotated shapes; the VAE stage reads no cache."""
    with pytest.raises(ConfigError, match=r"does not read \['feature_cache'\]"):
        load_train_config("vae", "train_vae_tiny", ["feature_cache=/some/cache"])
    with pytest.raises(ValueError, match="unrotated"):
        load_train_config("lr", "train_lr_tiny", ["vae_model_uri=/some/vae", "feature_cache=build",
                                                  "rotate=true"]).validate()


def test_trained_encoders_are_for_the_tiny_towers_and_mar_lr_trains_them():
    vae = ["vae_model_uri=/some/vae", "condition.train_encoders=true"]
    load_train_config("lr", "train_lr_tiny", vae).validate()
    with pytest.raises(ValueError, match="tiny random encoders"):
        load_train_config("lr", "train_lr_tiny", [*vae, "condition.tiny=false"]).validate()
    with pytest.raises(ValueError, match="feature cache"):
        load_train_config("lr", "train_lr_tiny", [*vae, "feature_cache=build"]).validate()
    with pytest.raises(ValueError, match="MAR-HR trains on the towers MAR-LR trained"):
        load_train_config("hr", "train_hr_tiny", vae).validate()
    load_train_config("hr", "train_hr_tiny", [*vae, "condition_model_uri=runs:/lr/trained_conditioner"]).validate()


def test_an_encoder_training_mar_lr_gets_gradients_into_its_towers_and_exports_two_models(tmp_path):
    import torch

    from mar3d.inference import load_conditioner
    from mar3d.models.condition import ImageEncoder
    from mar3d.models.mar import ConditionalMAR
    from mar3d.train.stages import TRAINED_CONDITIONER_DIR, EncoderAndMAR, MARStage

    cfg = load_train_config("lr", "train_lr_tiny", [
        "vae_model_uri=/some/vae", "condition.train_encoders=true", "condition.image_size=64",
        "condition.tiny_clip_patch=16", "condition.tiny_dino_patch=16"])
    stage = MARStage(cfg, "lr")
    stage.encoder, stage.conditioner_id, stage.run_id = ImageEncoder(cfg.condition), "initial", "run1"
    model = stage.build_model()
    assert isinstance(model, EncoderAndMAR) and model.mar is model.model.mar
    model.train()
    assert model.encoder.training  # an unfrozen encoder follows its owner's mode
    images = torch.randint(0, 255, (2, 64, 64, 4), dtype=torch.uint8)
    tokens = torch.randn(2, cfg.mar.seq_len, cfg.mar.token_dim)
    # The diffusion head's modulation and output layers start at zero (adaLN-zero), so
    # nothing upstream of them has a gradient before the third step.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model(images, tokens)["loss"].backward()
        optimizer.step()
    grads = [p.grad for p in model.encoder.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)

    weights, extra = stage.export_weights(model.state_dict(), tmp_path)
    plain = ConditionalMAR(cfg.condition, cfg.mar, stage.encoder.spec)
    assert set(weights) == set(plain.state_dict())  # MAR-LR alone, loadable as a MAR model
    plain.load_state_dict(weights)
    encoder, conditioner_id = load_conditioner(tmp_path / TRAINED_CONDITIONER_DIR)
    assert extra == {"conditioner_id": conditioner_id, "initial_conditioner_id": "initial",
                     "condition_model_uri": f"runs:/run1/{TRAINED_CONDITIONER_DIR}"}
    assert torch.equal(encoder.state_dict()["clip.conv1.weight"], model.encoder.state_dict()["clip.conv1.weight"])
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    # A stage whose encoder is frozen exports its weights as they are.
    frozen = MARStage(load_train_config("lr", "train_lr_tiny", ["vae_model_uri=/some/vae"]), "lr")
    assert frozen.export_weights({"a": torch.zeros(1)}, tmp_path) == ({"a": torch.zeros(1)}, {})


def test_a_run_that_trained_all_its_steps_is_not_trained_again(tmp_path):
    """A re-run (after a tracking outage, or of a finished pipeline step) starts Ray Train
    only when something is left to train and the final model is on this machine."""
    from mar3d.train.api import _finished_training

    cfg = load_train_config("vae", "train_vae_tiny", ["steps=40", "warmup_steps=5"])
    finished = {"checkpoint": str(tmp_path / "checkpoint_1"), "metrics": {"step": 40, "train/loss": 0.5}}
    run_dir = tmp_path / "run"
    assert _finished_training({"run_id": "r", "finished": finished}, cfg, run_dir) is None  # no model here
    (run_dir / "model").mkdir(parents=True)
    (run_dir / "model" / "config.yaml").write_text("kind: vae\n")
    assert _finished_training({"run_id": "r", "finished": finished}, cfg, run_dir) == finished
    assert _finished_training({"run_id": "r"}, cfg, run_dir) is None  # interrupted: resume it
    more = load_train_config("vae", "train_vae_tiny", ["steps=80", "warmup_steps=5"])
    assert _finished_training({"run_id": "r", "finished": finished}, more, run_dir) is None  # train on
