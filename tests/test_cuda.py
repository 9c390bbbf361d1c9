"""The CUDA paths, checked against their CPU or eager references on a GPU.

Marked `cuda` and skipped without a GPU; `python3 bench/gpu_check.py` runs them and tabulates the
outcome. CUDA_CHECK_DEVICE=cpu runs the same checks on the CPU, to debug the checks themselves.
"""
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_gpt as tg
import unbanked
from test_parallel_muon import reference_run, relative_gap

pytestmark = pytest.mark.cuda


@pytest.fixture
def device() -> torch.device:
    name = os.environ.get("CUDA_CHECK_DEVICE", "cuda")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    return torch.device(name)


def small_config(**overrides) -> tg.Config:
    """Every architecture switch on, small enough to compile in seconds."""
    env = dict(VOCAB_SIZE=1024, NUM_LAYERS=4, MODEL_DIM=128, NUM_HEADS=4, NUM_KV_HEADS=2, ROPE_DIMS=16, XSA_LAST_N=4,
               NUM_LOOPS=1, LOOP_START=1, LOOP_END=2, PARALLEL_RESIDUAL_START=2, TRAIN_SEQ_LEN=128,
               TRAIN_BATCH_TOKENS=8 * 128 * 2, QUANT_PASSTHROUGH_NUMEL=1024, GPTQ_CALIBRATION_BATCHES=2)
    env.update(overrides)
    return tg.config_from_env({k: str(v) for k, v in env.items()})


def perturbed_model(cfg: tg.Config, device) -> tg.GPT:
    torch.manual_seed(0)
    return perturbed(tg.GPT(cfg).to(device))


def perturbed(module: torch.nn.Module) -> torch.nn.Module:
    """Every weight moved by noise, so the zero-initialized gates and LoRA B pass gradient: at zero their exact-zero
    gradients would make any rounding an infinite relative gap."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return module


def tokens(cfg: tg.Config, rows: int, device) -> torch.Tensor:
    return torch.randint(0, cfg.VOCAB_SIZE, (rows, cfg.TRAIN_SEQ_LEN + 1),
                         generator=torch.Generator().manual_seed(0)).to(device)


def loss_and_grads(model: tg.GPT, model_fn, batch: torch.Tensor, rt: tg.Runtime):
    model.zero_grad(set_to_none=True)
    with rt.autocast():
        loss = model_fn(batch[:, :-1], batch[:, 1:]).mean()
    loss.backward()
    return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters()}


class Float32:
    """A runtime stand-in for loss_and_grads whose autocast is off: the float32 reference."""

    @staticmethod
    def autocast():
        return contextlib.nullcontext()


@pytest.mark.parametrize("looping", [False, True])
def test_compiled_model_is_as_accurate_as_eager(device, looping):
    """With every weight perturbed, so the zero-initialized gates pass gradient (at zero their exact-zero
    gradients would make any rounding an infinite relative gap), and a batch of many documents. Compiled and
    eager both round in bf16, differently (Inductor fuses ops and keeps their intermediates in float32), and
    the first H200 run put the per-head q_gain gradients, sums over every token with heavy cancellation,
    10-17 % apart while every other tensor agreed within 2 %. So each is measured against the float32
    model: compilation may not add more than twice eager's own rounding error, plus 2 %."""
    cfg = small_config()
    model = perturbed_model(cfg, device)
    model.looping = looping
    model.compute_dtype = torch.float32  # the residual stream too, for the reference and both bf16 runs alike
    rt = tg.Runtime(0, 1, device)
    batch = packed_documents(cfg, 4, device, 50)
    exact_loss, exact = loss_and_grads(model, model, batch, Float32)
    eager_loss, eager = loss_and_grads(model, model, batch, rt)
    compiled_loss, compiled = loss_and_grads(model, tg.compile_model(model), batch, rt)
    assert compiled_loss == pytest.approx(exact_loss, rel=1e-2) and eager_loss == pytest.approx(exact_loss, rel=1e-2)
    eager_error, compiled_error = gaps(eager, exact), gaps(compiled, exact)
    over = {n: f"{compiled_error[n]:.3f} vs eager {e:.3f}" for n, e in eager_error.items()
            if compiled_error[n] > 2 * e + 0.02}
    assert not over, f"compiled gradients further from float32 than eager's rounding explains: {over}"


