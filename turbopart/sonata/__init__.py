"""Sonata (Point Transformer V3 encoder), natively in PyTorch."""
from .config import SonataConfig
from .features import SonataFeatures, point_features
from .model import Sonata

__all__ = ["SonataConfig", "Sonata", "SonataFeatures", "point_features"]
