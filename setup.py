from setuptools import find_packages, setup

setup(
    name="megatron_topd",
    version="0.1.0",
    description="Trajectory-aware On-Policy Distillation (TOPD) on Megatron-Core",
    packages=find_packages(include=["megatron_topd", "megatron_topd.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.19",
        "numpy",
        "pyyaml",
        "safetensors",
        "tokenizers",
        "transformers",
        "scipy",
        "POT",
        "tensorboard",
        "rich",
        "tqdm",
    ],
    extras_require={
        "te": ["transformer-engine[pytorch]"],
        "launch": ["nemo-run==0.11.1", "leptonai==0.27.3"],
        "test": ["pytest", "pytest-timeout"],
    },
    entry_points={"console_scripts": ["megatron-topd=megatron_topd.cli:main"]},
)
