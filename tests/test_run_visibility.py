"""What a run shows of itself on the way, so a GPU session learns where time goes in one call: every log line's
seconds since start, each warm-up state's compile and steady seconds, the steps around the switch to recurrence,
a stack dump from a step that stalls, a run that stops after a stage, the compile cache, and a training step that
finds the document starts on the host."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

import train_gpt as tg
from test_training import tiny_env

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_warm_up_states_are_timed_the_switch_is_logged_and_every_line_carries_its_seconds(small_sample, tmp_path):
    summary = tg.main(tiny_env(small_sample, tmp_path, WARMUP_STEPS=2, TRAIN_LOG_EVERY=100, TTT_ENABLED=0))
    log = (tmp_path / "logs" / "run.txt").read_text().split("=" * 100 + "\n")[1]
    stamps = [float(m.group(1)) for m in re.finditer(r"^\[(\d+\.\d)s\] ", log, re.M)]
    assert len(stamps) == len(re.findall(r"^\[", log, re.M)) > 20 and stamps == sorted(stamps)
    # Two states (recurrence off and on), each: the first step's seconds (the compile), then the others' mean.
    assert [(seq, looping) for seq, looping, *_ in summary["warmup"]] == [(64, False), (64, True)]
    assert all(first > 0 and steady > 0 for _, _, first, steady in summary["warmup"])
    assert "warmup: primed 2 steps seq_len=64 looping=True: first step (compiles)" in log
    assert summary["compiled_graphs"] == 0  # the CPU runs eager
    # Recurrence switches on at step 4 of 8: the steps after it are logged though TRAIN_LOG_EVERY=100.
    logged = [int(n) for n in re.findall(r"\] step:(\d+)/8 train_loss", log)]
    assert logged == [1, 5, 6, 7, 8] and re.search(r"layer_loop:enabled step:4 frac:0.500 last_plain_step_time:\d+ms",
                                                    log)
    assert re.search(r"step:5/8 train_loss:\S+ train_time:\S+ step_time:\d+ms", log)


def test_a_run_can_stop_after_training_or_after_its_artifact(small_sample, tmp_path):
    trained = tg.main(tiny_env(small_sample, tmp_path, RUN_ID="t", STOP_AFTER="train", VAL_LOSS_EVERY=0))
    assert trained["status"] == "stopped" and trained["stopped_after"] == "train" and trained["steps"] == 8
    assert "model_bytes" not in trained and not (tmp_path / "logs" / "t.ptz").exists()
    packed = tg.main(tiny_env(small_sample, tmp_path, RUN_ID="a", STOP_AFTER="artifact", VAL_LOSS_EVERY=0))
    assert packed["status"] == "stopped" and packed["stopped_after"] == "artifact"
    assert (tmp_path / "logs" / "a.ptz").stat().st_size == packed["model_bytes"] and "pre_quant_val_bpb" not in packed
    assert json.loads((tmp_path / "logs" / "a.json").read_text())["status"] == "stopped"
    assert "stopped after artifact (STOP_AFTER=artifact): no evaluation" in (tmp_path / "logs" / "a.txt").read_text()


def test_a_step_that_stalls_prints_every_threads_stack_and_the_run_goes_on(small_sample, tmp_path):
    """STALL_DUMP_SECONDS=2 and a second step that sleeps 5 s: faulthandler writes the stacks from its own thread,
    so a step that never returns shows where it is without any harness."""
    child = ("import sys, time; sys.path.insert(0, sys.argv[1]); import train_gpt as tg\n"
             "real, calls = tg.train_step, []\n"
             "def slow_train_step(*args):\n"
             "    calls.append(1)\n"
             "    if len(calls) == 2:\n        time.sleep(5)\n"
             "    return real(*args)\n"
             "tg.train_step = slow_train_step\nsys.exit(0 if tg.main()['status'] == 'stopped' else 1)\n")
    env = {**os.environ, **tiny_env(small_sample, tmp_path, ITERATIONS=3, STALL_DUMP_SECONDS=2, STOP_AFTER="train")}
    done = subprocess.run([sys.executable, "-c", child, str(REPO_ROOT)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]  # the stalled step finished and the run went on
    assert "Timeout (0:00:02)!" in done.stderr and 'line 6 in slow_train_step' in done.stderr  # caught in its sleep
    assert "in step" in done.stderr and "in train" in done.stderr


def test_a_training_step_finds_the_document_starts_on_the_host(small_sample, tmp_path, monkeypatch):
    """With a varlen kernel the starts come from each micro-batch before its copy to the device (on a GPU, nonzero
    on the device copy would wait for the GPU): the model is handed them and computes none itself."""
    cfg = tg.config_from_env(tiny_env(small_sample, tmp_path))
    model = tg.GPT(cfg)
    monkeypatch.setattr(model, "runs_varlen_kernel", lambda device: True)
    rt = tg.Runtime(0, 1, torch.device("cpu"))
    handed, found = [], []
    real = tg.document_starts
    monkeypatch.setattr(tg, "document_starts", lambda ids, *rest: found.append(ids) or real(ids, *rest))

    def model_fn(inputs, targets, doc_starts=None):
        handed.append(doc_starts)
        return model(inputs, targets)  # the CPU attends with the dense mask

    batch = tg.TrainLoader(tg.find_shards(small_sample["dataset_dir"], "train"), 64, 0, 1024).next_batch(16, 0, 1)
    tg.train_step(cfg, model_fn, model, tg.build_optimizers(cfg, model), batch, rt)
    micro = batch.chunk(rt.accum_steps)
    assert len(handed) == len(found) == len(micro) == 8
    for starts, ids, m in zip(handed, found, micro):
        assert ids.data_ptr() == m.data_ptr() and torch.equal(starts, real(m[:, :-1], cfg.BOS_ID))


def test_the_compile_cache_is_said_to_be_empty_on_a_cpu_and_a_bad_one_only_costs_a_warm_start(small_sample, tmp_path):
    cache = tmp_path / "cache.bin"
    tg.main(tiny_env(small_sample, tmp_path, RUN_ID="cold", ITERATIONS=1, STOP_AFTER="train", COMPILE_CACHE=cache))
    log = (tmp_path / "logs" / "cold.txt").read_text()
    assert f"compile_cache: {cache} not found; compiling cold" in log and not cache.exists()
    assert "compile_cache: nothing was compiled; nothing saved" in log  # the CPU runs eager
    cache.write_bytes(b"not a cache")
    summary = tg.main(tiny_env(small_sample, tmp_path, RUN_ID="bad", ITERATIONS=1, STOP_AFTER="train",
                               COMPILE_CACHE=cache))
    assert summary["status"] == "stopped"
    assert f"warning: compile_cache: {cache} does not load" in (tmp_path / "logs" / "bad.txt").read_text()
