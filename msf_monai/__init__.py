"""MixStyleFlow for MONAI: domain generalisation for segmentation with normalizing-flow styles."""

__version__ = "0.1.0"
