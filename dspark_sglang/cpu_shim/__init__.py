"""CPU fallback for sgl_kernel ops (see common_ops.py)."""
