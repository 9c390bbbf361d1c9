"""Run every configured evaluation pass of the causality-check model under torchrun and save the
per-target losses (rank 0), so tests can compare world sizes. Usage: eval_worker.py OUT.pt"""
import os
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tools")]
import check_causality  # noqa: E402
import train_gpt as tg  # noqa: E402

if __name__ == "__main__":
    rt = tg.init_runtime(os.environ)
    cfg = check_causality.check_config(os.environ)
    model = check_causality.random_model(cfg, seed=0)
    tokens = check_causality.random_stream(cfg, torch.Generator().manual_seed(1))
    results = check_causality.run_passes(cfg, model, tokens, rt)
    data = tg.ValidationData(tokens, check_causality.one_byte_per_token(cfg.VOCAB_SIZE))
    evaluator = tg.Evaluator(cfg, model, data, rt, log=lambda _: None)
    hints = {f"{order} hints": evaluator.tilt(order)[0].hint for order in ("stream", "lora")}  # shares joined
    if rt.is_main:
        torch.save({**{name: s.nll for name, s in results.items()}, **hints}, sys.argv[1])
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    tg.exit_process(0)  # not through the interpreter's finalization, which gloo's threads can abort
