"""Banked weights and Parallel Muon against the unbanked model and the replicated Muon."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_gpt as tg
import unbanked

REPO_ROOT = Path(__file__).resolve().parent.parent


def unbanked_copy(cfg, model: tg.GPT) -> unbanked.UnbankedGPT:
    reference = unbanked.UnbankedGPT(cfg).to(model.tok_emb.weight.device)  # on the GPU when the model is
    reference.load_state_dict(model.state_dict())
    reference.looping = model.looping
    return reference


def reference_run(cfg, model: tg.GPT, batches):
    """The foundation trainer on one process: 8 micro-batches, global clip, replicated Muon.
    Returns the per-matrix state after every step and every pre-clip global norm."""
    reference = unbanked_copy(cfg, model)
    adam, muon = unbanked.replicated_optimizers(cfg, reference)
    states, norms = [], []
    for batch in batches:
        for micro in batch.chunk(8):
            (reference(micro[:, :-1], micro[:, 1:]).mean() / 8).backward()
        norms.append(unbanked.replicated_step(cfg, reference, adam, muon))
        states.append({k: v.clone() for k, v in reference.state_dict().items()})
    return states, norms


def relative_gap(state, expected, start) -> float:
    """Largest, over tensors, distance to the expected weights relative to how far those moved."""
    return max(float((state[k] - expected[k]).norm() / (expected[k] - start[k]).norm().clamp_min(1e-12)) for k in expected)


def test_state_dict_speaks_per_matrix_names_and_round_trips():
    cfg, model, _ = unbanked.small_training_problem()
    state = model.state_dict()
    assert set(state) == set(unbanked.UnbankedGPT(cfg).state_dict())  # no bank names leak out
    assert state["blocks.2.attn.c_k.weight"].shape == (32, 64) and state["blocks.1.mlp.proj.weight"].shape == (64, 128)
    assert torch.equal(state["blocks.1.attn.proj.weight"], model.qo_bank[cfg.NUM_LAYERS + 1])
    assert torch.equal(state["blocks.2.attn.c_v.weight"], model.kv_bank[cfg.NUM_LAYERS + 2])
    fresh = tg.GPT(cfg)
    fresh.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))
    with pytest.raises(RuntimeError, match="Missing key"):
        fresh.load_state_dict({k: v for k, v in state.items() if k != "blocks.0.mlp.fc.weight"})


def test_an_artifact_of_per_matrix_tensors_rebuilds_the_banked_model():
    """The artifact stores one tensor per matrix, as it did before banks: one written from the
    unbanked model decodes into a banked model that computes the same function."""
    cfg, model, batches = unbanked.small_training_problem()
    reference = unbanked_copy(cfg, model)
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(p.half().float())  # the fp16 pass-through rounding, applied to both sides
    qm = tg.QuantizedModel({}, {k: v.half() for k, v in reference.state_dict().items()}, cfg.model)
    blob, _ = tg.encode_artifact(qm, "lzma")
    rebuilt = tg.model_from_artifact(tg.decode_artifact(blob), cfg, "sdpa", torch.device("cpu"))
    reference.looping = rebuilt.looping
    x, y = batches[0][:, :-1], batches[0][:, 1:]
    with torch.no_grad():
        assert torch.equal(rebuilt(x, y), reference(x, y))


@pytest.mark.parametrize("looping", [False, True])
def test_banked_model_equals_the_unbanked_model_with_the_same_weights(looping):
    cfg, model, batches = unbanked.small_training_problem()
    model.looping = looping
    reference = unbanked_copy(cfg, model)
    x, y = batches[0][:, :-1], batches[0][:, 1:]
    banked_nll, reference_nll = model(x, y), reference(x, y)
    assert torch.equal(banked_nll, reference_nll)
    banked_nll.mean().backward()
    reference_nll.mean().backward()
    # Each matrix's gradient is its bank's slice: the state-dict names line up both ways.
    grads = dict(unbanked.bank_named_grads(model))
    for name, p in reference.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-7)


def test_parallel_muon_on_one_rank_is_the_replicated_muon():
    cfg, model, batches = unbanked.small_training_problem()
    expected, expected_norms = reference_run(cfg, model, batches)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    optimizers = tg.build_optimizers(cfg, model)
    rt = tg.Runtime(0, 1, torch.device("cpu"))
    for batch, want, want_norm in zip(batches, expected, expected_norms):
        tg.train_step(cfg, model, model, optimizers, batch, rt)
        assert relative_gap(model.state_dict(), want, start) < 1e-4
    assert all(n > cfg.GRAD_CLIP_NORM for n in expected_norms)  # the clip was binding throughout


def test_newton_schulz_batched_over_a_bank_equals_one_matrix_at_a_time():
    torch.manual_seed(0)
    bank = torch.randn(5, 48, 32)
    coeffs = tg.newton_schulz_coeffs("quintic", 5)
    batched = tg.muon_direction(bank, True, coeffs)
    for i in range(5):
        torch.testing.assert_close(batched[i], tg.muon_direction(bank[i], True, coeffs), rtol=1e-5, atol=1e-6)


# bf16 tolerance: rounding one gradient of this problem to bf16 alone moves its Newton-Schulz
# output by up to 1.7% (its smallest singular values are 1e-4 of the largest, and the iteration
# amplifies error there); the two ranks' bf16 halves, their sum and the bf16 update add to that.
@pytest.mark.parametrize("comm_dtype, tolerance, norm_rtol", [("float32", 1e-4, 1e-5), ("bfloat16", 0.05, 3e-3)])
def test_two_gloo_ranks_match_the_replicated_muon(comm_dtype, tolerance, norm_rtol, tmp_path):
    """Whole matrices are sharded (the 3-matrix MLP banks are padded to 4), updates all-gathered,
    and the clip uses the true global norm: two ranks follow the one-process reference, exactly up
    to float32 summation order, and within bf16 rounding when gradients and updates travel in bf16.
    A per-rank (local) clip norm would miss the reference norms by far more than norm_rtol."""
    out = tmp_path / "two.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO_ROOT / "tests" / "muon_worker.py"), str(out), comm_dtype]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    two = torch.load(out)
    cfg, model, batches = unbanked.small_training_problem()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    expected, expected_norms = reference_run(cfg, model, batches)
    for step, (state, want) in enumerate(zip(two["states"], expected)):
        assert relative_gap(state, want, start) < tolerance, f"step {step}"
    norms = torch.stack([n.reshape(()) for n in two["norms"]])
    torch.testing.assert_close(norms, torch.stack(expected_norms), rtol=norm_rtol, atol=0)
    assert bool((norms > cfg.GRAD_CLIP_NORM).all())


def test_training_compiles_one_graph_and_looping_exactly_one_more():
    """fullgraph, static shapes, and the LR/momentum outside the graph: steps with a changing
    schedule never recompile (recompile limit 1); switching recurrence on adds exactly one graph,
    and validation (inference mode) one per looping state."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    cfg, model, batches = unbanked.small_training_problem()
    model.looping = False
    model_fn = tg.compile_model(model, backend=counting_backend)
    optimizers = tg.build_optimizers(cfg, model)
    rt = tg.Runtime(0, 1, torch.device("cpu"))
    strict = dict(fail_on_recompile_limit_hit=True)

    schedule = set()

    def steps(first: int, count: int) -> None:
        for step in range(first, first + count):
            tg.set_schedule(cfg, optimizers, step, frac=0.2 * step)
            group = optimizers.muon.param_groups[0]
            schedule.add((group["lr"], group["momentum"]))
            tg.train_step(cfg, model_fn, model, optimizers, batches[step % len(batches)], rt)

    with torch._dynamo.config.patch(recompile_limit=1, **strict):
        steps(0, 3)
    assert len(graphs) == 1 and len(schedule) == 3  # three different (LR, momentum) pairs, one graph
    model.looping = True
    with torch._dynamo.config.patch(recompile_limit=2, **strict):
        steps(3, 3)
    assert len(graphs) == 2
    val = torch.cat(batches).flatten()
    with torch._dynamo.config.patch(recompile_limit=3, **strict):
        for _ in range(2):
            no = torch.zeros(97, dtype=torch.bool)
            tg.evaluate(model_fn, tg.ValidationData(val, (torch.ones(97, dtype=torch.long), no, no)), cfg.TRAIN_SEQ_LEN,
                        4, rt)
        steps(6, 2)
    assert len(graphs) == 3
    torch._dynamo.reset()
