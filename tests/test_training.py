"""End-to-end runs on a small sample: outputs, determinism, warm-up rollback, ranks, failures."""
import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train_gpt as tg

REPO_ROOT = Path(__file__).resolve().parent.parent


def tiny_env(sample, tmp_path, **overrides) -> dict:
    """Every architecture option on, at a size that trains 8 steps in a few seconds."""
    env = dict(DATA_PATH=sample["dataset_dir"], TOKENIZER_PATH=sample["tokenizer_model"], VOCAB_SIZE=1024,
               NUM_LAYERS=4, MODEL_DIM=64, NUM_HEADS=4, NUM_KV_HEADS=2, ROPE_DIMS=8, XSA_LAST_N=4,
               NUM_LOOPS=1, LOOP_START=1, LOOP_END=2, PARALLEL_RESIDUAL_START=2, PARALLEL_LANES_START=3,
               ENABLE_LOOPING_AT=0.5,
               TRAIN_SEQ_LEN=64, TRAIN_BATCH_TOKENS=1024, ITERATIONS=8, MAX_WALLCLOCK_SECONDS=0,
               GPTQ_RESERVE_SECONDS=0, WARMUP_STEPS=0, VAL_BATCH_TOKENS=4096, VAL_LOSS_EVERY=4,
               TRAIN_LOG_EVERY=1, EMA_DECAY=0.9, MUON_MOMENTUM_WARMUP_STEPS=4, QUANT_PASSTHROUGH_NUMEL=1024,
               EVAL_SEQ_LEN=64, EVAL_STRIDE=32, EVAL_BATCH_WINDOWS=32,
               LOG_DIR=tmp_path / "logs", RUN_ID="run", SEED=7)
    env.update(overrides)
    # The modes' own knobs, only where their mode is on (a knob set outside its mode stops the run).
    if env.get("QUANT_METHOD", "gptq") == "gptq":
        env.setdefault("GPTQ_CALIBRATION_BATCHES", 4)
    ttt = str(env.get("TTT_ENABLED", 1)) != "0"
    if ttt:  # chunk TTT, the quick one, unless a test asks for the records' LoRA TTT
        env.setdefault("TTT_MODE", "chunk")
    lora = ttt and env["TTT_MODE"] == "lora"
    phases = int(env.get("PHASED_TTT_PHASES", tg.knob_fields()["PHASED_TTT_PHASES"].default))
    if ttt and (not lora or phases > 0):
        env.setdefault("TTT_CHUNK_TOKENS", 4096)
    if ttt and not lora:
        env.setdefault("TTT_EPOCHS", 1)
    if str(env.get("SLOT_ENABLED", 0)) == "1":
        env.setdefault("SLOT_STEPS", 2)
    return {k: str(v) for k, v in env.items()}


def losses(summary) -> list[float]:
    return [loss for _, _, loss in summary["train_curve"]]


