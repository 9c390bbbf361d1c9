"""Training throughput of a configuration: ms per optimizer step before and after recurrence switches on,
tokens/s, model FLOPs per token, MFU, peak memory, the attention backend and how documents are isolated, and
what Newton-Schulz and communication cost per step.

    python3 bench/throughput.py                                       # 1 GPU: 8 micro-batches per step
    python3 bench/throughput.py --corpus data/datasets/fineweb10B_sp8192   # the trainer's real batches
    torchrun --standalone --nproc_per_node=8 bench/throughput.py      # 8 GPUs
    PRESET=sample python3 bench/throughput.py --steps 5 --warmup 1    # small, runs on a CPU

Every knob of train_gpt.py applies (NUM_LAYERS, TRAIN_BATCH_TOKENS, COMPILE, ATTENTION_BACKEND, DOC_ATTENTION, ...).
The steps are the trainer's own train_step (forward, backward, gradient averaging, global-norm clip, AdamW and
Parallel Muon). Their batches are random tokens (with a BOS every --doc-tokens on average), or with --corpus the
first batches the trainer's own loader reads from that shard folder, real documents and all; the loader's own cost
is left out either way. Newton-Schulz and communication are timed on their own with this step's shapes: inside
the step they overlap, so their shares are upper bounds on what they add.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
import train_gpt as tg  # noqa: E402

H100_DENSE_BF16_TFLOPS = 989.0  # H100 SXM, dense (no sparsity)


def model_flops_per_token(cfg: tg.Config, looping: bool, causal: bool = True) -> float:
    """Training FLOPs per token: 6 per weight of every matrix a token passes (each virtual layer
    and the tied output head; forward 2, backward 4), plus attention's QK^T and AV: 4*dim*context
    forward, 3x that with backward. Causal attention sees (T+1)/2 positions on average. The gates' small
    matrices count too: the sparse attention gate's heads x 12 per layer, SmearGate's 12."""
    dim, kv_dim = cfg.MODEL_DIM, cfg.NUM_KV_HEADS * cfg.head_dim
    hidden = int(cfg.MLP_MULT * cfg.MODEL_DIM)
    layers = len(tg.looped_layer_order(cfg)) if looping else cfg.NUM_LAYERS
    gate = cfg.SPARSE_ATTN_GATE * cfg.NUM_HEADS * tg.GATE_INPUTS
    per_layer = 2 * dim * dim + 2 * dim * kv_dim + 2 * dim * hidden + gate
    context = (cfg.TRAIN_SEQ_LEN + 1) / 2 if causal else cfg.TRAIN_SEQ_LEN
    smear = cfg.SMEAR_GATE * tg.GATE_INPUTS
    return 6.0 * (layers * per_layer + cfg.VOCAB_SIZE * dim + smear) + layers * 12.0 * dim * context


def timed(fn, rt: tg.Runtime, repeats: int) -> float:
    """Mean seconds per call after one untimed call, the device synchronized around the timing."""
    fn()
    rt.sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    rt.sync()
    return (time.perf_counter() - t0) / repeats


def newton_schulz_seconds(muon: tg.ParallelMuon, rt: tg.Runtime, repeats: int) -> float:
    """One step's Newton-Schulz on this rank: every bank's owned matrices, batched."""
    shards = [torch.randn(muon.owned(p), *p.shape[1:], device=rt.device) for p in muon.param_groups[0]["params"]]
    return timed(lambda: [muon.direction(g, muon.row_normalize, muon.coeffs) for g in shards], rt, repeats)


def communication_seconds(optimizers: tg.Optimizers, rt: tg.Runtime, repeats: int) -> float:
    """One step's collectives with nothing to overlap: the replicated all-reduce, every bank's
    reduce-scatter and every bank's all-gather of updates."""
    if rt.world_size == 1:
        return 0.0
    muon = optimizers.muon
    banks = muon.param_groups[0]["params"]
    replicated = [p for group in optimizers.adam.param_groups for p in group["params"]]
    updates = [torch.zeros(muon.owned(p), *p.shape[1:], dtype=muon.comm_dtype, device=rt.device) for p in banks]

    def collectives():
        for p in banks + replicated:
            p.grad = torch.zeros_like(p)
        finish = tg.start_gradient_all_reduce(replicated, rt)
        muon.launch_reduce_scatters()
        finish()
        for p, update in zip(banks, updates):
            muon.grad_shard(p)
            gathered = torch.empty(update.size(0) * rt.world_size, *update.shape[1:], dtype=update.dtype,
                                   device=rt.device)
            tg.all_gather(gathered, update)
        muon._grad_shards.clear()

    seconds = timed(collectives, rt, repeats)
    for p in banks + replicated:
        p.grad = None
    return seconds


