"""Muon (Newton-Schulz band, MuonEq-R, shape scale, decay), schedules and EMA."""

import numpy as np
import pytest
import torch

import train_gpt as tg
from train_gpt import config_from_env


def apply_polynomial(coeffs, s):
    for a, b, c in coeffs:
        s = a * s + b * s ** 3 + c * s ** 5
    return s


def matrix_with_singular_values(rows: int, cols: int, singular_values: torch.Tensor):
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(rows, len(singular_values), dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, len(singular_values), dtype=torch.float64))
    return u, v, u @ torch.diag(singular_values) @ v.T


@pytest.mark.parametrize("kind", ["quintic", "polar_express"])
@pytest.mark.parametrize("shape", [(64, 128), (128, 64), (96, 96)])
def test_newton_schulz_singular_values_lie_in_the_polynomial_band(kind, shape):
    """The output keeps the input's singular vectors and maps each normalized singular value
    through the iteration's scalar polynomial, so all of them land in its band near 1."""
    n = min(shape)
    s = torch.logspace(0, 1, n, dtype=torch.float64)  # condition number 10
    u, v, g = matrix_with_singular_values(*shape, s)
    coeffs = tg.newton_schulz_coeffs(kind, 5)
    grid = np.linspace(float(s.min() / s.norm()), 1.0, 200001)
    band = apply_polynomial(coeffs, grid)
    out = tg.newton_schulz(g.float(), coeffs).double()
    s_out = torch.linalg.svdvals(out)
    assert band.min() - 1e-4 <= s_out.min() and s_out.max() <= band.max() + 1e-4
    assert 0.6 < band.min() and band.max() < 1.25  # nearly orthogonal
    expected = u @ torch.diag(apply_polynomial(coeffs, s / s.norm())) @ v.T
    assert torch.allclose(out, expected, atol=2e-4)


