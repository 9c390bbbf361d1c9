"""The records workflow on real runs: sweep, significance, record folder, plots."""
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from test_training import tiny_env

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tools"))
import make_record  # noqa: E402
import significance  # noqa: E402
import sweep  # noqa: E402

SEEDS = [11, 12]


@pytest.fixture(scope="module")
def swept(small_sample, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    env = {**tiny_env(small_sample, tmp, TTT_ENABLED=0, SLOT_ENABLED=0), "OMP_NUM_THREADS": "1"}  # the sliding score
    lines = []
    results = sweep.run_sweep(SEEDS, "tiny", tmp / "logs", REPO_ROOT / "train_gpt.py", 1, env=env, out=lines.append)
    return results, lines, tmp / "logs", env


def test_sweep_runs_every_seed_and_prints_a_row_each(swept):
    results, lines, logs, _ = swept
    assert [r["seed"] for r in results] == SEEDS and all(r["status"] == "ok" for r in results)
    assert lines[0].startswith("seed | status") and len(lines) == 1 + len(SEEDS)
    for seed, line, r in zip(SEEDS, lines[1:], results):
        cells = line.split(" | ")
        assert cells[0] == str(seed) and cells[1] == "ok" and cells[9] == f"{r['val_bpb']:.5f}"
        assert (logs / f"tiny_s{seed}.txt").is_file() and r["run_id"] == f"tiny_s{seed}"
    assert results[0]["val_bpb"] != results[1]["val_bpb"]  # the seed reached the run


@pytest.mark.parametrize("unfinished", ["failed", "running", "log of another run"])
def test_sweep_resumes_with_the_unfinished_seed_only(swept, monkeypatch, unfinished):
    results, _, logs, env = swept
    summary = {**results[1], "status": unfinished} if unfinished != "log of another run" else {
        **results[1], "run_start_id": "0" * 32}  # an ok JSON beside a log that is not its own
    (logs / "tiny_s12.json").write_text(json.dumps(summary))
    calls = []
    monkeypatch.setattr(sweep, "run_trainer", lambda cmd, env, console: calls.append(env["SEED"]) or 1)
    lines = []
    again = sweep.run_sweep(SEEDS, "tiny", logs, REPO_ROOT / "train_gpt.py", 1, env=env, out=lines.append)
    (logs / "tiny_s12.json").write_text(json.dumps(results[1]))
    assert calls == ["12"] and again[0] == results[0] and again[1] is None
    assert "skipped (complete)" in lines[1] and "FAILED (exit 1" in lines[2]


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_ending_a_sweep_ends_its_trainer(small_sample, tmp_path, how):
    """SIGTERM is passed on; SIGKILL cannot be, so the trainer is asked (Linux) to get SIGTERM when the sweep dies:
    an orphaned trainer would go on training, and on GPUs corrupt the timings of the next seed's run."""
    if how == signal.SIGKILL and not sys.platform.startswith("linux"):
        pytest.skip("a trainer hears of its sweep's death through Linux's PR_SET_PDEATHSIG")
    env = {**os.environ, **tiny_env(small_sample, tmp_path, ITERATIONS=100000, VAL_LOSS_EVERY=0), "SEEDS": "5 6"}
    logs = tmp_path / "sweep_logs"
    runner = subprocess.Popen([sys.executable, str(REPO_ROOT / "tools" / "sweep.py"), "--name", "k", "--log-dir",
                               str(logs)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while "step:1/" not in ((logs / "k_s5.txt").read_text() if (logs / "k_s5.txt").is_file() else "") and time.time() < deadline:
            time.sleep(0.2)
        trainer = int((logs / "k_s5.lock").read_text())
        runner.send_signal(how)
        assert runner.wait(timeout=120) == (128 + how if how == signal.SIGTERM else -how)
        deadline = time.time() + 120
        while sweep.train_gpt.process_alive(trainer) and time.time() < deadline:
            time.sleep(0.2)
        assert not sweep.train_gpt.process_alive(trainer)
    finally:
        runner.kill()
    summary = json.loads((logs / "k_s5.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == "RunKilled: killed by SIGTERM"
    assert not (logs / "k_s6.json").exists() and not (logs / "k_s5.lock").exists()


def test_a_resumed_sweep_waits_for_a_seed_a_live_process_holds_and_says_why_a_seed_failed(small_sample, tmp_path,
                                                                                          monkeypatch):
    logs = tmp_path / "logs"
    logs.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3)"])
    threading.Thread(target=holder.wait, daemon=True).start()  # reaped as it ends, as a foreign process would be
    (logs / "w_s1.lock").write_text(str(holder.pid))
    monkeypatch.setattr(sweep, "LOCK_POLL_SECONDS", 0.1)
    env = {**os.environ, **tiny_env(small_sample, tmp_path), "NUM_HEADS": "three"}  # the seed then fails at once
    lines = []
    results = sweep.run_sweep([1], "w", logs, REPO_ROOT / "train_gpt.py", 1, env=env, out=lines.append)
    assert holder.poll() is not None and results == [None]  # it waited for the holder before starting the seed
    assert lines[1] == f"seed 1: its RUN_ID is held by running process {holder.pid} ({logs / 'w_s1.lock'}); waiting " \
                       "for that run to end"
    assert "FAILED (exit 2: error: NUM_HEADS='three' is not a valid int; see" in lines[2]


def test_t_distribution_matches_closed_forms():
    for t in (-3.0, -0.4, 0.0, 0.7, 2.5, 12.0):
        assert significance.t_sf_builtin(t, 1) == pytest.approx(0.5 - math.atan(t) / math.pi, rel=1e-10)  # Cauchy
        assert significance.t_sf_builtin(t, 2) == pytest.approx(0.5 * (1 - t / math.sqrt(t * t + 2)), rel=1e-10)
        assert significance.t_sf_builtin(t, 1e7) == pytest.approx(0.5 * math.erfc(t / math.sqrt(2)), rel=1e-5)
    assert significance.t_sf_builtin(2.0, 5) == pytest.approx(0.0509697394, rel=1e-8)  # printed tables


def test_welch_with_equal_spreads_of_two_has_two_degrees_of_freedom():
    t, df, p = significance.welch_p([1.0, 1.2], [0.9, 1.1], 0.0)
    assert t == pytest.approx(0.1 / math.sqrt(0.02)) and df == pytest.approx(2.0)
    assert p == pytest.approx(0.5 * (1 - t / math.sqrt(t * t + 2)), rel=1e-9)


def test_significance_on_real_summaries_against_a_number(swept):
    results, _, _, _ = swept
    bpb = [r["val_bpb"] for r in results]
    reference = statistics.fmean(bpb) + 0.01
    r = significance.compare(results, reference)
    assert r["gain_bpb"] == pytest.approx(0.01) and r["gain_nats_per_byte"] == pytest.approx(0.01 * math.log(2))
    bytes_per_token = results[0]["val_loss"] / (results[0]["val_bpb"] * math.log(2))
    assert r["gain_nats_per_token"] == pytest.approx(0.01 * math.log(2) * bytes_per_token, rel=1e-6)
    sd = statistics.stdev(v for v in (x["val_loss"] for x in results))
    t_any = r["gain_nats_per_token"] / (sd / math.sqrt(len(results)))
    assert r["p_any"] == pytest.approx(significance.t_sf(t_any, len(results) - 1), rel=1e-9)
    assert r["test"] == "one-sample" and r["unit"] == "token"


def test_significance_cli_states_units_and_verdict(swept):
    _, _, logs, _ = swept
    files = [str(logs / f"tiny_s{s}.json") for s in SEEDS]
    done = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "significance.py"), *files, "--reference", "9.0"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for words in ("bpb |", "nats per token |", "nats per byte", "one-sample t-test, one-sided, in nats per token",
                  "verdict: the p < 0.25 frontier rule (PR #1902: any improvement over the current row), in nats per "
                  "token", "also: the README rule (>= 0.005 nats at p < 0.01), applied in nats per token"):
        assert words in out, words
    welch = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "significance.py"), files[0], "--reference",
                            files[1],
                            "--unit", "byte"], capture_output=True, text=True, timeout=60)
    assert "Welch t-test, one-sided, in nats per byte" in welch.stdout and "no spread" in welch.stdout


