"""Training of the three MAR-3D stages (Pyramid VAE, MAR-LR, MAR-HR) on Ray Train +
DeepSpeed with MLflow tracking. Entry point: :func:`run_training`."""
from mar3d.train.config import TrainConfig, load_train_config


def run_training(cfg: TrainConfig):
    """See :func:`mar3d.train.api.run_training` (imported lazily: Ray is heavy)."""
    from mar3d.train.api import run_training as _run

    return _run(cfg)


__all__ = ["TrainConfig", "load_train_config", "run_training"]
