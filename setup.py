from setuptools import setup


setup(
    name="transformers-twotower",
    version="0.1.0",
    description="Nemotron-Labs-TwoTower (block-wise mask diffusion on Nemotron-H) for Hugging Face Transformers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    package_dir={"": "src"},
    packages=["transformers_twotower"],
    package_data={"transformers_twotower": ["demo/*"]},
    entry_points={"console_scripts": ["twotower = transformers_twotower.__main__:main"]},
    python_requires=">=3.10",
    install_requires=["transformers==5.23.*", "torch>=2.4", "accelerate", "safetensors"],
    extras_require={
        "test": ["pytest", "peft", "datasets", "lm-eval==0.4.*"],
        "eval": ["lm-eval==0.4.*"],
        "cuda": ["mamba-ssm", "causal-conv1d"],
        "bench": ["matplotlib"],
    },
)