def test_flash_attention_backends_agree_with_sdpa(device):
    available = [b for b in ("fa3", "fa2") if importable(b)]
    if not available:
        pytest.skip("neither FlashAttention 3 (flash_attn_interface) nor FlashAttention 2 (flash_attn) is installed")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 256, heads, 64, generator=g).to(device, torch.bfloat16) for heads in (8, 4, 4))
    expected = tg.attention_function("sdpa")(q, k, v).float()
    for backend in available:
        got = tg.attention_function(backend)(q, k, v).float()
        assert (got - expected).abs().max() < 2e-2, backend


def packed_documents(cfg: tg.Config, rows: int, device, every: int) -> torch.Tensor:
    """Random tokens with a BOS about every `every` tokens: a batch of many documents."""
    g = torch.Generator().manual_seed(every)
    batch = torch.randint(2, cfg.VOCAB_SIZE, (rows, cfg.TRAIN_SEQ_LEN + 1), generator=g)
    batch[torch.rand(batch.shape, generator=g) < 1 / every] = cfg.BOS_ID
    return batch.to(device)


@pytest.mark.parametrize("backend", ["sdpa", "fa3", "fa2"])
def test_varlen_kernel_matches_the_masked_reference(device, backend):
    """Document isolation through the varlen kernel (FlashAttention's, or torch's behind sdpa) against SDPA
    with the block-diagonal mask, forward and backward, with GQA."""
    if backend != "sdpa" and not importable(backend):
        pytest.skip(f"{backend} is not installed")
    if tg.varlen_kernel(backend) is None or device.type != "cuda":
        pytest.skip("no varlen kernel here: torch.nn.attention.varlen (torch >= 2.10) on CUDA")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 100, (3, 256), generator=g)
    ids[torch.rand(ids.shape, generator=g) < 0.02] = 1
    ids = ids.to(device)
    q, k, v = (torch.randn(3, 256, heads, 64, generator=g).to(device, torch.bfloat16).requires_grad_()
               for heads in (8, 4, 4))
    outputs = []
    for docs in (tg.document_starts(ids, 1), tg.document_mask(ids, 1)):
        out = tg.attention_function(backend)(q, k, v, docs)
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        outputs.append([out.float(), *(x.float() for x in grads)])
    for got, want in zip(*outputs):
        assert (got - want).norm() / want.norm() < 2e-2


def test_compiled_varlen_model_compiles_once_for_any_document_count(device):
    """The document starts enter the compiled forward with a dynamic length: batches with different numbers of
    documents reuse one graph, and the losses match the eager model on the masked path."""
    from torch._dynamo.utils import counters
    cfg = small_config()
    torch.manual_seed(0)
    model = tg.GPT(cfg).to(device)
    if not (model.has_varlen_kernel and device.type == "cuda"):
        pytest.skip("no varlen kernel: document isolation runs on the masked path, which has fixed shapes")
    rt = tg.Runtime(0, 1, device)
    torch._dynamo.reset()
    compiled = tg.compile_model(model)
    graphs = []
    for every in (50, 20, 7):
        batch = packed_documents(cfg, 4, device, every)
        with torch.no_grad(), rt.autocast():
            got = compiled(batch[:, :-1], batch[:, 1:]).mean().item()
            model.has_varlen_kernel = False
            want = model(batch[:, :-1], batch[:, 1:]).mean().item()
            model.has_varlen_kernel = True
        assert got == pytest.approx(want, rel=1e-2)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] == graphs[-1], f"graphs compiled after each batch: {graphs}"


