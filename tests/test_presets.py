"""The presets: PRESET=record is the 1.05651 row, PR #2135 (the defaults), PRESET=r1061 the 1.0611 record and
PRESET=r1081 the 1.0810 record, each as it ran."""
import dataclasses

import pytest
import torch

import train_gpt as tg


def test_r1081_is_the_1_0810_record_step_for_step():
    """Parameter count and the first two training losses on a fixed batch, pinned from the trainer that was
    checked against the record script (fed the same batches and initial weights, it tracked its losses)."""
    cfg = tg.config_from_env({"PRESET": "r1081"})
    torch.manual_seed(cfg.SEED)
    model = tg.GPT(cfg.model)
    assert sum(p.numel() for p in model.parameters()) == 35_944_536
    optimizers = tg.build_optimizers(cfg, model)
    batch = torch.randint(0, cfg.VOCAB_SIZE, (8, 65), generator=torch.Generator().manual_seed(1234))
    losses = []
    for step in range(2):
        tg.set_schedule(cfg, optimizers, step, 0.0)
        losses.append(tg.train_step(cfg, model, model, optimizers, batch, tg.Runtime(0, 1, torch.device("cpu"))))
    assert [x.item() for x in losses] == pytest.approx([9.014669418334961, 11.13428783416748], rel=1e-5)


SMALL = dict(VOCAB_SIZE="512", NUM_LAYERS="6", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2", ROPE_DIMS="8",
             XSA_LAST_N="6", LOOP_START="2", LOOP_END="3", PARALLEL_RESIDUAL_START="4", PARALLEL_LANES_START="5")


@pytest.mark.parametrize("preset, params, losses", [
    ("record", 305_611, [6.239854335784912, 5.9535627365112305]),
    ("r1061", 305_611, [6.239854335784912, 5.954618453979492]),
    ("r1081", 305_304, [6.239854335784912, 5.954691410064697]),
])
def test_each_preset_trains_as_pinned_at_a_small_shape(preset, params, losses):
    """Every preset's training stack at one small shape, on a batch with document starts: its parameter count
    and first two losses, pinned when the presets were written (record and r1061 differ in MATRIX_LR alone among
    the training knobs; r1081 has no SmearGate, gates or document isolation). A change to a preset's training
    moves these numbers."""
    cfg = tg.config_from_env(dict(SMALL, PRESET=preset, **({"PARALLEL_LANES_START": "6"} if preset == "r1081" else {})))
    torch.manual_seed(cfg.SEED)
    model = tg.GPT(cfg.model)
    assert sum(p.numel() for p in model.parameters()) == params
    optimizers = tg.build_optimizers(cfg, model)
    batch = torch.randint(2, cfg.VOCAB_SIZE, (8, 65), generator=torch.Generator().manual_seed(1234))
    batch[:, 0] = batch[:, 30] = cfg.BOS_ID
    got = []
    for step in range(2):
        tg.set_schedule(cfg, optimizers, step, 0.0)
        got.append(tg.train_step(cfg, model, model, optimizers, batch, tg.Runtime(0, 1, torch.device("cpu"))).item())
    assert got == pytest.approx(losses, rel=1e-5)


