"""mar3d: MAR-3D image-to-3D generation as a Ray/Kubeflow pipeline system."""
__version__ = "0.1.0"