def test_fused_cross_entropy_matches_the_eager_head(device):
    """liger-kernel's fused linear cross-entropy (FUSED_CE=1) against GPT.forward's logits, softcap and
    log-softmax: per-token losses and every gradient."""
    pytest.importorskip("liger_kernel")
    if device.type != "cuda":
        pytest.skip("liger-kernel's Triton kernels are CUDA only")
    cfg = small_config()
    torch.manual_seed(0)
    model = tg.GPT(cfg).to(device)
    rt = tg.Runtime(0, 1, device)
    batch = packed_documents(cfg, 4, device, 50)
    eager_loss, eager_grads = loss_and_grads(model, model, batch, rt)
    fused_loss, fused_grads = loss_and_grads(model, tg.fused_cross_entropy(model, model.forward_hidden), batch, rt)
    assert fused_loss == pytest.approx(eager_loss, rel=1e-3)
    for name, g in eager_grads.items():
        gap = float((fused_grads[name] - g).norm() / g.norm().clamp_min(1e-12))
        assert gap < 0.05, f"{name}: fused gradient is {gap:.3f} (relative) from eager"


def test_fused_mlp_matches_the_eager_mlp_compiled(device):
    """FUSED_MLP's Triton kernel inside the compiled model, in bf16: the loss and every gradient against the
    eager MLP of the same compiled model."""
    pytest.importorskip("triton")
    if device.type != "cuda":
        pytest.skip("test_kernels.py runs the kernel in Triton's interpreter on the CPU")
    cfg = small_config(FUSED_MLP=1)
    model = perturbed_model(cfg, device)
    rt = tg.Runtime(0, 1, device)
    batch = packed_documents(cfg, 4, device, 50)
    eager = tg.training_function(dataclasses.replace(cfg, FUSED_MLP=0), model, device)
    eager_loss, eager_grads = loss_and_grads(model, eager, batch, rt)
    fused_loss, fused_grads = loss_and_grads(model, tg.training_function(cfg, model, device), batch, rt)
    assert fused_loss == pytest.approx(eager_loss, rel=1e-2)
    assert_gaps_below(fused_grads, eager_grads, 0.05, "fused-MLP gradient from eager")


def test_compiled_lora_forward_matches_eager_at_every_width(device):
    """TTT_MODE=lora's forward compiled by Inductor with dynamic shapes (lora_forward, warmed up at two widths):
    no new graph at the other widths and column counts a pass meets, and the NLL and every adapter gradient
    against the eager forward, both in bf16, with every weight and adapter perturbed so all of them carry
    gradient."""
    from torch._dynamo.utils import counters
    # Two layers, one looped, the second on two lanes: every switch in a graph small enough to compile quickly.
    cfg = small_config(NUM_LAYERS=2, LOOP_START=0, LOOP_END=0, XSA_LAST_N=2, PARALLEL_RESIDUAL_START=1,
                       PARALLEL_LANES_START=1, TTT_MODE="lora", TTT_DOC_BATCH=4, TTT_DOC_CHUNK=16,
                       TTT_SHORT_DOC_CHUNK=8, EVAL_SEQ_LEN=128, TTT_LORA_RANK=8, SMEAR_GATE=1, SPARSE_ATTN_GATE=1,
                       VARLEN_ATTENTION=1)
    model = perturbed_model(cfg, device)
    model.looping = True
    rt = tg.Runtime(0, 1, device)
    adapters = perturbed(tg.DocumentAdapters(cfg, model, cfg.TTT_DOC_BATCH, torch.Generator()).to(device))
    torch._dynamo.reset()
    compiled = tg.lora_forward(cfg, model, rt, backend="inductor")
    warmed_up = counters["stats"]["unique_graphs"]
    eager = tg.lora_nll_function(model)
    g = torch.Generator().manual_seed(2)
    for width, columns in ((40, 16), (97, 8), (128, 16)):
        rows = torch.randint(0, cfg.VOCAB_SIZE, (cfg.TTT_DOC_BATCH, width + 1), generator=g).to(device)
        cols = (torch.randint(0, width - columns + 1, (cfg.TTT_DOC_BATCH, 1), generator=g)
                + torch.arange(columns)).to(device)
        results = []
        for fn in (eager, compiled):
            with rt.autocast(), tg.weights_require_grad(model, False):  # as the LoRA pass runs it
                nll, _ = fn(rows, cols, adapters)
            grads = torch.autograd.grad(nll.float().mean(), list(adapters.parameters()))
            results.append((nll.detach().float(),
                            {n: gr.float() for (n, _), gr in zip(adapters.named_parameters(), grads)}))
        (eager_nll, eager_grads), (compiled_nll, compiled_grads) = results
        assert float((compiled_nll - eager_nll).abs().max()) < 0.05 * float(eager_nll.abs().mean()), width
        assert_gaps_below(compiled_grads, eager_grads, 0.05, f"width {width}: compiled LoRA gradient from eager")
    assert counters["stats"]["unique_graphs"] == warmed_up, "the compiled LoRA forward recompiled after warm-up"


