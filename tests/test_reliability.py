"""What a run leaves when things go wrong around it, through real processes and files: a bad launch beside a live or
finished run of the same RUN_ID, a LOG_DIR that fills up, an error said once, a JSON summary written at every stage."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import train_gpt as tg
from test_training import read_or_empty, tiny_env

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "train_gpt.py"


def launch(env: dict, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT)], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=300, **kwargs)


def wait_for(path: Path, text: str, seconds: float = 300) -> None:
    deadline = time.time() + seconds
    while text not in read_or_empty(path):
        assert time.time() < deadline, f"{path} never said {text!r}"
        time.sleep(0.2)


def rejected_record(logs: Path, run_id: str) -> tuple[dict, str]:
    (summary,) = (logs / "rejected").glob(f"{run_id}-*.json")
    return json.loads(summary.read_text()), summary.with_suffix(".txt").read_text()


def test_a_bad_launch_never_touches_a_live_run_of_the_same_run_id(small_sample, tmp_path):
    """The typo'd launch used to rewrite the live run's log (its script and header became NUL bytes) and mark its
    JSON failed while it trained."""
    logs = tmp_path / "logs"
    env = tiny_env(small_sample, tmp_path, ITERATIONS=100000, VAL_LOSS_EVERY=0, RUN_ID="live")
    live = subprocess.Popen([sys.executable, str(SCRIPT)], env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(logs / "live.txt", "step:1/")
        typo = launch({**env, "SEED": "abc"})
        assert typo.returncode == 2 and "error: SEED='abc' is not a valid int" in typo.stderr
        assert f"belong to running process {live.pid} and were left alone" in typo.stderr
        summary, text = rejected_record(logs, "live")
        assert summary["status"] == "failed" and "SEED='abc'" in summary["error"] and "SEED='abc'" in text
        assert json.loads((logs / "live.json").read_text())["status"] == "running"
        wait_for(logs / "live.txt", "step:3/")  # the live run goes on writing its own log
        log = (logs / "live.txt").read_text()
        assert log.startswith(SCRIPT.read_text()) and "\0" not in log and "SEED='abc'" not in log
        live.send_signal(signal.SIGTERM)
        assert live.wait(timeout=120) == 128 + signal.SIGTERM
    finally:
        live.kill()


def test_a_bad_launch_leaves_a_finished_run_whole_and_a_new_run_id_gets_its_usual_files(small_sample, tmp_path):
    logs = tmp_path / "logs"
    assert tg.main(tiny_env(small_sample, tmp_path, ITERATIONS=1, VAL_LOSS_EVERY=0, TTT_ENABLED=0))["status"] == "ok"
    before = {p.name: p.read_bytes() for p in logs.iterdir() if p.is_file()}
    typo = launch(tiny_env(small_sample, tmp_path, NUM_HEADS="three"))
    assert typo.returncode == 2 and "belong to an earlier run and were left alone" in typo.stderr
    assert {p.name: p.read_bytes() for p in logs.iterdir() if p.is_file()} == before  # log, JSON and artifact
    assert "NUM_HEADS='three'" in rejected_record(logs, "run")[0]["error"]
    fresh = launch(tiny_env(small_sample, tmp_path, NUM_HEADS="three", RUN_ID="fresh"))
    assert fresh.returncode == 2 and "rejected" not in fresh.stderr
    assert json.loads((logs / "fresh.json").read_text())["status"] == "failed" and not (logs / "fresh.lock").exists()


def test_an_error_reaches_the_console_once(small_sample, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    done = launch(tiny_env(small_sample, tmp_path, DATA_PATH=empty))
    assert done.returncode == 2
    assert (done.stdout + done.stderr).count("no fineweb_train_*.bin shards in") == 1
    assert "error: no fineweb_train_*.bin shards in" in (tmp_path / "logs" / "run.txt").read_text()


def test_the_summary_is_written_after_every_stage(small_sample, tmp_path, monkeypatch):
    """A run killed while it evaluates (SIGKILL: no handler runs) still shows its training and artifact figures."""
    on_disk = []
    real = tg.evaluate_artifact_model

    def evaluate_and_look(*args, **kwargs):
        on_disk.append(json.loads((tmp_path / "logs" / "run.json").read_text()))
        return real(*args, **kwargs)

    monkeypatch.setattr(tg, "evaluate_artifact_model", evaluate_and_look)
    tg.main(tiny_env(small_sample, tmp_path, ITERATIONS=2, VAL_LOSS_EVERY=0, TTT_ENABLED=0))
    (seen,) = on_disk
    assert seen["status"] == "running" and seen["steps"] == 2 and len(seen["train_curve"]) == 2
    assert seen["artifact_bytes_total"] > 0 and "pre_quant_val_bpb" in seen and "decompress_seconds" in seen
    assert "val_bpb" not in seen


def mount_tmpfs(folder: Path, size: int) -> None:
    folder.mkdir(parents=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a full LOG_DIR needs a small tmpfs, and mounting one needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")


@pytest.mark.parametrize("room", ["none for the log", "none for the artifact"])
def test_a_full_log_dir_is_one_line_and_leaves_nothing_behind(small_sample, tmp_path, room):
    """LOG_DIR on a tmpfs too small for the log's opening script, or for the artifact once the log is written."""
    logs = tmp_path / "logs"
    script = len(SCRIPT.read_bytes())
    mount_tmpfs(logs, 100 * 1024 if room == "none for the log" else script + 64 * 1024)
    try:
        done = launch(tiny_env(small_sample, tmp_path, ITERATIONS=2, VAL_LOSS_EVERY=0, TTT_ENABLED=0))
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        full = "run.txt" if room == "none for the log" else "run.ptz"
        assert len(errors) == 1 and f"no room in {logs} " in errors[0] and f"writing {full} needs " in errors[0]
        assert "bytes are free there; free some space, or point LOG_DIR at a disk with room" in errors[0]
        summary = json.loads((logs / "run.json").read_text())
        assert summary["status"] == "failed" and "no room in" in summary["error"]
        assert sorted(p.name for p in logs.iterdir()) == ["run.json", "run.txt"]  # no temporary, no lock
        if room == "none for the artifact":
            assert summary["steps"] == 2 and "train_data_seconds" in summary  # the training figures survive
    finally:
        subprocess.run(["umount", "-l", str(logs)], check=False)
