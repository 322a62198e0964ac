"""Fused Triton kernels for the hot paths, each next to (and tested against) its torch reference
in the core: chain_accept, topk_budget, sequential_head, block_attention. Call them through
`dispatch` (DSPARK_KERNELS=auto|triton|torch); importing this package does not import Triton."""