def test_record_is_2135s_launch_command_and_r1061_the_1_0611_records():
    """The knobs #2135's launch command sets (its README), where our names differ: TTT_K_LORA=0 -> TTT_LORA_K,
    TTT_WEIGHT_DECAY -> TTT_LORA_WD, PHASED_TTT_NUM_PHASES -> PHASED_TTT_PHASES, LQER_ASYM_GROUP -> LQER_GROUP,
    GATED_ATTN_QUANT_GATE (unset, 0) -> QUANT_ATTN_GATE; and the 1.0611 record's values of the same knobs."""
    record, r1061 = tg.config_from_env({}), tg.config_from_env({"PRESET": "r1061"})
    assert (record.TTT_ENABLED, record.TTT_MODE, record.EVAL_SEQ_LEN) == (1, "lora", 2560)
    assert (record.PHASED_TTT_PHASES, record.PHASED_TTT_PREFIX_DOCS, record.TTT_LORA_LR, record.TTT_LORA_BETA2,
            record.TTT_LORA_WD, record.TTT_LORA_RANK, record.TTT_WARM_START_A) == (1, 2500, 8e-5, 0.99, 2.0, 80, 1)
    assert (record.TTT_LORA_K, record.TTT_LORA_O, record.TTT_LORA_MLP, record.TTT_LORA_NO_QV) == (0, 1, 1, 0)
    assert (record.MATRIX_CLIP_SIGMAS, record.ATTN_CLIP_SIGMAS, record.MLP_CLIP_SIGMAS, record.EMBED_CLIP_SIGMAS,
            record.EMBED_BITS) == (12.85, 13.0, 11.5, 14.0, 7)
    assert (record.MATRIX_LR, record.MIN_LR, record.WARMDOWN_FRAC, record.BETA2, record.EMA_DECAY) == (
        0.028, 0.1, 0.85, 0.99, 0.9965)
    assert (record.LQER_RANK, record.LQER_TOP_K, record.LQER_GROUP, record.LQER_A_BITS, record.LQER_B_BITS) == (
        4, 3, 32, 2, 4)
    assert (record.GPTQ_CALIBRATION_BATCHES, record.QUANT_ATTN_GATE, record.SPARSE_ATTN_GATE_SCALE) == (8, 0, 0.5)  # #2135: 32
    assert (record.NGRAM_TILT, record.NGRAM_ORDER, record.NGRAM_THRESHOLD, record.NGRAM_BOOST) == (1, 16, 0.8, 2.625)
    assert record.MLP_LEAKY_SLOPE == 0.5 and record.SMEAR_BOS_MASK == 1  # #2135 runs 0: docs/how_a_run_works.md
    assert (r1061.EVAL_SEQ_LEN, r1061.PHASED_TTT_PHASES, r1061.TTT_LORA_LR, r1061.TTT_LORA_WD, r1061.TTT_LORA_K,
            r1061.MATRIX_LR, r1061.GPTQ_CALIBRATION_BATCHES, r1061.LQER_GROUP, r1061.QUANT_ATTN_GATE) == (
        2048, 3, 1e-4, 0.5, 1, 0.026, 16, 64, 1)
    changed = {k for k, v in dataclasses.asdict(record).items() if getattr(r1061, k) != v}
    assert changed == set(tg.R1061_PRESET) | {"PRESET"}


def test_record_is_the_defaults_and_turns_on_every_frontier_piece():
    record, defaults = tg.config_from_env({"PRESET": "record"}), tg.config_from_env({})
    assert record == defaults
    assert (record.SMEAR_GATE, record.SPARSE_ATTN_GATE, record.VARLEN_ATTENTION) == (1, 1, 1)
    assert record.PARALLEL_LANES_START < record.NUM_LAYERS and record.MIN_LR > 0
    assert record.MUON_NS_COEFFS == "polar_express"
    assert record.COMPRESSOR == "rans" and tg.config_from_env({"PRESET": "r1081"}).COMPRESSOR == "brotli"


def test_r1081_differs_from_the_record_in_its_own_knobs_only():
    record = dataclasses.asdict(tg.config_from_env({}))
    r1081 = dataclasses.asdict(tg.config_from_env({"PRESET": "r1081"}))
    changed = {k for k in record if record[k] != r1081[k]}
    assert changed == set(tg.R1081_PRESET) | {"PRESET"}


def test_an_explicit_knob_wins_over_the_preset():
    cfg = tg.config_from_env({"PRESET": "r1081", "SMEAR_GATE": "1", "MATRIX_LR": "0.03"})
    assert (cfg.SMEAR_GATE, cfg.MATRIX_LR, cfg.QK_GAIN_INIT) == (1, 0.03, 5.25)
