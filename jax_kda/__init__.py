"""jax_kda: Kimi Delta Attention prefill for JAX, with CUDA kernels for Hopper GPUs."""

from .api import kda_prefill, prefill_path
from .decode import kda_decode_step

__all__ = ["kda_decode_step", "kda_prefill", "prefill_path"]
__version__ = "0.1.0"
