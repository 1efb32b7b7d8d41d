"""llmforge: raw text to a pretrained language model (data_pipeline + llmforge trainer)."""
from setuptools import find_packages, setup

setup(
    name="llmforge",
    version="0.1.0",
    description="Raw text to a pretrained LLM: a resumable data pipeline and a composable-parallel trainer",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["llmforge", "llmforge.*", "data_pipeline", "data_pipeline.*"]),
    package_data={"data_pipeline": ["sample_corpus/*.zst", "sample_corpus/*.gz", "sample_corpus/*.md",
                                    "sample_corpus/*.json", "sample_corpus/html/*"]},
    install_requires=[
        # A range: GPU users bring their own CUDA build. The README/CI install torch==2.13.0 first (CPU wheel).
        "torch>=2.6,<2.15",
        "numpy",
        "pyyaml",
        "tqdm",
        "zstandard",
        "safetensors",
        "datasets",
        "pyarrow",
        "datasketch>=1.6",
        "xxhash",
        "sentencepiece",
        "wandb",
        "megatron-core",
        "trafilatura",
        "lxml_html_clean",  # trafilatura needs it with lxml >= 5.2
        "langid",
        "matplotlib",
    ],
    extras_require={
        "deepspeed": ["deepspeed==0.19.8"],
        "ray": ["ray>=2.52,<3"],  # data pipeline executor=ray (CPU wheel; pulls no torch)
        "dev": ["pytest", "pytest-timeout", "transformers", "ray>=2.52,<3"],
    },
    entry_points={
        "console_scripts": [
            "llmforge-train=llmforge.train:main",
            "llmforge-eval=llmforge.eval:main",
            "llmforge-generate=llmforge.generate:main",
            "llmforge-export-hf=llmforge.export_hf:main",
            "llmforge-data=data_pipeline.__main__:main",
        ]
    },
)
