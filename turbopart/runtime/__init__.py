"""Runtime services: numerics, memory budget, profiling."""
from .precision import Numerics, autocast, compute_dtype, param_dtypes

__all__ = ["Numerics", "autocast", "compute_dtype", "param_dtypes"]
