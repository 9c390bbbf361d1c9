"""Train a few steps of a small banked model under torchrun (gloo) with the trainer's own
train_step, and save the weights after every step (rank 0), so tests can compare Parallel Muon
with the replicated reference. Usage: muon_worker.py OUT.pt {float32|bfloat16}"""
import os
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests")]
import train_gpt as tg  # noqa: E402
import unbanked  # noqa: E402

if __name__ == "__main__":
    rt = tg.init_runtime(os.environ)
    cfg, model, batches = unbanked.small_training_problem()
    optimizers = tg.build_optimizers(cfg, model, rt.world_size)
    optimizers.muon.comm_dtype = getattr(torch, sys.argv[2])
    states, norms = [], []
    step = optimizers.step
    optimizers.step = lambda clip_norm, rt: norms.append(step(clip_norm, rt))  # record each global norm
    for batch in batches:
        per_rank = batch.size(0) // rt.world_size
        tg.train_step(cfg, model, model, optimizers, batch[rt.rank * per_rank:(rt.rank + 1) * per_rank], rt)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    if rt.is_main:
        torch.save(dict(states=states, norms=norms), sys.argv[1])
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    tg.exit_process(0)  # not through the interpreter's finalization, which gloo's threads can abort
