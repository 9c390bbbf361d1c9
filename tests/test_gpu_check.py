"""bench/gpu_check.py --tiny: every step of the GPU check, at tiny size on the CPU."""
import json
import subprocess
import sys
from pathlib import Path

import train_gpt as tg

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_tiny_gpu_check_runs_every_step_and_writes_its_table(small_sample, tmp_path):
    """On a corpus tokenized before (--corpus), as the GPU runs use it; --tiny alone would build the same one."""
    corpus = Path(small_sample["dataset_dir"]).parent.parent
    done = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "gpu_check.py"), "--tiny", "--corpus", str(corpus),
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    steps = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(steps) == ["environment", "cuda tests", "training run", "lora ttt eval", "throughput"]
    env = steps["environment"]["figures"]
    assert env["attention_backend"] == "sdpa" and env["gpu"] == "none" and "brotli" in env
    # Without a GPU every cuda check is collected and skipped, none fails.
    assert steps["cuda tests"]["status"] == "skip" and len(steps["cuda tests"]["figures"]) >= 5
    assert set(steps["cuda tests"]["figures"].values()) == {"skip"}
    assert steps["throughput"]["status"] == "pass" and steps["throughput"]["figures"]["plain_ms_per_step"] > 0
    lora = steps["lora ttt eval"]
    assert lora["status"] == "pass" and lora["figures"]["ttt_lora_steps"] > 0 and lora["figures"]["ttt_seconds"] > 0
    run = steps["training run"]
    assert run["status"] == "pass" and run["figures"]["steps"] == 10
    summary = json.loads((tmp_path / "logs" / "gpu_check.json").read_text())
    assert run["figures"]["val_bpb"] == summary["val_bpb"] and summary["status"] == "ok"
    assert run["figures"]["model_bytes"] == summary["model_bytes"] and run["figures"]["decompress_seconds"] > 0
    assert "| training run | pass |" in done.stdout and "| cuda tests | skip (all skipped (no GPU)) |" in done.stdout


def test_a_run_stopped_at_its_time_limit_shows_where_it_hung_and_leaves_its_summary(tmp_path):
    """A hung training run (here: stuck in a sleep where training would be) is asked for its threads' stacks,
    then stopped with SIGTERM, so the log says where it was and the summary says it was killed."""
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import gpu_check

    child = ("import sys, time; sys.path.insert(0, sys.argv[1]); import train_gpt as tg\n"
             "def stuck_in_training(*args):\n    time.sleep(600)\n"
             "tg.train_and_evaluate = stuck_in_training\ntg.main()\n")
    env = {**gpu_check.os.environ, "PRESET": "sample", "LOG_DIR": str(tmp_path / "logs"), "RUN_ID": "hung",
           "DATA_PATH": str(tmp_path / "no_data"), "TOKENIZER_PATH": str(tmp_path / "none.model")}  # never read
    log = tmp_path / "run.log"
    try:
        gpu_check.run_logged([sys.executable, "-c", child, str(REPO_ROOT)], env, log, 12, float("inf"))
        raise AssertionError("the hung run returned")
    except gpu_check.OutOfTime as stopped:
        assert "stopped after 12s" in str(stopped)
    text = log.read_text()
    assert "most recent call first" in text and "in stuck_in_training" in text, text[-2000:]
    summary = json.loads((tmp_path / "logs" / "hung.json").read_text())
    assert summary["status"] == "failed" and "SIGTERM" in summary["error"]


def test_the_short_plan_rehearses_every_stage_on_a_cpu(small_sample, tmp_path):
    """bench/gpu_check.py --plan short --tiny: stages 0, A-D as a GPU session runs them, at tiny size."""
    corpus = Path(small_sample["dataset_dir"]).parent.parent
    done = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "gpu_check.py"), "--plan", "short", "--tiny",
                           "--corpus", str(corpus), "--cycle-docs", "3", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    steps = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(steps) == ["environment", "A loop switch", "B step cost", "C whole cycle", "D cuda tests"]
    switch = steps["A loop switch"]["figures"]
    assert steps["A loop switch"]["status"] == "pass" and switch["looped_steps"] >= 5 and switch["recompiles"] == 0
    assert switch["ms_per_step_plain"] > 0 and switch["ms_per_step_looped"] > 0 and switch["last_logged_step"] == 10
    assert {"compile_s_plain", "compile_s_looped"} <= set(switch)
    cost = steps["B step cost"]["figures"]
    assert steps["B step cost"]["status"] == "pass" and cost["record_isolation"] == "mask"
    assert cost["record_no_isolation_isolation"] is None and cost["r1081_ms_plain"] > 0
    assert cost["record_flex"].startswith("skip")  # FlexAttention trains on CUDA only
    cycle = steps["C whole cycle"]
    assert cycle["status"] == "pass" and cycle["figures"]["reached"] == "evaluation"
    assert cycle["figures"]["ttt_seconds"] > 0 and cycle["figures"]["gptq_seconds"] > 0
    summary = json.loads((tmp_path / "logs" / "cycle.json").read_text())
    cut = tg.load_validation_tokens(tmp_path / "cycle_data")
    assert int((cut == 1).sum()) == 3 and summary["val_tokens"] == cut.numel() - 1 and summary["score_source"] == "ttt"
    assert cut.numel() < tg.load_validation_tokens(Path(small_sample["dataset_dir"])).numel()
    assert steps["D cuda tests"]["status"] == "skip"
    assert "| A loop switch | pass |" in done.stdout