# The 1.0611 record's _PE_COEFFS, written out from its train_gpt.py (2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_
# 9HpStack_1.0611): exact, not rounded.
RECORD_POLAR_EXPRESS = [(8.156554524902461, -22.48329292557795, 15.878769915207462),
                        (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                        (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                        (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                        (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)]


def test_quintic_is_repeated_and_polar_express_is_the_records_exact_tuples():
    assert tg.newton_schulz_coeffs("quintic", 7) == [tg.QUINTIC_COEFFS] * 7
    assert tg.newton_schulz_coeffs("polar_express", 5) == RECORD_POLAR_EXPRESS  # exact float equality
    assert tg.newton_schulz_coeffs("polar_express", 3) == RECORD_POLAR_EXPRESS[:3]


def test_more_polar_express_steps_than_tuples_is_refused_by_name():
    with pytest.raises(tg.ConfigError, match=r"MUON_BACKEND_STEPS=6 with MUON_NS_COEFFS=polar_express.*<= 5"):
        tg.config_from_env({"MUON_BACKEND_STEPS": "6"})
    assert tg.config_from_env({"MUON_BACKEND_STEPS": "6", "MUON_NS_COEFFS": "quintic"}).MUON_BACKEND_STEPS == 6


def test_row_normalization_gives_unit_rows():
    g = torch.randn(8, 32) * torch.logspace(-3, 3, 8)[:, None]
    assert torch.allclose(tg.normalize_rows(g).norm(dim=1), torch.ones(8), atol=1e-6)


def test_muoneq_r_makes_the_update_blind_to_row_scale():
    torch.manual_seed(0)
    g = torch.randn(32, 64)
    scaled = g.clone()
    scaled[3] *= 100.0
    coeffs = tg.newton_schulz_coeffs("quintic", 5)
    on = lambda x: tg.muon_direction(x, True, coeffs)
    off = lambda x: tg.muon_direction(x, False, coeffs)
    assert torch.allclose(on(g), on(scaled), atol=1e-5)
    assert not torch.allclose(off(g), off(scaled), atol=1e-2)


def test_shape_scale_for_tall_matrices():
    torch.manual_seed(0)
    coeffs = tg.newton_schulz_coeffs("quintic", 5)
    tall = torch.randn(256, 64)
    ratio = tg.muon_direction(tall, False, coeffs).norm() / tg.newton_schulz(tall, coeffs).norm()
    assert ratio == pytest.approx(2.0, rel=1e-5)


def test_muon_step_is_nesterov_then_decay_then_update_per_matrix_of_a_bank():
    torch.manual_seed(0)
    bank = torch.nn.Parameter(torch.randn(3, 16, 32))
    start = bank.detach().clone()
    opt = tg.ParallelMuon([bank], lr=0.1, momentum=0.9, weight_decay=0.5, row_normalize=True,
                          coeffs=tg.newton_schulz_coeffs("quintic", 5))
    grads = [torch.randn(3, 16, 32) for _ in range(2)]
    scales = [1.0, 0.25]  # the global clip factor scales the gradient before momentum
    for g, scale in zip(grads, scales):
        bank.grad = g.clone()
        opt.launch_reduce_scatters()
        opt.step(scale)
    for i in range(3):
        expected, buf = start[i].clone(), torch.zeros(16, 32)
        for g, scale in zip(grads, scales):
            buf = 0.9 * buf + scale * g[i]
            expected = expected * (1 - 0.1 * 0.5) - 0.1 * tg.muon_direction(scale * g[i] + 0.9 * buf, True, opt.coeffs)
        assert torch.allclose(bank.detach()[i], expected, atol=1e-6)


def test_parameter_groups_cover_every_parameter_once():
    model = tg.GPT(config_from_env(dict(NUM_LAYERS="3", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2", ROPE_DIMS="8",
                                        VOCAB_SIZE="50", LOOP_START="0", LOOP_END="1")))
    adam, muon = tg.build_optimizers(config_from_env({}), model)
    groups = [g["params"] for g in adam.param_groups] + [g["params"] for g in muon.param_groups]
    ids = [id(p) for group in groups for p in group]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert adam.param_groups[0]["params"] == [model.tok_emb.weight]
    # The four banks, largest first, so the largest reduce-scatter starts first.
    assert muon.param_groups[0]["params"] == [model.mlp_up_bank, model.mlp_down_bank, model.qo_bank, model.kv_bank]
    assert [tuple(p.shape) for p in muon.param_groups[0]["params"]] == [(3, 256, 64), (3, 64, 256), (6, 64, 64), (6, 32,
                                                                                                                  64)]
    assert any(p is model.blocks[0].resid_mix for p in adam.param_groups[1]["params"])  # 2-D but a control


def test_lr_schedule_is_flat_then_linear_warmdown_with_floor():
    cfg = config_from_env({"WARMDOWN_FRAC": "0.5", "MIN_LR": "0.1"})
    assert tg.lr_multiplier(cfg, 0.0) == tg.lr_multiplier(cfg, 0.49) == 1.0
    assert tg.lr_multiplier(cfg, 0.75) == pytest.approx(0.5)
    assert tg.lr_multiplier(cfg, 0.99) == pytest.approx(0.1)


def test_momentum_warmup_and_training_fraction():
    cfg = config_from_env({"MUON_MOMENTUM_WARMUP_STEPS": "100", "ITERATIONS": "1000"})
    assert tg.muon_momentum(cfg, 0) == pytest.approx(0.92)
    assert tg.muon_momentum(cfg, 50) == pytest.approx((0.92 + cfg.MUON_MOMENTUM) / 2)
    assert tg.muon_momentum(cfg, 100) == tg.muon_momentum(cfg, 5000) == cfg.MUON_MOMENTUM == 0.97
    assert tg.training_fraction(cfg, 10, 294.0, 588.0) == pytest.approx(0.5)  # time dominates: 294 of 588 s
    assert tg.training_fraction(cfg, 900, 1.0, 588.0) == pytest.approx(0.9)  # the step cap dominates
    steps_only = config_from_env({"MAX_WALLCLOCK_SECONDS": "0", "ITERATIONS": "200"})
    assert tg.training_fraction(steps_only, 50, 1e9, float("inf")) == pytest.approx(0.25)


def test_the_stop_rule_predicts_the_next_step_from_the_slowest_recent_one():
    steady = [0.1] * 20
    assert not tg.next_step_would_overrun(9.85, steady, 10.0)
    assert tg.next_step_would_overrun(9.95, steady, 10.0)
    spiky = steady[:-3] + [0.5] + steady[-2:]  # one slow step among the last few sets the prediction
    assert tg.next_step_would_overrun(9.6, spiky, 10.0)
    old_spike = [0.5] + steady  # ... but not once it is more than RECENT_STEPS steps old
    assert not tg.next_step_would_overrun(9.6, old_spike, 10.0)


def test_the_time_rule_caps_data_access_not_quantization():
    assert tg.train_data_seconds(588.0, 11.9) == pytest.approx(599.9)
    assert tg.train_time_violation(tg.train_data_seconds(588.0, 11.9)) is None
    assert "training data was read for 600.5s (steps + GPTQ calibration) > 600s" == tg.train_time_violation(
        tg.train_data_seconds(588.0, 12.5))
    assert tg.train_data_seconds(3.0, None) == 3.0  # no calibration (RTN)
    # Quantization and compression read no data: the report counts them in production time only.
    report = tg.time_rule_report(tg.config_from_env({}), 588.0, 12.5, print)
    assert report.train_data_seconds == pytest.approx(600.5) and "600.5s" in report.train_time_violation


def test_schedule_sets_every_group():
    model = tg.GPT(config_from_env(dict(NUM_LAYERS="2", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2",
                                        ROPE_DIMS="8", VOCAB_SIZE="50", NUM_LOOPS="0")))
    cfg = config_from_env({"WARMDOWN_FRAC": "1.0"})
    optimizers = tg.build_optimizers(cfg, model)
    tg.set_schedule(cfg, optimizers, step=0, frac=0.75)
    lrs = [g["lr"] for opt in optimizers for g in opt.param_groups]
    assert lrs == pytest.approx([0.25 * cfg.TIED_EMBED_LR, 0.25 * cfg.SCALAR_LR, 0.25 * cfg.MATRIX_LR])
    assert optimizers.muon.param_groups[0]["momentum"] == pytest.approx(0.92)


def test_ema_tracks_the_weights():
    model = torch.nn.Linear(4, 4)
    ema = tg.EMA(model, decay=0.9)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()
    ema.copy_to()
    assert torch.allclose(model.weight, start + 0.1)
