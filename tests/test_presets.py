"""The presets: PRESET=record is the frontier stack (the defaults), PRESET=r1081 the 1.0810 record as it ran."""
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
