"""dspark-sglang: confidence-scheduled speculative decoding as an SGLang plugin.

`kernels/`, `calibration/` and `benchmarks/` stay top-level folders in the repository but install
inside our namespace (`dspark_sglang.kernels`, ...), so nothing generic lands at the top of
site-packages.
"""

from setuptools import setup

PACKAGES = [
    "dspark_sglang",
    "dspark_sglang.drafters",
    "dspark_sglang.sglang",
    "dspark_sglang.cpu_shim",
    "dspark_sglang.kernels",
    "dspark_sglang.calibration",
    "dspark_sglang.benchmarks",
]

setup(
    name="dspark-sglang",
    version="0.1.0",
    description="Confidence-scheduled speculative decoding (DSpark, DFlash, Eagle3 drafters) for SGLang",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=PACKAGES,
    package_dir={
        "dspark_sglang.kernels": "kernels",
        "dspark_sglang.calibration": "calibration",
        "dspark_sglang.benchmarks": "benchmarks",
    },
    package_data={"dspark_sglang": ["zoo/*/*.json", "zoo/*/*.safetensors", "data/*.json"]},
    install_requires=[
        "sglang==0.5.23",
        "torch==2.14.1",
        "triton==3.8.0",
        "transformers",
        "safetensors",
        "numpy",
        "numba",  # the compiled CPU scheduler path (also required by sglang)
        "prometheus_client",  # the worker's /metrics series (also required by sglang)
        "scipy",  # KS tests in benchmarks/server_distribution.py (also required by sglang)
        "tqdm",
        "rich",
        "matplotlib",
    ],
    extras_require={"test": ["pytest", "hypothesis"]},
    entry_points={
        "sglang.srt.plugins": ["dspark = dspark_sglang.sglang.plugin:register"],
        "console_scripts": [
            "dspark-models = dspark_sglang.models:main",
            "dspark-cpu-env = dspark_sglang.cpu_mode:main_env",
            "dspark-eval = dspark_sglang.benchmarks.eval_acceptance:main",
            "dspark-profile = dspark_sglang.calibration.profile:main",
            "dspark-calibrate = dspark_sglang.calibration.calibrate:main",
            "dspark-bench = dspark_sglang.benchmarks.bench:main",
            "dspark-simulate = dspark_sglang.benchmarks.simulate:main",
            "dspark-gpu-check = dspark_sglang.benchmarks.gpu_check:main",
            "dspark-soak = dspark_sglang.benchmarks.soak:main",
            "dspark-convert = dspark_sglang.drafters.convert:main",
        ],
    },
)