def copy_runs(logs: Path, dest: Path, change=None) -> list[Path]:
    dest.mkdir()
    paths = []
    for s in SEEDS:
        shutil.copy(logs / f"tiny_s{s}.txt", dest / f"tiny_s{s}.txt")
        summary = json.loads((logs / f"tiny_s{s}.json").read_text())
        if change and s == SEEDS[-1]:
            change(summary, dest / f"tiny_s{s}.txt")
        (dest / f"tiny_s{s}.json").write_text(json.dumps(summary))
        paths.append(dest / f"tiny_s{s}.json")
    return paths


def test_record_folder_is_complete(swept, tmp_path):
    results, _, logs, _ = swept
    folder = make_record.make_record(copy_runs(logs, tmp_path / "runs"), "TinyTest", author="Tester",
                                     github_id="tester",
                                     date="2026-11-23", reference=9.0, out=tmp_path / "records")
    assert folder == tmp_path / "records" / "track_10min_16mb" / "2026-11-23_TinyTest"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["README.md", "submission.json", "requirements.txt", "train_gpt.py"] + [f"train_seed{s}.log" for s in SEEDS])
    assert (folder / "train_gpt.py").read_text() == (REPO_ROOT / "train_gpt.py").read_text()  # what the runs ran
    sub = json.loads((folder / "submission.json").read_text())
    assert sub["seeds"] == SEEDS and sub["track"] == "10min_16mb" and sub["author"] == "Tester"
    assert sub["val_bpb"] == pytest.approx(statistics.fmean(r["val_bpb"] for r in results))
    script_bytes = len((folder / "train_gpt.py").read_bytes())
    for r in results:
        assert sub["seed_results"][str(r["seed"])]["artifact_bytes"] == script_bytes + r["model_bytes"]
    assert sub["delta_vs_leaderboard_bpb"] == pytest.approx(sub["val_bpb"] - 9.0)
    text = (folder / "README.md").read_text()
    for r in results:
        assert f"| {r['seed']} | {r['steps']} |" in text and f"{r['val_bpb']:.5f}" in text
    assert "## Significance" in text and "SEED=<seed> torchrun" in text
    with pytest.raises(make_record.Refused, match="already exists"):
        make_record.make_record(copy_runs(logs, tmp_path / "again"), "TinyTest", date="2026-11-23",
                                out=tmp_path / "records")


