"""train.init_from_hf: a run started from a Hugging Face folder begins from exactly those weights."""
import os

import torch

from llmforge.export_hf import main as export_main
from llmforge.inference.run_loading import load_run
from tests.trainer.conftest import train_run


def test_training_starts_from_hf_weights(llama_run, data_dir, tmp_path):
    hf = str(tmp_path / "hf")
    assert export_main([llama_run, hf]) == 0
    # steps=0: the run only imports the weights and saves its first checkpoint
    run = train_run(str(tmp_path / "from_hf"), data_dir, f"train.init_from_hf={hf}", "train.steps=0",
                    "model.preset=tiny", "model.dim=32")  # the HF folder's shape wins over the preset/overrides
    src, dst = load_run(llama_run), load_run(run)
    assert dst.cfg.model.dim == src.model.args.dim
    x = torch.randint(0, src.model.args.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(src.model(x), dst.model(x))
    assert os.path.isfile(os.path.join(run, "config.yaml"))