@pytest.fixture(scope="module")
def reference_run(small_sample, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    return tg.main(tiny_env(small_sample, tmp)), tmp


def test_run_writes_log_and_summary(reference_run):
    summary, tmp = reference_run
    log = (tmp / "logs" / "run.txt").read_text()
    assert log.startswith(Path(tg.__file__).read_text())  # the log opens with the script itself
    for line in ("python:3", "attention_backend:sdpa", "  NUM_LAYERS = 4", "model_params:", "layer_loop:enabled step:4",
                 "pre-quantization post-ema val_loss:", "gptq: collected 17 Hessians", "round trip: ",
                 "quantized val_loss:", "final_score val_loss:"):
        assert line in log
    on_disk = json.loads((tmp / "logs" / "run.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for key in ("run_id", "seed", "config", "params", "steps", "train_seconds", "ms_per_step", "tokens_per_second",
                "pre_quant_val_loss", "pre_quant_val_bpb", "quantized_val_loss", "quantized_val_bpb", "quant_gap_bpb",
                "model_bytes", "code_bytes", "code_bytes_raw", "artifact_bytes_total", "artifact_bytes_by_group",
                "val_bpb", "val_loss", "score_source"):
        assert key in on_disk, key
    assert on_disk["status"] == "ok" and on_disk["score_source"] == "ttt" and on_disk["steps"] == 8
    # The log, the JSON and the artifact name one run; an artifact of another run is refused.
    assert f"run_start_id:{on_disk['run_start_id']}\n" in log
    artifact = tmp / "logs" / "run.ptz"
    assert tg.load_artifact(artifact).run_start_id == on_disk["run_start_id"]
    cfg = tg.Config(**on_disk["config"])
    with pytest.raises(tg.ArtifactError, match="was written by run .*, not by this run 0+"):
        tg.load_quantized_model(cfg, "sdpa", tg.Runtime(0, 1, torch.device("cpu")), "0" * 32, print)
    assert on_disk["config"]["NUM_LAYERS"] == 4 and on_disk["seed"] == 7
    assert math.isfinite(on_disk["val_bpb"]) and 0 < on_disk["val_bpb"] < 10
    assert on_disk["val_bpb"] == on_disk["ttt_val_bpb"] and on_disk["val_loss"] == on_disk["ttt_val_loss"]
    assert on_disk["looping_enabled_step"] == 4 and "ms_per_step_after_looping" in on_disk
    assert [s for s, *_ in on_disk["val_curve"]] == [4, 8]
    assert losses(on_disk)[-1] < losses(on_disk)[0]  # it learns


def test_same_seed_same_curve_other_seed_other_curve(reference_run, small_sample, tmp_path):
    reference, _ = reference_run
    again = tg.main(tiny_env(small_sample, tmp_path))
    assert losses(again) == losses(reference) and again["val_bpb"] == reference["val_bpb"]
    other = tg.main(tiny_env(small_sample, tmp_path, SEED=8, RUN_ID="other"))
    assert losses(other)[0] != losses(reference)[0]


def test_warmup_is_rolled_back_exactly(reference_run, small_sample, tmp_path):
    reference, _ = reference_run
    primed = tg.main(tiny_env(small_sample, tmp_path, WARMUP_STEPS=3))
    assert losses(primed) == losses(reference) and primed["val_bpb"] == reference["val_bpb"]
    assert "warmup: primed 3 steps seq_len=64 looping=True" in (tmp_path / "logs" / "run.txt").read_text()


def test_progressive_context_primes_every_length_and_switches_on_schedule(small_sample, tmp_path):
    run = tg.main(tiny_env(small_sample, tmp_path, TRAIN_SEQ_SCHEDULE="16:0.25,32:0.5", WARMUP_STEPS=1))
    log = (tmp_path / "logs" / "run.txt").read_text()
    primed = [f"warmup: primed 1 steps seq_len={n} looping={b}" for n in (16, 32, 64) for b in (False, True)]
    assert all(line in log for line in primed)
    assert [line.split()[1] for line in log.splitlines() if "] seq_len:" in line] == [
        "seq_len:16", "seq_len:32", "seq_len:64"]
    assert "step:2 frac:0.250" in log and "step:4 frac:0.500" in log  # 8 steps: 2 at 16, 2 at 32, 4 at 64
    assert math.isfinite(run["val_bpb"])


def test_the_packed_loader_trains_one_packed_row_per_micro_batch(small_sample, tmp_path, monkeypatch):
    """TRAIN_LOADER=packed: each of the 8 micro-batches is one row of TRAIN_BATCH_TOKENS/8 tokens, in shard order
    from the first BOS (what PackedLoader reads), and the attention cuts documents every TRAIN_SEQ_LEN tokens."""
    seen = []
    real = tg.train_step
    monkeypatch.setattr(tg, "train_step", lambda cfg, fn, model, opts, batch, rt: seen.append(
        (batch.clone(), model.segment_len)) or real(cfg, fn, model, opts, batch, rt))
    run = tg.main(tiny_env(small_sample, tmp_path, TRAIN_LOADER="packed", ITERATIONS=3, TTT_ENABLED=0))
    assert run["status"] == "ok" and math.isfinite(run["val_bpb"])
    files = tg.find_shards(small_sample["dataset_dir"], "train")
    loader = tg.PackedLoader(files, 1024 // 8, bos_id=1, vocab_size=1024)
    for batch, segment_len in seen:
        assert batch.shape == (8, 129) and segment_len == 64
        assert torch.equal(batch, loader.next_batch(8, 0, 1))


def test_prime_compilation_restores_model_and_optimizer_state(small_sample, tmp_path):
    cfg = tg.config_from_env(tiny_env(small_sample, tmp_path, WARMUP_STEPS=2))
    torch.manual_seed(0)
    model = tg.GPT(cfg)
    optimizers = tg.build_optimizers(cfg, model)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    rt = tg.Runtime(0, 1, torch.device("cpu"))
    trainer = tg.Trainer(cfg, model, model, optimizers, tg.find_shards(small_sample["dataset_dir"], "train"), rt, print)
    trainer.prime_compilation()
    assert all(torch.equal(v, initial[k]) for k, v in model.state_dict().items())
    assert all(len(opt.state) == 0 for opt in optimizers) and not model.looping
    assert [g["lr"] for opt in optimizers for g in opt.param_groups] == [cfg.TIED_EMBED_LR, cfg.SCALAR_LR,
                                                                         cfg.MATRIX_LR]


def finalization_probe(folder: Path) -> dict:
    """Environment whose Python processes running train_gpt.py note in folder/finalized when the interpreter's
    finalization runs (an atexit hook, through sitecustomize)."""
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(
        "import atexit, sys\n"
        "if sys.argv and sys.argv[0].endswith('train_gpt.py'):\n"
        f"    atexit.register(lambda: open({str(folder / 'finalized')!r}, 'a').write('rank finalized\\n'))\n")
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}


def test_two_ranks_match_one_rank(reference_run, small_sample, tmp_path):
    reference, _ = reference_run
    """Also the README's command as it stands: no RUN_ID, so rank 0's random id must name every rank's files. The
    ranks end without the interpreter's finalization, during which gloo's threads, still releasing a collective's
    tensors, aborted a rank now and then on a loaded machine ("terminate called without an active exception")."""
    env = {**os.environ, **tiny_env(small_sample, tmp_path, RUN_ID=""), "OMP_NUM_THREADS": "1",
           **finalization_probe(tmp_path / "probe")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO_ROOT / "train_gpt.py")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (tmp_path / "probe" / "finalized").exists()
    (summary_path,) = (tmp_path / "logs").glob("*.json")
    run_id = summary_path.stem
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == [f"{run_id}.json", f"{run_id}.ptz", f"{run_id}.txt"]
    two = json.loads(summary_path.read_text())
    assert two["status"] == "ok" and two["run_id"] == run_id
    assert two["versions"]["world_size"] == 2 and two["steps"] == reference["steps"]
    assert losses(two) == pytest.approx(losses(reference), rel=1e-4)
    assert two["val_bpb"] == pytest.approx(reference["val_bpb"], rel=1e-4)
    assert two["val_tokens"] == reference["val_tokens"] and two["val_bytes"] == reference["val_bytes"]


def test_four_ranks_match_one_rank(reference_run, small_sample, tmp_path):
    """4 ranks x 2 micro-batches: the same global batches, so the same training curve."""
    reference, _ = reference_run
    env = {**os.environ, **tiny_env(small_sample, tmp_path, RUN_ID="four", VAL_LOSS_EVERY=0, TTT_ENABLED=0,
                                    SLOT_ENABLED=0), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
           str(REPO_ROOT / "train_gpt.py")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    four = json.loads((tmp_path / "logs" / "four.json").read_text())
    assert four["versions"]["world_size"] == 4 and "accum_steps:2 world_size:4" in (tmp_path / "logs" / "four.txt").read_text()
    assert losses(four) == pytest.approx(losses(reference), rel=1e-4)
    assert four["pre_quant_val_bpb"] == pytest.approx(reference["pre_quant_val_bpb"], rel=1e-4)


def test_wallclock_cap_leaves_room_for_the_projected_calibration(small_sample, tmp_path, monkeypatch):
    monkeypatch.setattr(tg, "project_calibration_seconds", lambda *args: 1.25)
    cap = 3.0
    summary = tg.main(tiny_env(small_sample, tmp_path, ITERATIONS=100000, MAX_WALLCLOCK_SECONDS=cap,
                               GPTQ_RESERVE_SECONDS=0.5, VAL_LOSS_EVERY=0, TRAIN_LOG_EVERY=50,
                               TTT_ENABLED=0, SLOT_ENABLED=0))
    assert 1 <= summary["steps"] < 100000
    assert summary["calibration_reserve_seconds"] == 1.25  # the projection, being above the floor
    assert summary["train_budget_seconds"] == cap - 1.25
    assert summary["train_data_seconds"] == pytest.approx(summary["train_seconds"] + summary["hessian_seconds"])
    log = (tmp_path / "logs" / "run.txt").read_text()
    assert "stopping_early: wallclock_cap" in log and "train_data_seconds:" in log
    assert "projected at 1.2s; reserving 1.2s (GPTQ_RESERVE_SECONDS=0.5 is the least)" in log


def test_a_calibration_that_cannot_fit_stops_before_training(small_sample, tmp_path, monkeypatch):
    monkeypatch.setattr(tg, "project_calibration_seconds", lambda *args: 700.0)
    with pytest.raises(tg.ConfigError, match="GPTQ calibration needs 700.0s of MAX_WALLCLOCK_SECONDS=600"):
        tg.main(tiny_env(small_sample, tmp_path, MAX_WALLCLOCK_SECONDS=600))
    assert "steps" not in json.loads((tmp_path / "logs" / "run.json").read_text())


def test_calibration_projection_times_the_hooked_forward(small_sample, tmp_path, monkeypatch):
    calls = []

    def fake_accumulate(model, plan, batches, rt):
        calls.append([tuple(b.shape) for b in batches])
        time.sleep(0.05)
        return {}, 0

    monkeypatch.setattr(tg, "accumulate_hessians", fake_accumulate)
    cfg = tg.config_from_env(tiny_env(small_sample, tmp_path, GPTQ_CALIBRATION_BATCHES=100))
    projected = tg.project_calibration_seconds(cfg, tg.GPT(cfg), tg.Runtime(0, 1, torch.device("cpu")))
    assert calls == [[(16, 65)], [(16, 65)]]  # one global batch of random tokens, warmed up once, then timed
    assert 1.1 * 100 * 0.05 <= projected < 2 * 1.1 * 100 * 0.05


def test_a_run_that_breaks_the_time_rule_says_so(small_sample, tmp_path, monkeypatch):
    real = tg.accumulate_hessians

    def slow(*args):
        time.sleep(2.0)
        return real(*args)

    monkeypatch.setattr(tg, "project_calibration_seconds", lambda *args: 0.0)  # a projection that is wrong
    monkeypatch.setattr(tg, "accumulate_hessians", slow)
    summary = tg.main(tiny_env(small_sample, tmp_path, ITERATIONS=100000, MAX_WALLCLOCK_SECONDS=1.5,
                               GPTQ_RESERVE_SECONDS=0, VAL_LOSS_EVERY=0, TTT_ENABLED=0, SLOT_ENABLED=0))
    assert summary["train_time_violation"].startswith("training data was read for")
    assert "TIME RULE BROKEN: training data was read for" in (tmp_path / "logs" / "run.txt").read_text()


def test_a_run_that_fails_late_still_leaves_its_log_and_summary(small_sample, tmp_path, monkeypatch):
    def broken_evaluate(*args, **kwargs):
        raise RuntimeError("evaluation exploded")

    monkeypatch.setattr(tg, "evaluate", broken_evaluate)
    with pytest.raises(RuntimeError, match="evaluation exploded"):
        tg.main(tiny_env(small_sample, tmp_path, VAL_LOSS_EVERY=0))
    summary = json.loads((tmp_path / "logs" / "run.json").read_text())
    assert summary["status"] == "failed" and "evaluation exploded" in summary["error"]
    assert summary["steps"] == 8 and len(summary["train_curve"]) == 8  # the training figures survive
    assert "RuntimeError: evaluation exploded" in (tmp_path / "logs" / "run.txt").read_text()


def test_a_missing_compressor_package_fails_at_start(small_sample, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "brotli", None)  # import brotli now raises ImportError
    with pytest.raises(tg.ConfigError, match="COMPRESSOR=brotli needs the brotli package: `pip install brotli`"):
        tg.main(tiny_env(small_sample, tmp_path, COMPRESSOR="brotli"))
    assert "steps" not in json.loads((tmp_path / "logs" / "run.json").read_text())


def test_bad_data_fails_before_training_with_a_clear_message(small_sample, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    done = subprocess.run([sys.executable, str(REPO_ROOT / "train_gpt.py")], capture_output=True, text=True,
                          timeout=120,
                          env={**os.environ, **tiny_env(small_sample, tmp_path, DATA_PATH=empty)})
    assert done.returncode == 2
    assert "error: no fineweb_train_*.bin shards in" in done.stderr and "Traceback" not in done.stderr
    summary = json.loads((tmp_path / "logs" / "run.json").read_text())
    assert summary["status"] == "failed" and "steps" not in summary


def test_cli_rejects_a_bad_knob_before_any_work(tmp_path):
    done = subprocess.run([sys.executable, str(REPO_ROOT / "train_gpt.py")], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "NUM_HEADS": "three", "LOG_DIR": str(tmp_path)})
    assert done.returncode == 2 and "error: NUM_HEADS='three' is not a valid int" in done.stderr
    (summary,) = tmp_path.glob("*.json")  # the log and JSON the README promises, and nothing else
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([summary.name, summary.stem + ".txt"])
    assert json.loads(summary.read_text())["status"] == "failed" and "NUM_HEADS" in json.loads(summary.read_text())["error"]
    assert "error: NUM_HEADS='three' is not a valid int" in (tmp_path / f"{summary.stem}.txt").read_text()


def test_a_killed_run_records_the_signal_and_replaces_an_earlier_result(reference_run, small_sample, tmp_path):
    """An earlier finished run of the same RUN_ID must not survive beside a killed one."""
    logs = tmp_path / "logs"
    logs.mkdir()
    for suffix in (".json", ".ptz"):
        shutil.copy(reference_run[1] / "logs" / f"run{suffix}", logs / f"run{suffix}")
    env = {**os.environ, **tiny_env(small_sample, tmp_path, ITERATIONS=100000, VAL_LOSS_EVERY=0)}
    trainer = subprocess.Popen([sys.executable, str(REPO_ROOT / "train_gpt.py")], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while "step:1/" not in read_or_empty(logs / "run.txt") and time.time() < deadline:
            time.sleep(0.2)
        running = json.loads((logs / "run.json").read_text())
        assert running["status"] == "running" and not (logs / "run.ptz").exists()  # the earlier artifact is gone
        trainer.send_signal(signal.SIGTERM)
        assert trainer.wait(timeout=120) == 128 + signal.SIGTERM and "error: killed by SIGTERM" in trainer.stderr.read()
    finally:
        trainer.kill()  # never leave a 100000-step trainer behind a failed assertion
    summary = json.loads((logs / "run.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == "RunKilled: killed by SIGTERM"
    assert summary["run_start_id"] != json.loads((reference_run[1] / "logs" / "run.json").read_text())["run_start_id"]
    assert f"run_start_id:{summary['run_start_id']}" in (logs / "run.txt").read_text()
    assert not (logs / "run.lock").exists()


def read_or_empty(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


def test_a_run_id_in_use_is_refused_and_a_stale_lock_is_cleared(small_sample, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "run.lock").write_text(str(os.getpid()))  # this test process is alive: the RUN_ID is in use
    (logs / "run.txt").write_text("the live run's log")
    with pytest.raises(tg.ConfigError, match=r"RUN_ID=run is in use by running process \d+"):
        tg.main(tiny_env(small_sample, tmp_path, ITERATIONS=1, VAL_LOSS_EVERY=0, TTT_ENABLED=0, SLOT_ENABLED=0))
    assert (logs / "run.txt").read_text() == "the live run's log" and not (logs / "run.json").exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (logs / "run.lock").write_text(str(dead.pid))  # a lock whose process has ended
    summary = tg.main(tiny_env(small_sample, tmp_path, ITERATIONS=1, VAL_LOSS_EVERY=0, TTT_ENABLED=0, SLOT_ENABLED=0))
    assert summary["status"] == "ok" and not (logs / "run.lock").exists()


def test_out_of_memory_names_the_knobs_to_lower(small_sample, tmp_path, monkeypatch):
    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(tg.Trainer, "train", no_memory)
    with pytest.raises(tg.ConfigError, match="out of memory on cpu .*lower TRAIN_BATCH_TOKENS"):
        tg.main(tiny_env(small_sample, tmp_path))
    assert "lower TRAIN_BATCH_TOKENS" in json.loads((tmp_path / "logs" / "run.json").read_text())["error"]


def test_an_unusable_log_dir_is_one_line(small_sample, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    done = subprocess.run([sys.executable, str(REPO_ROOT / "train_gpt.py")], capture_output=True, text=True,
                          timeout=120,
                          env={**os.environ, **tiny_env(small_sample, tmp_path, LOG_DIR=tmp_path / "file" / "logs")})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "LOG_DIR=" in done.stderr and "cannot be written" in done.stderr


def test_packed_script_gives_the_same_results_as_the_source(reference_run, small_sample, tmp_path):
    """The self-extracting file a record ships runs the same program, and counts itself exactly
    as the source run predicted."""
    sys.path.insert(0, str(REPO_ROOT / "tools"))
    import pack_code

    packed = tmp_path / "train_gpt.py"
    sizes = pack_code.pack_file(REPO_ROOT / "train_gpt.py", packed)
    assert packed.read_text().count("\n") == 2 and sizes["packed"] == packed.stat().st_size
    env = {**os.environ, **tiny_env(small_sample, tmp_path, RUN_ID="packed")}
    done = subprocess.run([sys.executable, str(packed)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run = json.loads((tmp_path / "logs" / "packed.json").read_text())
    reference, _ = reference_run
    assert losses(run) == losses(reference)
    for key in ("pre_quant_val_bpb", "quantized_val_bpb", "code_bytes"):
        assert run[key] == reference[key], key
    # Bytes per group agree exactly, but the header: it holds each run's random start id, so it
    # compresses to a few bytes more or less.
    same = lambda groups: {k: v for k, v in groups.items() if k != "header"}  # noqa: E731
    assert same(run["artifact_bytes_by_group"]) == same(reference["artifact_bytes_by_group"])
    assert run["code_bytes_counted"] == "packed file" and reference["code_bytes_counted"].startswith("packed size computed")
    assert run["code_bytes_raw"] == sizes["minified"] and reference["code_bytes_raw"] == sizes["raw"]


def test_every_stage_result_lands_in_the_summary(reference_run):
    """The summary is assembled in one place from what the stages return: every JSON field of each result is
    there, the in-memory objects (EMA, packed models) are not, and the per-pass fields are flattened."""
    summary, _ = reference_run
    for stage in (tg.TimeBudget, tg.TrainingResult, tg.ArtifactReport, tg.EvalResult):
        for f in dataclasses.fields(stage):
            if not (f.metadata.get("in_memory") or f.metadata.get("flatten")):
                assert f.name in summary, (stage.__name__, f.name)
    assert not {"ema", "packed", "unfitted", "passes"} & set(summary) and "ttt_val_bpb" in summary
    assert summary["calibration_reserve_seconds"] is None and summary["peak_memory_mib"] is None  # no cap, no GPU


def test_the_trainer_returns_its_figures(small_sample, tmp_path):
    cfg = tg.config_from_env(tiny_env(small_sample, tmp_path, VAL_LOSS_EVERY=3))
    torch.manual_seed(0)
    model = tg.GPT(cfg)
    rt = tg.Runtime(0, 1, torch.device("cpu"))
    trainer = tg.Trainer(cfg, model, model, tg.build_optimizers(cfg, model),
                         tg.find_shards(small_sample["dataset_dir"], "train"), rt, lambda _: None)
    validations = []
    result = trainer.train(lambda: validations.append(1) or dict(val_loss=1.0, val_bpb=2.0), budget=tg.INF)
    assert result.steps == cfg.ITERATIONS == 8 and [s for s, *_ in result.val_curve] == [3, 6, 8] and len(validations) == 3
    assert result.looping_enabled_step == 4 and result.ms_per_step_after_looping > 0 and isinstance(result.ema, tg.EMA)
    assert [s for s, *_ in result.train_curve] == list(range(1, 9)) and result.tokens_per_second > 0