def oversize(summary, _log):
    summary["model_bytes"] = 16_000_000


def overtime(summary, _log):
    summary["train_seconds"] = 590.0
    summary["hessian_seconds"] = 11.0


def slow_quantization(summary, _log):  # quantization and compression read no data: not capped
    summary["train_seconds"], summary["hessian_seconds"], summary["gptq_seconds"] = 588.0, 11.9, 60.0


def slow_eval(summary, _log):
    summary["eval_seconds"] = 600.5


def other_config(summary, _log):
    summary["config"]["MATRIX_LR"] = 0.05


def leaky(summary, _log):
    summary["compliant"] = False


def slot_scored(summary, _log):
    summary["ruling_pending"] = True


def other_code(_summary, log):
    log.write_text(log.read_text().replace("import ast\n", "import ast  # edited\n", 1))


@pytest.mark.parametrize("change,reason", [(oversize, r"bytes \(script \d+ \+ model 16000000\) > 16000000"),
                                           (overtime,
                                            r"training data was read for 601.0s \(steps \+ GPTQ calibration\) > 600s"),
                                           (slow_eval, "evaluation took 600.5s > 600s"),
                                           (other_config, "configuration differs from seed 11 in MATRIX_LR"),
                                           (leaky, "non-compliant mode"), (other_code, "different train_gpt.py"),
                                           (slot_scored, "includes SLOT, whose legality awaits a maintainer ruling")],
                         ids=lambda v: getattr(v, "__name__", ""))
def test_record_folder_refuses_bad_submissions(swept, tmp_path, change, reason):
    _, _, logs, _ = swept
    with pytest.raises(make_record.Refused, match=f"seed {SEEDS[-1]}: .*{reason}"):
        make_record.make_record(copy_runs(logs, tmp_path / "runs", change), "Bad", out=tmp_path / "records")
    assert not (tmp_path / "records").exists()  # nothing half-written


def test_a_summary_beside_another_run_s_log_is_refused(swept, tmp_path):
    _, _, logs, _ = swept
    stale = copy_runs(logs, tmp_path / "runs", lambda summary, _log: summary.update(run_start_id="f" * 32))
    with pytest.raises(make_record.Refused, match=r"tiny_s12.json: its log .* is from another run"):
        make_record.make_record(stale, "Mixed", out=tmp_path / "records")


def test_quantization_time_is_reported_but_not_capped(swept, tmp_path):
    _, _, logs, _ = swept
    folder = make_record.make_record(copy_runs(logs, tmp_path / "runs", slow_quantization), "SlowQuant",
                                     out=tmp_path / "records")
    assert "| 599.9 |" in (folder / "README.md").read_text()  # 588 s of steps + 11.9 s of calibration


def test_non_compliant_runs_may_go_on_the_non_record_track(swept, tmp_path):
    _, _, logs, _ = swept
    folder = make_record.make_record(copy_runs(logs, tmp_path / "runs", leaky), "Research", track="non_record_16mb",
                                     out=tmp_path / "records")
    assert json.loads((folder / "submission.json").read_text())["compliant"] is False


