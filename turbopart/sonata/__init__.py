"""Sonata (Point Transformer V3 encoder), natively in PyTorch."""
