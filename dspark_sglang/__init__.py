"""dspark-sglang: confidence-scheduled speculative decoding for SGLang.

Layers (inner to outer; an inner layer never imports an outer one):
- core math (this package's top-level modules): pure functions on tensors;
- `dspark_sglang.drafters`: DSpark, DFlash and Eagle3 modules and their checkpoint loader;
- `dspark_sglang.kernels`: fused Triton kernels with torch twins;
- `dspark_sglang.sglang`: the only place that imports sglang (plugin, worker);
- `dspark_sglang.calibration`, `dspark_sglang.benchmarks`: tools.
"""

__version__ = "0.1.0"
