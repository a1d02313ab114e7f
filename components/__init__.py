"""Kubeflow Pipelines (kfp v2) components: one thin wrapper per pipeline step.

Each component only builds the `mar3d ...` command for its step and runs it through
:func:`components._run.run_step` (in-process, or as a Ray job on a RayCluster).
"""

# The training/inference image built from infra/Dockerfile. kfp bakes it into the
# compiled pipeline; the k8s manifests use the same name (kustomize `images:` retags it).
MAR3D_IMAGE = "ghcr.io/mar3d/mar3d:0.1.0"