def random_batches(cfg: tg.Config, rows: int, doc_tokens: int, count: int = 4) -> list[torch.Tensor]:
    """Random tokens; with doc_tokens, a BOS starts a new document about every doc_tokens tokens (FineWeb's
    validation documents average about 810 sp8192 tokens), which document-isolated attention sees."""
    batches = []
    for i in range(count):
        g = torch.Generator().manual_seed(i)
        batch = torch.randint(0, cfg.VOCAB_SIZE, (rows, cfg.TRAIN_SEQ_LEN + 1), generator=g)
        if doc_tokens:
            batch[torch.rand(batch.shape, generator=g) < 1 / doc_tokens] = cfg.BOS_ID
        batches.append(batch)
    return batches


def corpus_batches(cfg: tg.Config, corpus: Path, rt: tg.Runtime, count: int = 4) -> list[torch.Tensor]:
    """This rank's share of the first `count` global batches the trainer's loader reads from the shard folder."""
    files = tg.find_shards(corpus, "train")
    tg.check_training_shards(files, cfg.VOCAB_SIZE)
    loader = tg.TrainLoader(files, tg.train_block_len(cfg), cfg.SEED, cfg.VOCAB_SIZE)
    blocks = cfg.TRAIN_BATCH_TOKENS // loader.seq_len
    return [loader.next_batch(blocks, rt.rank, rt.world_size, cfg.TRAIN_SEQ_LEN) for _ in range(count)]


def measure(cfg: tg.Config, rt: tg.Runtime, steps: int, warmup: int, doc_tokens: int = 0,
            corpus: Path | None = None) -> dict:
    backend = tg.pick_attention_backend(rt.device, cfg.ATTENTION_BACKEND)
    problem = tg.doc_attention_problem(cfg, rt.device, backend)
    if problem:
        raise tg.ConfigError(problem)
    torch.manual_seed(cfg.SEED)
    model = tg.GPT(cfg, backend).to(rt.device)
    model.doc_attention = cfg.DOC_ATTENTION
    compiled = tg.compiles(cfg, rt.device)
    model_fn = tg.training_function(cfg, model, rt.device)
    optimizers = tg.build_optimizers(cfg, model, rt.world_size)
    rows = tg.global_seqs(cfg) // rt.world_size
    batches = corpus_batches(cfg, corpus, rt) if corpus else random_batches(cfg, rows, doc_tokens)
    result = dict(device=torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else "cpu",
                  world_size=rt.world_size, accum_steps=rt.accum_steps, attention_backend=backend, compile=compiled,
                  fused_ce=cfg.FUSED_CE, fused_mlp=cfg.FUSED_MLP, varlen=cfg.VARLEN_ATTENTION,
                  document_isolation=model.document_isolation(rt.device), doc_tokens=doc_tokens,
                  data=str(corpus) if corpus else "random", train_batch_tokens=cfg.TRAIN_BATCH_TOKENS,
                  train_seq_len=cfg.TRAIN_SEQ_LEN, params=sum(p.numel() for p in model.parameters()))
    for phase, looping in (("plain", False), ("looping", True))[:2 if cfg.NUM_LOOPS > 0 else 1]:
        model.looping = looping
        for i in range(warmup):  # compiles this phase's graph
            tg.train_step(cfg, model_fn, model, optimizers, batches[i % 4], rt)
        rt.sync()
        t0 = time.perf_counter()
        for i in range(steps):
            tg.train_step(cfg, model_fn, model, optimizers, batches[i % 4], rt)
        rt.sync()
        seconds = tg.all_reduce_(torch.tensor([time.perf_counter() - t0], device=rt.device), rt,
                                 tg.dist.ReduceOp.MAX).item() / steps
        result[f"{phase}_ms_per_step"] = 1000 * seconds
        result[f"{phase}_tokens_per_second"] = cfg.TRAIN_BATCH_TOKENS / seconds
        result[f"{phase}_flops_per_token"] = model_flops_per_token(cfg, looping)
    if rt.device.type == "cuda":
        result["peak_memory_mib"] = torch.cuda.max_memory_allocated(rt.device) / 2**20
    repeats = max(3, steps)
    result["newton_schulz_ms"] = 1000 * newton_schulz_seconds(optimizers.muon, rt, repeats)
    result["communication_ms"] = 1000 * communication_seconds(optimizers, rt, repeats)
    return result


