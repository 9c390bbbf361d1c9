"""bench/quant_ablate.py: its baseline is the trainer's own quantized model, and variants move bytes and error."""
import sys
from pathlib import Path

import pytest

import train_gpt as tg
from test_training import tiny_env

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "bench"))
import quant_ablate  # noqa: E402


def test_baseline_is_the_trainers_quantized_model_and_lqer_trades_bytes_for_error(small_sample, tmp_path, capsys):
    env = tiny_env(small_sample, tmp_path, TTT_ENABLED=0, SLOT_ENABLED=0, VAL_LOSS_EVERY=0)
    out = tmp_path / "quant.json"
    batches = tg.config_from_env(env).GPTQ_CALIBRATION_BATCHES
    quant_ablate.main(["--variant", "no_lqer:LQER_RANK=0", "--json", str(out), "--reference-batches", "6",
                       "--calibration", f"same:batches={batches}", "--calibration", "last2:batches=2,source=last",
                       *(f"{k}={v}" for k, v in env.items() if k not in ("LOG_DIR", "RUN_ID"))])
    results = tg.json.loads(out.read_text())["results"]
    same, last = results.pop("same"), results.pop("last2")  # Hessians as the trainer collects them, and others
    assert {k: v for k, v in same.items() if k != "calibration_seconds"} == \
           {k: v for k, v in results["baseline"].items() if k != "calibration_seconds"}
    assert last["weighted_error"]["all"] != same["weighted_error"]["all"]
    run = tg.main(env)
    assert results["baseline"]["quantized_val_bpb"] == run["quantized_val_bpb"]
    assert abs(results["baseline"]["model_bytes"] - run["model_bytes"]) <= 64  # the header's run id differs
    lqer, plain = results["baseline"], results["no_lqer"]
    assert lqer["bytes_by_group"]["lqer"] > 0 == plain["bytes_by_group"]["lqer"]
    assert lqer["weighted_error"]["all"] < plain["weighted_error"]["all"]
    assert "| no_lqer |" in capsys.readouterr().out


def test_a_variant_that_changes_training_is_refused():
    cfg = tg.config_from_env({})
    with pytest.raises(SystemExit, match="NUM_LAYERS changes training, not quantization"):
        quant_ablate.variant_config(cfg, {"NUM_LAYERS": "9"})


@pytest.mark.parametrize("text", ["x:batches=0", "x:stride=2", "x:batches=4,source=middle", "batches=4", "x:batches=4,y=1"])
def test_a_malformed_calibration_is_refused(text):
    with pytest.raises(SystemExit, match="is not LABEL:batches=N"):
        quant_ablate.parse_calibration(text)