def test_plot_is_a_png_with_one_series_per_seed(swept, tmp_path):
    pytest.importorskip("matplotlib", reason="tools/plot.py needs matplotlib (pip install matplotlib)")
    import plot

    results, _, _, _ = swept
    series = plot.plot(results, tmp_path / "curves.png", reference=3.0)
    data = (tmp_path / "curves.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1200, 800)
    assert series == {"train loss by step": 2, "train loss by time": 2, "val_bpb by step": 2, "val_bpb by time": 2}


def fake_run(folder: Path, seed: int = 1, **changes) -> Path:
    """A finished run's summary and log, as small as make_record accepts; changes edit the summary."""
    folder.mkdir(exist_ok=True)
    summary = dict(run_id=f"r{seed}", run_start_id=f"start{seed}", seed=seed, status="ok", config={"SEED": seed,
                                                                                                   "MATRIX_LR": 0.02},
                   model_bytes=1000, train_seconds=100.0, steps=10, ms_per_step=10.0, val_loss=3.0, val_bpb=1.2,
                   score_source="sliding")
    summary.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del summary[key]
    (folder / f"r{seed}.txt").write_text("print('trainer')" + make_record.SEPARATOR + f"run_start_id:start{seed}\nrun\n")
    (folder / f"r{seed}.json").write_text(json.dumps(summary))
    return folder / f"r{seed}.json"


def test_record_from_minimal_summaries(tmp_path):
    paths = [fake_run(tmp_path / "runs", seed) for seed in (1, 2)]
    folder = make_record.make_record(paths, "Ok", date="2026-01-02", out=tmp_path / "records")
    assert json.loads((folder / "submission.json").read_text())["seeds"] == [1, 2]


@pytest.mark.parametrize("content, reason", [
    (None, "no such run summary"), ("{'seed': 2", "not a readable run summary"), ("[1, 2]", "not a run summary"),
    (dict(model_bytes=None), "model_bytes is None, not a finite number"),
    (dict(val_bpb=math.nan), "val_bpb is nan, not a finite number"),
    (dict(val_loss="low"), "val_loss is 'low', not a finite number"),
    (dict(config=None), "lacks its config or score_source"),
], ids=["missing", "malformed", "not_an_object", "no_model_bytes", "nan_score", "text_score", "no_config"])
def test_record_refuses_bad_summaries_in_one_line(tmp_path, content, reason):
    """content: the second summary's changes, or its raw text, or None for no file at all."""
    runs = tmp_path / "runs"
    good, bad = fake_run(runs, 1), runs / "r2.json"
    if isinstance(content, dict):
        fake_run(runs, 2, **content)
    elif content is not None:
        bad.write_text(content)
    with pytest.raises(SystemExit) as exit_:
        make_record.main([str(good), str(bad), "--name", "Bad", "--out", str(tmp_path / "records")])
    assert str(exit_.value).startswith(f"refused: {bad}: ") and reason in str(exit_.value)
    assert "\n" not in str(exit_.value) and not (tmp_path / "records").exists()


@pytest.mark.parametrize("option, value", [("--name", "../escape"), ("--name", "a/b"), ("--name", "a\\b"),
                                           ("--name", ""), ("--date", "../../2026-01-01")])
def test_record_folder_name_stays_inside_the_track(tmp_path, option, value):
    path = fake_run(tmp_path / "runs")
    args = {"--name": "Ok", "--date": "2026-01-02", option: value}
    with pytest.raises(SystemExit, match=f"refused: {option} "):
        make_record.main([str(path), *[x for kv in args.items() for x in kv], "--out", str(tmp_path / "records")])
    assert not (tmp_path / "records").exists()


@pytest.mark.parametrize("reference", ["abc", "nan", "1.0x"])
def test_reference_that_is_neither_a_number_nor_summaries(tmp_path, reference):
    with pytest.raises(SystemExit, match=f"--reference '{reference}' is neither a finite val_bpb nor an existing"):
        make_record.main([str(fake_run(tmp_path / "runs")), "--name", "N", "--reference", reference,
                          "--out", str(tmp_path / "records")])
    assert not (tmp_path / "records").exists()


def test_a_seed_that_stop_after_ended_says_so_rather_than_failed(tmp_path, monkeypatch):
    logs = tmp_path / "logs"

    def trainer(cmd, env, console):
        (logs / "st_s1.json").write_text(json.dumps({"status": "stopped", "stopped_after": "train"}))
        return 0

    monkeypatch.setattr(sweep, "run_trainer", trainer)
    lines = []
    assert sweep.run_sweep([1], "st", logs, REPO_ROOT / "train_gpt.py", 1, env={}, out=lines.append) == [None]
    assert lines[1].split(" | ")[1] == "stopped after train"
