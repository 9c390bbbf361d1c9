"""bench/throughput.py: its FLOP count against PyTorch's counter, and a run under torchrun."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import train_gpt as tg

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "bench"))
import throughput  # noqa: E402

TINY = dict(VOCAB_SIZE="97", NUM_LAYERS="5", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2", ROPE_DIMS="8",
            XSA_LAST_N="5",
            NUM_LOOPS="2", LOOP_START="1", LOOP_END="2", PARALLEL_RESIDUAL_START="3", MLP_MULT="2",
            TRAIN_SEQ_LEN="32", TRAIN_BATCH_TOKENS="256")


@pytest.mark.parametrize("looping", [False, True])
def test_flops_per_token_equals_what_pytorch_counts(looping):
    """Every matmul of a forward and backward, attention included (the math kernel computes the
    full square, so the count is compared with the non-causal formula)."""
    cfg = tg.config_from_env(TINY)
    model = tg.GPT(cfg)
    model.looping = looping
    x = torch.randint(0, 97, (3, cfg.TRAIN_SEQ_LEN + 1))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x[:, :-1], x[:, 1:]).mean().backward()
    assert counter.get_total_flops() == throughput.model_flops_per_token(cfg, looping,
                                                                         causal=False) * 3 * cfg.TRAIN_SEQ_LEN
    causal_attention = throughput.model_flops_per_token(cfg, looping) - throughput.model_flops_per_token(cfg, looping,
                                                                                                         causal=False)
    layers = 9 if looping else 5
    assert causal_attention == pytest.approx(-layers * 12 * 64 * (32 - 1) / 2)


def test_benchmark_runs_under_torchrun_and_its_figures_agree(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO_ROOT / "bench" / "throughput.py"), "--steps", "2", "--warmup", "1", "--json", str(out)]
    done = subprocess.run(cmd, env={**os.environ, **TINY, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["world_size"] == 2 and r["accum_steps"] == 4 and r["attention_backend"] == "sdpa"
    assert "plain: ms/step:" in done.stdout and "looping: ms/step:" in done.stdout and "communication:" in done.stdout
    for phase, layers in (("plain", 5), ("looping", 9)):
        assert r[f"{phase}_tokens_per_second"] == pytest.approx(256 / (r[f"{phase}_ms_per_step"] / 1000))
        flops = r[f"{phase}_flops_per_token"]
        assert flops == throughput.model_flops_per_token(tg.config_from_env(TINY), phase == "looping")
        assert r[f"{phase}_mfu"] == pytest.approx(flops * r[f"{phase}_tokens_per_second"] / (2 * 989e12))
    assert r["communication_ms"] > 0 and r["newton_schulz_ms"] > 0


@pytest.mark.parametrize("requested", ["fa3", "fa2"])
def test_benchmark_refuses_a_named_attention_backend_that_cannot_run(requested, monkeypatch):
    for name, value in {**TINY, "ATTENTION_BACKEND": requested}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(tg.ConfigError, match=f"ATTENTION_BACKEND={requested} cannot be used"):
        throughput.main(["--steps", "1", "--warmup", "0"])


def test_benchmark_runs_the_named_attention_backend(monkeypatch):
    for name, value in {**TINY, "ATTENTION_BACKEND": "sdpa"}.items():
        monkeypatch.setenv(name, value)
    assert throughput.main(["--steps", "1", "--warmup", "0"])["attention_backend"] == "sdpa"


def test_the_benchmark_times_the_trainers_own_batches_from_a_corpus(small_sample, monkeypatch):
    """--corpus: the batches are the ones the trainer's loader reads first (its documents and BOS), not random."""
    from test_training import tiny_env

    env = {k: v for k, v in tiny_env(small_sample, Path("unused")).items() if k not in ("LOG_DIR", "RUN_ID")}
    cfg = tg.config_from_env(env)
    rt = tg.Runtime(0, 1, torch.device("cpu"))
    batches = throughput.corpus_batches(cfg, Path(small_sample["dataset_dir"]), rt, count=2)
    trainer = tg.Trainer(cfg, None, None, None, tg.find_shards(small_sample["dataset_dir"], "train"), rt, print)
    loader = trainer.new_loader()
    for batch in batches:
        assert torch.equal(batch, loader.next_batch(cfg.TRAIN_BATCH_TOKENS // loader.seq_len, 0, 1, cfg.TRAIN_SEQ_LEN))
    assert (batches[0] == cfg.BOS_ID).sum() >= 1  # real documents start inside the windows
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    r = throughput.main(["--steps", "1", "--warmup", "0", "--corpus", str(small_sample["dataset_dir"])])
    assert r["data"] == str(small_sample["dataset_dir"]) and r["document_isolation"] == "mask"
    assert r["plain_ms_per_step"] > 0 and r["looping_ms_per_step"] > 0
