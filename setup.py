"""llmforge: raw text to a pretrained language model (data_pipeline + llmforge trainer)."""
import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

# lm-eval has no plugin discovery: this .pth (site-packages/llmforge-lm-eval.pth) imports llmforge.lm_eval_hook at
# start-up so `lm_eval --model llmforge` finds the adapter. Wheels get it from build_py, `pip install -e` from
# editable_wheel (its unpacked wheel folder is written into the wheel as is).
LM_EVAL_PTH = ("llmforge/lm_eval_hook.pth", "llmforge-lm-eval.pth")


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        self.copy_file(LM_EVAL_PTH[0], os.path.join(self.build_lib, LM_EVAL_PTH[1]))

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, LM_EVAL_PTH[1])]


CMDCLASS = {"build_py": BuildPyWithPth}
try:
    from setuptools.command.editable_wheel import editable_wheel

    class EditableWheelWithPth(editable_wheel):
        # a private setuptools hook (checked with setuptools 84): a signature change must not break the install,
        # only lose the .pth (then `python -m llmforge.eval --tasks` still works; the lm_eval CLI needs the .pth)
        def _run_build_commands(self, *args, **kwargs):
            out = super()._run_build_commands(*args, **kwargs)
            unpacked = kwargs.get("unpacked_wheel", args[1] if len(args) > 1 else None)
            try:
                shutil.copyfile(LM_EVAL_PTH[0], os.path.join(unpacked, LM_EVAL_PTH[1]))
            except (OSError, TypeError):
                pass
            return out
    if hasattr(editable_wheel, "_run_build_commands"):
        CMDCLASS["editable_wheel"] = EditableWheelWithPth
except ImportError:  # setuptools < 64: no PEP 660 editable installs
    pass

setup(
    name="llmforge",
    version="0.1.0",
    description="Raw text to a pretrained LLM: a resumable data pipeline and a composable-parallel trainer",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["llmforge", "llmforge.*", "data_pipeline", "data_pipeline.*"]),
    package_data={"data_pipeline": ["sample_corpus/*.zst", "sample_corpus/*.gz", "sample_corpus/*.md",
                                    "sample_corpus/*.json", "sample_corpus/html/*",
                                    "sample_instructions/*.jsonl", "sample_instructions/*.md"],
                  "llmforge": ["lm_eval_hook.pth", "inference/eval_tasks/*.md", "inference/eval_tasks/*.yaml",
                               "inference/eval_tasks/*.py",
                               "inference/eval_tasks/data/*.jsonl"]},
    cmdclass=CMDCLASS,
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
        "protobuf",  # reads a sentencepiece model's settings (data_pipeline/encode_cache.py); wandb needs it too
        "wandb",
        "megatron-core",
        "trafilatura",
        "lxml_html_clean",  # trafilatura needs it with lxml >= 5.2
        "langid",
        "matplotlib",
        "scipy",  # llmforge.scaling: L-BFGS fit of the Chinchilla law
    ],
    extras_require={
        "deepspeed": ["deepspeed==0.19.8"],
        "ray": ["ray>=2.52,<3"],  # data pipeline executor=ray (CPU wheel; pulls no torch)
        "eval": ["lm-eval==0.4.13", "accelerate"],  # benchmarks: python -m llmforge.eval RUN --tasks ..., lm_eval CLI
        # lm-eval's `hf` model needs accelerate beside transformers (its [hf] extra minus peft, unused here)
        "float8": ["torchao==0.18.0"],  # train.float8 (float8 linears; emulated on CPU for tests)
        # quality_classifier step + train-classifier: fastText (the fork with numpy 2 wheels; same API, same models)
        "quality": ["fasttext-numpy2==0.10.4"],
        "dev": ["pytest", "pytest-timeout", "transformers", "lm-eval==0.4.13", "accelerate", "ray>=2.52,<3",
                "torchao==0.18.0", "fasttext-numpy2==0.10.4"],
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
