"""The CUDA paths, checked against their CPU or eager references on a GPU.

Marked `cuda` and skipped without a GPU; `python3 bench/gpu_check.py` runs them and tabulates the
outcome. CUDA_CHECK_DEVICE=cpu runs the same checks on the CPU, to debug the checks themselves.
"""
import os

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


def tokens(cfg: tg.Config, rows: int, device) -> torch.Tensor:
    return torch.randint(0, cfg.VOCAB_SIZE, (rows, cfg.TRAIN_SEQ_LEN + 1),
                         generator=torch.Generator().manual_seed(0)).to(device)


def loss_and_grads(model: tg.GPT, model_fn, batch: torch.Tensor, rt: tg.Runtime):
    model.zero_grad(set_to_none=True)
    with rt.autocast():
        loss = model_fn(batch[:, :-1], batch[:, 1:]).mean()
    loss.backward()
    return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("looping", [False, True])
def test_compiled_model_matches_eager(device, looping):
    cfg = small_config()
    torch.manual_seed(0)
    model = tg.GPT(cfg).to(device)
    model.looping = looping
    rt = tg.Runtime(0, 1, device)
    batch = tokens(cfg, 4, device)
    eager_loss, eager_grads = loss_and_grads(model, model, batch, rt)
    compiled_loss, compiled_grads = loss_and_grads(model, tg.compile_model(model), batch, rt)
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-2)  # bf16 autocast on both sides
    for name, g in eager_grads.items():
        gap = float((compiled_grads[name] - g).norm() / g.norm().clamp_min(1e-12))
        assert gap < 0.05, f"{name}: compiled gradient is {gap:.3f} (relative) from eager"


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


def importable(backend: str) -> bool:
    try:
        __import__({"fa3": "flash_attn_interface", "fa2": "flash_attn"}[backend])
        return True
    except ImportError:
        return False


def test_parallel_muon_on_one_gpu_is_the_replicated_muon(device):
    """The banked trainer (bf16 autocast, bf16 Newton-Schulz, fused AdamW on CUDA) against the
    unbanked model and replicated Muon fed the same batches on the same device."""
    cfg, model, batches = unbanked.small_training_problem()
    model = model.to(device)
    batches = [b.to(device) for b in batches]
    rt = tg.Runtime(0, 1, device)
    with rt.autocast():
        expected, _ = reference_run(cfg, model, batches)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    optimizers = tg.build_optimizers(cfg, model)
    for batch, want in zip(batches, expected):
        tg.train_step(cfg, model, model, optimizers, batch, rt)
        assert relative_gap(model.state_dict(), want, start) < 0.05  # bf16 rounding, as in the two-rank test


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
    blob, _ = tg.encode_artifact(packed, "lzma")
    rebuilt = tg.model_from_artifact(tg.decode_artifact(blob), cfg, "sdpa", device)
    lines = []
    tg.check_round_trip(packed, rebuilt, lines.append)  # raises on any tensor that differs by a bit
    assert lines and "bit for bit" in lines[0]
