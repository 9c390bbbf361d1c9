"""bench/gpu_check.py --tiny: every step of the GPU check, at tiny size on the CPU."""
import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_tiny_gpu_check_runs_every_step_and_writes_its_table(tmp_path):
    done = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "gpu_check.py"), "--tiny", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    steps = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(steps) == ["environment", "cuda tests", "training run", "throughput"]
    env = steps["environment"]["figures"]
    assert env["attention_backend"] == "sdpa" and env["gpu"] == "none" and env["brotli"] != "missing"
    # Without a GPU every cuda check is collected and skipped, none fails.
    assert steps["cuda tests"]["status"] == "skip" and len(steps["cuda tests"]["figures"]) >= 5
    assert set(steps["cuda tests"]["figures"].values()) == {"skip"}
    assert steps["throughput"]["status"] == "pass" and steps["throughput"]["figures"]["plain_ms_per_step"] > 0
    run = steps["training run"]
    assert run["status"] == "pass" and run["figures"]["steps"] == 10
    summary = json.loads((tmp_path / "logs" / "gpu_check.json").read_text())
    assert run["figures"]["val_bpb"] == summary["val_bpb"] and summary["status"] == "ok"
    assert "| training run | pass |" in done.stdout and "| cuda tests | skip (all skipped (no GPU)) |" in done.stdout