def worst(gaps: dict, n: int = 4) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in sorted(gaps.items(), key=lambda kv: -kv[1])[:n])


def gaps(got: dict, want: dict) -> dict:
    """Each tensor's relative distance."""
    return {n: float((got[n] - g).norm() / g.norm().clamp_min(1e-12)) for n, g in want.items()}


def assert_gaps_below(got: dict, want: dict, limit: float, what: str) -> None:
    """Every tensor's relative distance under `limit`; a failure lists the worst few, not only the first."""
    found = gaps(got, want)
    assert max(found.values()) < limit, f"{what}, relative: {worst(found)}"


def importable(backend: str) -> bool:
    try:
        __import__({"fa3": "flash_attn_interface", "fa2": "flash_attn"}[backend])
        return True
    except ImportError:
        return False


def test_parallel_muon_on_one_gpu_is_the_replicated_muon(device):
    """The banked trainer (bf16 Newton-Schulz, fused AdamW and the bank layout on CUDA) against the unbanked
    model and replicated Muon fed the same batches on the same device, both in float32 without autocast. Under
    bf16 autocast the two models round differently, and AdamW's first steps, about lr x sign(gradient), turn
    the near-zero gradients of the small control vectors into sign flips: the H200 runs found mlp_scale and
    resid_mix 17-35 % apart after one step that way while the matrices agreed within 6 %. That is rounding,
    not the optimizer this test is about (test_compiled_model_is_as_accurate_as_eager covers bf16)."""
    cfg, model, batches = unbanked.small_training_problem()
    model = model.to(device)
    model.compute_dtype = torch.float32
    batches = [b.to(device) for b in batches]
    rt = tg.Runtime(0, 1, device)
    rt.autocast = Float32.autocast
    expected, _ = reference_run(cfg, model, batches)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    optimizers = tg.build_optimizers(cfg, model)
    for step, (batch, want) in enumerate(zip(batches, expected), 1):
        tg.train_step(cfg, model, model, optimizers, batch, rt)
        gaps = {k: relative_gap(model.state_dict(), {k: v}, start) for k, v in want.items()}
        assert max(gaps.values()) < 0.05, f"step {step}: worst {worst(gaps)}"


def test_gptq_on_the_gpu_matches_the_cpu(device):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(256, 512, generator=g)
    X = torch.randn(4096, 512, generator=g) * torch.linspace(0.1, 3.0, 512)  # uneven columns: act-order matters
    H = X.T @ X / X.size(0)
    results = []
    for dev in (torch.device("cpu"), device):
        factor = tg.gptq_factor(H.to(dev), 0.01)
        q, scale = tg.quantize_gptq(W.to(dev), factor, 6, 12.85, 128)
        results.append((q.cpu(), scale.cpu()))
    (q_cpu, s_cpu), (q_dev, s_dev) = results
    torch.testing.assert_close(s_dev, s_cpu, rtol=1e-3, atol=0)
    differ = (q_dev != q_cpu)
    assert differ.float().mean() < 0.01 and (q_dev.int() - q_cpu.int()).abs().max() <= 1


def test_artifact_round_trip_is_bit_exact_from_the_gpu(device):
    cfg = small_config()
    torch.manual_seed(0)
    model = tg.GPT(cfg).to(device)
    model.looping = True
    rt = tg.Runtime(0, 1, device)
    plan = tg.quantization_plan(model, cfg)
    batches = [tokens(cfg, tg.global_seqs(cfg), "cpu") for _ in range(cfg.GPTQ_CALIBRATION_BATCHES)]
    hessians, _ = tg.collect_hessians(cfg, model, plan, batches, rt)
    factors = {k: tg.gptq_factor(H, cfg.GPTQ_DAMP) for k, H in hessians.items()}
    packed = tg.quantize_model(cfg, model, plan, factors)
    blob, _ = tg.encode_artifact(packed, "rans")
    rebuilt = tg.model_from_artifact(tg.decode_artifact(blob), cfg, "sdpa", device)
    lines = []
    tg.check_round_trip(packed, rebuilt, lines.append)  # raises on any tensor that differs by a bit
    assert lines and "bit for bit" in lines[0]


