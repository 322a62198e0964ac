"""End-to-end tests run a real SGLang engine on CPU. SGLang decides its platform when its modules are
imported and spawns scheduler processes that inherit the environment, so CPU mode (the sgl_kernel
fallback on PYTHONPATH, SGLANG_USE_CPU_ENGINE=1, offline hub) is switched on here, before any test
module imports sglang."""

from dspark_sglang.cpu_mode import enable_cpu_mode

enable_cpu_mode()
