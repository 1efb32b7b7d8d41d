"""megatron-core reads our shards (IndexedDataset, GPTDataset through BlendedMegatronDatasetBuilder), and
``data.backend: megatron`` (llmforge.data.megatron) gives a deterministic ``batch(start, count)`` stream."""
import os
import sys
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed")

from data_pipeline.shards import ShardWriter  # noqa: E402
from llmforge.core.config import DataConfig  # noqa: E402
from llmforge.data.megatron import build_megatron_datasets  # noqa: E402
from tests.conftest import read_metrics, run_cli  # noqa: E402


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two pipeline-style datasets; document d of dataset k is ids [k*1000 + d*10 ...] (uint16), so every token
    tells where it came from."""
    root = tmp_path_factory.mktemp("mshards")
    docs = {}
    rng = np.random.default_rng(0)
    for k in (1, 2):
        docs[k] = []
        for split, n in (("train", 40), ("valid", 6)):
            with ShardWriter(str(root / f"ds{k}" / "shards" / f"{split}-00000"), np.uint16) as w:
                for d in range(n):
                    doc = (k * 10000 + (d if split == "train" else 500 + d) * 10 +
                           np.arange(int(rng.integers(20, 60))) % 10).astype(np.uint16)
                    w.add_document(doc)
                    if split == "train":
                        docs[k].append(doc)
    return root, docs


def test_indexed_dataset_reads_our_shards(shards):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    root, docs = shards
    ds = IndexedDataset(str(root / "ds1" / "shards" / "train-00000"))  # kept alive while arrays are used
    assert len(ds) == 40
    assert list(ds.sequence_lengths) == [len(d) for d in docs[1]]
    assert list(ds.document_indices) == list(range(41))
    for i in (0, 17, 39):
        np.testing.assert_array_equal(ds[i], docs[1][i])
        assert ds[i].dtype == np.uint16
    np.testing.assert_array_equal(ds.get(5, offset=3, length=4), docs[1][5][3:7])


def test_gpt_dataset_windows_are_our_tokens(shards):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from llmforge.data.megatron import _IdTokenizer
    root, docs = shards
    prefix = str(root / "ds1" / "shards" / "train-00000")
    cfg = GPTDatasetConfig(random_seed=7, sequence_length=32, blend=([prefix], None), split="100,0,0",
                           tokenizer=_IdTokenizer(65536), reset_position_ids=False, reset_attention_mask=False,
                           eod_mask_loss=False, create_attention_mask=False, path_to_cache=str(root / "cache"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [50, None, None], lambda: True, cfg).build()
    assert isinstance(train, GPTDataset) and len(train) >= 50
    for k in (0, 13, 49):
        item = train[k]
        tokens = torch.cat([item["tokens"][:1], item["labels"]]).numpy().astype(np.int64)
        assert len(tokens) == 33
        # Megatron shuffles documents and packs them: every run of one document must be a contiguous piece
        # of that document as we wrote it (document d's ids are 10000 + 10*d + position % 10).
        cuts = np.flatnonzero(np.diff(tokens // 10)) + 1
        for piece in np.split(tokens, cuts):
            doc = docs[1][int(piece[0] // 10 - 1000)].astype(np.int64)
            assert piece.tobytes() in doc.tobytes(), (k, piece)
        assert torch.equal(item["tokens"][1:], item["labels"][:-1])


def test_megatron_stream_is_deterministic_and_blended(shards):
    root, docs = shards
    dc = DataConfig(paths=[str(root / "ds1"), str(root / "ds2")], weights=[0.75, 0.25], seq_len=16)
    a, valid = build_megatron_datasets(dc, seed=3, num_samples=64)
    b, _ = build_megatron_datasets(dc, seed=3, num_samples=64)
    c, _ = build_megatron_datasets(dc, seed=4, num_samples=64)
    batch = a.batch(0, 64)
    assert batch.shape == (64, 17) and batch.dtype == torch.int64
    assert torch.equal(batch, b.batch(0, 64))                       # pure function of (seed, config, k)
    assert not torch.equal(batch, c.batch(0, 64))                   # the seed matters
    assert torch.equal(a.batch(10, 6), torch.stack([torch.from_numpy(a.sample(k)) for k in range(10, 16)]))
    assert torch.equal(a.batch(10, 6), batch[10:16])                # any (start, count) split: resume-safe
    source = batch[:, 0] // 10000                                    # which dataset each sample came from
    assert set(source.tolist()) == {1, 2}
    assert 0.6 < (source == 1).float().mean().item() < 0.9          # ~0.75 of the samples from ds1
    assert valid and valid[0].window(0).shape == (17,)
    assert set((valid[0].batch(0, 8)[:, 0] % 10000 // 10 >= 500).tolist()) == {True}  # valid-* shards


def test_train_with_megatron_backend(shards, tmp_path):
    """data.backend=megatron end to end (deepspeed engine, which dispatches on data.backend)."""
    pytest.importorskip("deepspeed")
    root, _ = shards
    args = [sys.executable, "-m", "llmforge.train", "configs/train/tiny-cpu.yaml", f"data.paths=[{root / 'ds1'}]",
            "model.vocab_size=20100", "data.backend=megatron", "engine=deepspeed", "data.seq_len=32",
            f"run_dir={tmp_path}/run", "train.steps=2", "logging.plot=false", "train.eval_batches=1",
            "model.dim=32", "model.n_heads=2", "model.n_kv_heads=1", "model.ffn_dim=64"]
    r = run_cli(args, timeout=300, env={"DS_ACCELERATOR": "cpu"})
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_metrics(tmp_path / "run")
    assert sorted(rows) == [1, 2] and all(np.isfinite(r["loss"]) for r in rows.values())
    assert os.path.isfile(tmp_path / "run" / "checkpoints" / "latest")
