from setuptools import find_packages, setup

setup(
    name="llmtrain",
    version="0.1.0",
    description="Pretrain decoder-only language models with DeepSpeed: raw text to Hugging Face.",
    python_requires=">=3.10",
    packages=find_packages(include=["llmtrain", "llmtrain.*"]) + ["llmtrain.kernels"],
    # Kernels live at the top level of the repository but install as llmtrain.kernels: a
    # top-level package named `kernels` would collide with an unrelated PyPI package.
    package_dir={"llmtrain.kernels": "kernels"},
    install_requires=[
        "torch>=2.5",  # scaled_dot_product_attention(enable_gqa=...)
        "deepspeed>=0.15",
        "sentencepiece>=0.2",
        "numpy>=1.24",
        "hydra-core>=1.3",
        "omegaconf>=2.3",
        "wandb>=0.17",
        "tqdm>=4.60",
        "safetensors>=0.4",
        "matplotlib>=3.7",
    ],
    extras_require={
        "parquet": ["pyarrow>=14"],
        "tensorboard": ["tensorboard>=2.14"],
        "gpu": ["triton>=3.0"],
        # Downstream tasks (`llmtrain eval eval.tasks=[...]`) through lm-evaluation-harness.
        "eval": ["lm_eval>=0.4.8", "sacrebleu>=2.3"],
        # The `clean` stage of `llmtrain prepare` (dedup, quality filters, decontamination).
        "clean": ["datatrove[processing]>=0.6"],
        # `prepare.executor=ray`: the clean stage as a Ray job (a local Ray runtime, or a cluster's).
        "ray": ["datatrove[processing]>=0.6", "ray[default]>=2.9"],
        "dev": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "ruff>=0.6",
            "transformers>=4.44",
            "triton>=3.0; platform_system == 'Linux'",
            "pyarrow>=14",
            "tensorboard>=2.14",
            "lm_eval>=0.4.8",
            "sacrebleu>=2.3",
            "datatrove[processing]>=0.6",
        ],
    },
    entry_points={"console_scripts": ["llmtrain=llmtrain.cli:main"]},
)
