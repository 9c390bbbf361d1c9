"""FUSED_MLP's Triton kernel, run by Triton's interpreter on the CPU (conftest.py sets TRITON_INTERPRET=1
where there is no GPU) against the eager MLP: forward and every gradient, alone and inside the model.
Skipped where Triton is not installed; on a GPU the `cuda` test in test_cuda.py runs the compiled kernel."""
import os

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from test_model import randomized_model

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton compiles for the GPU here; test_cuda.py checks the kernel", allow_module_level=True)


@pytest.fixture
def fused_mlp():
    return tg.fused_leaky_square_mlp()


def eager_mlp(x, w_up, w_down, slope):
    return F.linear(F.leaky_relu(F.linear(x, w_up), slope).square(), w_down)


def values_and_grads(mlp, x, w_up, w_down, slope, grad):
    inputs = [t.clone().requires_grad_() for t in (x, w_up, w_down)]
    out = mlp(*inputs, slope)
    out.backward(grad)
    return [out.detach()] + [t.grad for t in inputs]


@pytest.mark.parametrize("slope", [0.5, 0.3])
def test_the_fused_mlp_is_the_eager_mlp_forward_and_backward(fused_mlp, slope):
    """Rows, hidden and model widths that are not multiples of the 16-wide tiles, so every mask is exercised;
    half the pre-activations negative, so both branches of the derivative are, at the records' slope and #2140's."""
    g = torch.Generator().manual_seed(0)
    x, w_up, w_down = (torch.randn(*shape, generator=g) for shape in ((3, 13, 24), (72, 24), (24, 72)))
    grad = torch.randn(3, 13, 24, generator=g)
    got = values_and_grads(fused_mlp, x, w_up, w_down, slope, grad)
    want = values_and_grads(eager_mlp, x, w_up, w_down, slope, grad)
    for name, a, b in zip(("output", "dx", "dW_up", "dW_down"), got, want):
        assert a.shape == b.shape
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), f"{name}: off by {(a - b).abs().max():.2e}"


def test_the_model_with_the_fused_mlp_trains_as_the_eager_model(fused_mlp):
    model = randomized_model(MLP_MULT="3", MLP_LEAKY_SLOPE="0.3").float()  # hidden 192: twelve 16-wide tiles
    batch = torch.randint(0, model.tok_emb.num_embeddings, (1, 21), generator=torch.Generator().manual_seed(1))
    losses, grads = [], []
    for fused in (None, fused_mlp):
        for block in model.blocks:
            block.mlp.fused = fused
        model.zero_grad()
        loss = model(batch[:, :-1], batch[:, 1:]).mean()
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    for name, g in grads[0].items():
        assert torch.allclose(grads[1][name], g, rtol=1e-4, atol=1e-6), name


def test_without_gradients_the_mlp_runs_its_hooked_projections(fused_mlp):
    """GPTQ calibration collects each matrix's inputs through hooks on fc and proj under no_grad; the fused
    path would hide them, so it only runs when a gradient is wanted."""
    model = randomized_model().float()
    seen = []
    for block in model.blocks:
        block.mlp.fused = fused_mlp
        block.mlp.proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape))
    batch = torch.randint(0, model.tok_emb.num_embeddings, (1, 9))
    with torch.no_grad():
        model(batch[:, :-1], batch[:, 1:])
    hooked = len(seen)
    assert hooked == len(model.blocks)
    model(batch[:, :-1], batch[:, 1:])
    assert len(seen) == hooked, "the fused path ran the hooked projection"


def test_the_compiled_model_runs_the_fused_mlp_as_eager_does(fused_mlp):
    """torch.compile must keep the kernel opaque (fullgraph: a graph break is an error): the compiled model with
    the fused MLP gives the eager model's loss and gradients. Two layers, one sequential and one parallel: the
    compile is what takes time, and the MLP is the same in every layer."""
    model = randomized_model(MLP_MULT="3", NUM_LAYERS="2", XSA_LAST_N="2", NUM_LOOPS="0",
                             PARALLEL_RESIDUAL_START="1").float()
    batch = torch.randint(0, model.tok_emb.num_embeddings, (1, 33), generator=torch.Generator().manual_seed(2))
    results = []
    for fused, run in ((None, model), (fused_mlp, tg.compile_model(model))):
        for block in model.blocks:
            block.mlp.fused = fused
        model.zero_grad()
        loss = run(batch[:, :-1], batch[:, 1:]).mean()
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-5)
    for name, g in eager_grads.items():
        assert torch.allclose(compiled_grads[name], g, rtol=1e-3, atol=1e-5), name