def test_a_training_step_makes_no_host_sync(device):
    """The varlen kernel's document starts come from the micro-batch on the host (host_document_starts): the
    compiled forward and backward then never wait for the GPU. Found on the device instead, nonzero would."""
    if device.type != "cuda":
        pytest.skip("host syncs exist only on a GPU")
    cfg = small_config()
    torch.manual_seed(0)
    model = tg.GPT(cfg).to(device)
    if not model.runs_varlen_kernel(device):
        pytest.skip("no varlen kernel: nothing takes document starts")
    rt, model_fn = tg.Runtime(0, 1, device), tg.compile_model(model)
    batch = packed_documents(cfg, 4, torch.device("cpu"), 20)

    def forward_backward(starts):
        micro = batch.to(device, non_blocking=True)
        with rt.autocast():
            model_fn(micro[:, :-1], micro[:, 1:], doc_starts=starts).mean().backward()

    forward_backward(tg.host_document_starts(model, batch[:, :-1], device))  # compiles
    torch.cuda.synchronize()
    starts = tg.host_document_starts(model, batch[:, :-1], device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        forward_backward(starts)
        with pytest.raises(RuntimeError, match="synchroniz"):  # the check is real: starts found on the device sync
            forward_backward(None)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_flex_document_attention_matches_the_masked_reference(device):
    """DOC_ATTENTION=flex against the dense document mask, compiled, forward and backward."""
    if device.type != "cuda":
        pytest.skip("FlexAttention has no backward on a CPU")
    cfg = small_config()
    model = perturbed_model(cfg, device)
    batch = packed_documents(cfg, 4, device, 20)
    rt = tg.Runtime(0, 1, device)
    model.doc_attention = "mask"
    want_loss, want = loss_and_grads(model, model, batch, rt)
    model.doc_attention = "flex"
    torch._dynamo.reset()
    got_loss, got = loss_and_grads(model, tg.compile_model(model), batch, rt)
    assert got_loss == pytest.approx(want_loss, rel=1e-2)
    for name, grad in want.items():
        gap = (got[name] - grad).norm() / grad.norm().clamp_min(1e-12)
        assert gap < 0.05, (name, float(gap))


def test_a_saved_compile_cache_makes_the_next_compile_warm(device, tmp_path):
    """COMPILE_CACHE: a process that compiled saves the cache artifacts; a new process, with an empty Inductor cache
    of its own, loads them and compiles from them."""
    if device.type != "cuda":
        pytest.skip("the trainer compiles on CUDA only")
    child = ("import json, sys, time, torch; sys.path.insert(0, sys.argv[1]); import train_gpt as tg\n"
             "from torch._dynamo.utils import counters\n"
             "tg.load_compile_cache(sys.argv[2], print)\n"
             "f = torch.compile(lambda x: torch.nn.functional.gelu(x @ x) * 2 + x.sin())\n"
             "t0 = time.perf_counter(); f(torch.randn(256, 256, device='cuda')); torch.cuda.synchronize()\n"
             "seconds = time.perf_counter() - t0\n"
             "tg.save_compile_cache(sys.argv[2], 0, print)\n"
             "print(json.dumps(dict(seconds=seconds, hits=counters['inductor']['fxgraph_cache_hit'])))\n")
    runs = []
    for name in ("cold", "warm"):
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / name)}
        done = subprocess.run([sys.executable, "-c", child, str(Path(tg.__file__).parent), str(tmp_path / "c.bin")],
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert runs[0]["hits"] == 0 and runs[1]["hits"] > 0
    print(f"compile seconds cold {runs[0]['seconds']:.1f}, warm {runs[1]['seconds']:.1f}")
