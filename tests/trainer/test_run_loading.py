"""A checkpoint saved by a sharded (FSDP2, 2 ranks) layout loads into one process through run_loading."""
from __future__ import annotations

import multiprocessing as mp
import os
import shutil

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from llmforge.checkpoint.checkpointer import Checkpointer
from llmforge.model.transformer import Transformer
from llmforge.inference.run_loading import load_run


def _save_sharded(rank: int, world: int, args, run_dir: str, init_file: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    torch.set_num_threads(1)  # the parent's OpenMP pool does not survive fork: stay single-threaded
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = Transformer(args)
    mesh = init_device_mesh("cpu", (world,))
    for block in model.layers.values():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, args.vocab_size, (2, 17), generator=torch.Generator().manual_seed(rank))
    F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
    opt.step()  # weights now differ from any fresh init
    Checkpointer(os.path.join(run_dir, "checkpoints"), rank=rank).save(7, [model], [opt], {"step": 7, "samples": 0})
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save(full, os.path.join(run_dir, "reference.pt"))
    dist.destroy_process_group()


def test_fsdp2_checkpoint_loads_into_one_process(llama_run, tmp_path):
    run_dir = str(tmp_path / "run")
    os.makedirs(run_dir)
    for f in ("config.yaml", "tokenizer.model"):
        shutil.copy(os.path.join(llama_run, f), os.path.join(run_dir, f))
    args = load_run(llama_run).model.args
    if dist.is_initialized():  # forked children must not inherit this process's group
        dist.destroy_process_group()
    ctx = mp.get_context("spawn")  # fork after the suite loaded deepspeed/megatron can segfault
    procs = [ctx.Process(target=_save_sharded, args=(r, 2, args, run_dir, str(tmp_path / "init"))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    for p in procs:  # never leave a hung child behind
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    run = load_run(run_dir)
    ref = torch.load(os.path.join(run_dir, "reference.pt"), weights_only=True)
    assert run.step == 7 and run.checkpoint.endswith("step_00000007")
    got = run.model.state_dict()
    assert set(ref) == set(got)
    worst = max((ref[k] - got[k]).abs().max().item() for k in ref)
    print(f"FSDP2 (2 ranks) checkpoint -> 1 process: max |param diff| = {worst:.1e}")
    assert worst == 0.0
