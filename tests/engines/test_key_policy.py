"""Every config key is honoured or refused by each engine: the DeepSpeed engine's KEY_POLICY covers every key of
the config dataclasses, each refused key is refused before start with one line naming it, and the native engine
(the reference) refuses nothing."""
import pytest

from llmforge.core.config import ConfigError, RunConfig, describe, load_config
from llmforge.train.engines.deepspeed_policy import KEY_POLICY, check_config, policy_for
from llmforge.train.engines.native import NativeEngine
from tests.conftest import ROOT

TINY = f"{ROOT}/configs/train/tiny-cpu.yaml"
# A setting of each refused key that DeepSpeed cannot honour (the test fails when a refused key has none here).
REFUSED_EXAMPLES = {
    "parallel.dp_replicate": ["parallel.dp_replicate=2", "parallel.dp_shard=2", "parallel.zero_stage=3"],
    "parallel.tp": ["parallel.tp=2"],
    "data.document_mask": ["data.document_mask=true"],
    "parallel.cp": ["parallel.cp=2"],
    "sft.pack": ["sft.pack=true"],
    "model.moe.num_experts": ["model.moe.num_experts=4"],
    "parallel.ep": ["parallel.ep=2"],
    "parallel.pp_schedule": ["parallel.pp=2", "parallel.pp_schedule=GPipe"],
    "checkpoint.async_save": ["checkpoint.async_save=true"],
    "train.init_from": ["train.init_from=runs/x"],
    "train.freeze": ["train.freeze=[embeddings]"],
    "train.lora.rank": ["train.lora.rank=4"],
    "eval.tasks": ["eval.tasks=[sample_valid_bpb]"],
    "train.optimizer": ["train.optimizer=muon"],
    "train.float8": ["train.float8=true", "train.float8_emulate=true"],
}


def test_every_key_has_a_deepspeed_rule():
    keys = [k for k, *_ in describe(RunConfig)]
    missing = [k for k in keys if policy_for(k) is None]
    assert not missing, f"keys with no engine=deepspeed rule (add them to KEY_POLICY): {missing}"
    stale = [k for k in KEY_POLICY if not k.endswith(".*") and k not in keys]
    assert not stale, f"KEY_POLICY names keys that no longer exist: {stale}"
    for key in keys:
        assert policy_for(key)[0] in ("honoured", "refused")


@pytest.mark.parametrize("key", sorted(k for k, v in KEY_POLICY.items() if v[0] == "refused"))
def test_refused_keys_are_refused_in_one_line(key):
    assert key in REFUSED_EXAMPLES, f"add a refused setting of {key} to REFUSED_EXAMPLES"
    cfg = load_config(RunConfig, TINY, ["engine=deepspeed", *REFUSED_EXAMPLES[key]])
    with pytest.raises(ConfigError) as e:
        check_config(cfg)
    msg = str(e.value)
    assert msg.startswith(f"{key}: not supported by engine=deepspeed") and "\n" not in msg
    NativeEngine.check_config(load_config(RunConfig, TINY, REFUSED_EXAMPLES[key]))  # native honours it


def test_defaults_pass_under_both_engines():
    check_config(load_config(RunConfig, TINY, ["engine=deepspeed"]))
    NativeEngine.check_config(load_config(RunConfig, TINY, []))


def test_dp_shard_with_zero1_is_a_deepspeed_layout():
    """DeepSpeed partitions ZeRO-1 state over every data-parallel rank: dp_shard=2 zero_stage=1 is valid there
    (the contract's launcher line), while native keeps refusing it (FSDP is ZeRO-2/3)."""
    check_config(load_config(RunConfig, TINY, ["engine=deepspeed", "parallel.dp_shard=2", "parallel.zero_stage=1"]))
    with pytest.raises(ConfigError, match="parallel.dp_shard"):
        load_config(RunConfig, TINY, ["parallel.dp_shard=2", "parallel.zero_stage=1"])
