"""bench/ablate.py: the baseline it trains is the trainer's own run, and each variant gets its knobs."""
import json
import sys
from pathlib import Path

import train_gpt as tg
from test_training import tiny_env

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "bench"))
import ablate  # noqa: E402


def test_ablation_table_matches_the_trainers_own_runs(small_sample, tmp_path, capsys):
    knobs = dict(TTT_ENABLED=0, SLOT_ENABLED=0, ITERATIONS=4, VAL_LOSS_EVERY=0, GPTQ_CALIBRATION_BATCHES=2)
    shared = {k: v for k, v in tiny_env(small_sample, tmp_path, **knobs).items()
              if k not in ("LOG_DIR", "RUN_ID", "SEED")}
    out = tmp_path / "ablate.json"
    ablate.main(["--seeds", "3", "--variant", "smear:SMEAR_GATE=0", "--json", str(out),
                 *(f"{k}={v}" for k, v in shared.items())])
    runs = json.loads(out.read_text())["runs"]
    direct = tg.main({**shared, "SEED": "3", "LOG_DIR": str(tmp_path / "direct"), "RUN_ID": "base"})
    assert runs["baseline"][0]["val_bpb"] == direct["val_bpb"]
    assert runs["baseline"][0]["pre_quant_val_bpb"] == direct["pre_quant_val_bpb"]
    assert runs["smear"][0]["val_bpb"] != direct["val_bpb"]  # the variant's knob reached its run
    printed = capsys.readouterr().out
    assert "| baseline |" in printed and "| smear |" in printed


def test_a_variant_value_may_hold_commas():
    assert ablate.parse_variant("ctx:SMEAR_GATE=1,TRAIN_SEQ_SCHEDULE=64:0.3,128:0.6,MIN_LR=0.1") == (
        "ctx", {"SMEAR_GATE": "1", "TRAIN_SEQ_SCHEDULE": "64:0.3,128:0.6", "MIN_LR": "0.1"})
