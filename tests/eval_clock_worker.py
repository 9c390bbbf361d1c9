"""Evaluate the causality-check model under torchrun with rank 0 slower to warm up by DELAY
seconds, and save per rank the wall time its warm-up ended and its evaluation clock started, so
a test can check that no clock starts before every rank is ready. Usage: eval_clock_worker.py
OUT_PREFIX DELAY (writes OUT_PREFIX{rank}.pt)"""
import os
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tools")]
import check_causality  # noqa: E402
import train_gpt as tg  # noqa: E402

if __name__ == "__main__":
    prefix, delay = sys.argv[1], float(sys.argv[2])
    rt = tg.init_runtime(os.environ)
    cfg = check_causality.check_config(os.environ)
    model = check_causality.random_model(cfg, seed=0)
    tokens = check_causality.random_stream(cfg, torch.Generator().manual_seed(1))
    times = {}
    real_eval_forward, real_clock = tg.eval_forward, tg.EvalClock

    def slow_on_rank_zero(*args):
        if rt.is_main:
            time.sleep(delay)
        fn = real_eval_forward(*args)
        times["ready"] = time.time()
        return fn

    def stamped_clock(budget):
        times["clock_start"] = time.time()
        return real_clock(budget)

    tg.eval_forward, tg.EvalClock = slow_on_rank_zero, stamped_clock
    torch.distributed.barrier()  # arrive together: only the injected delay separates the ranks
    data = tg.ValidationData(tokens, check_causality.one_byte_per_token(cfg.VOCAB_SIZE))
    tg.evaluate_artifact_model(cfg, model, data, 4, rt, lambda _: None)
    torch.save(times, f"{prefix}{rt.rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    tg.exit_process(0)  # not through the interpreter's finalization, which gloo's threads can abort