def add_shares(result: dict, peak_tflops: float) -> dict:
    """MFU per phase against world_size x peak, and the per-step shares of Newton-Schulz and communication."""
    result["peak_tflops_per_device"] = peak_tflops
    for phase in ("plain", "looping"):
        if f"{phase}_ms_per_step" in result:
            achieved = result[f"{phase}_flops_per_token"] * result[f"{phase}_tokens_per_second"]
            result[f"{phase}_mfu"] = achieved / (peak_tflops * 1e12 * result["world_size"])
    step_ms = result["plain_ms_per_step"]
    result["newton_schulz_share"] = result["newton_schulz_ms"] / step_ms
    result["communication_share"] = result["communication_ms"] / step_ms
    return result


def report(r: dict) -> str:
    lines = [f"device:{r['device']} world_size:{r['world_size']} accum_steps:{r['accum_steps']} "
             f"attention_backend:{r['attention_backend']} compile:{'on' if r['compile'] else 'off'} "
             f"fused_ce:{r['fused_ce']} fused_mlp:{r['fused_mlp']} varlen:{r['varlen']} "
             f"document_isolation:{r['document_isolation']} data:{r['data']} params:{r['params']} "
             f"batch:{r['train_batch_tokens']} tokens x seq {r['train_seq_len']}"]
    for phase in ("plain", "looping"):
        if f"{phase}_ms_per_step" in r:
            lines.append(f"{phase}: ms/step:{r[f'{phase}_ms_per_step']:.1f} tok/s:{r[f'{phase}_tokens_per_second']:.0f} "
                         f"flops/token:{r[f'{phase}_flops_per_token']:.4g} mfu:{100 * r[f'{phase}_mfu']:.1f}% "
                         f"(peak {r['peak_tflops_per_device']:g} TFLOP/s per device)")
    if "peak_memory_mib" in r:
        lines.append(f"peak memory allocated: {r['peak_memory_mib']:.0f} MiB")
    lines.append(f"newton-schulz: {r['newton_schulz_ms']:.2f} ms per step ({100 * r['newton_schulz_share']:.1f}% of a plain step); "
                 f"communication: {r['communication_ms']:.2f} ms ({100 * r['communication_share']:.1f}%), each timed alone")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per phase")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per phase first (compilation)")
    parser.add_argument("--peak-tflops", type=float, default=H100_DENSE_BF16_TFLOPS, help="per-device peak for MFU")
    parser.add_argument("--json", type=Path, help="also write the figures here (rank 0)")
    parser.add_argument("--doc-tokens", type=int, default=0, help="mean document length of the random batches "
                        "(a BOS about every N tokens); 0: no BOS beyond chance")
    parser.add_argument("--corpus", type=Path, help="a shard folder (DATA_PATH): time the trainer's own first "
                        "batches from it instead of random tokens")
    args = parser.parse_args(argv)
    if args.corpus and args.doc_tokens:
        parser.error("--doc-tokens shapes the random batches; --corpus reads real ones: give one of them")
    cfg = tg.config_from_env(os.environ)
    rt = tg.init_runtime(os.environ)
    try:
        result = add_shares(measure(cfg, rt, args.steps, args.warmup, args.doc_tokens, args.corpus),
                            args.peak_tflops)
        if rt.is_main:
            print(report(result), flush=True)
            if args.json:
                tg.write_json_atomic(args.json, result)
        if tg.dist.is_initialized():  # leave together: a rank that tears gloo down early aborts the others
            tg.dist.barrier()
    finally:
        if tg.dist.is_initialized():
            tg.dist.destroy_process_group()
    return result


if __name__ == "__main__":
    try:
        main()
    except tg.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if os.environ.get("WORLD_SIZE", "1") != "1":
        tg.exit_process(0)  # not through the interpreter's finalization, which gloo's threads can abort
