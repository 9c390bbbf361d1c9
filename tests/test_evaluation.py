"""Evaluation of the artifact: sliding windows, score-first TTT, SLOT, the causality check, budgets."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train_gpt as tg
from test_quantization import tiny_artifact
from test_training import tiny_env

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tools"))
import check_causality  # noqa: E402

CPU = tg.Runtime(0, 1, torch.device("cpu"))


def setup(seed=0, n_tokens=check_causality.STREAM_TOKENS, **knobs):
    """The causality check's random model and stream, with knobs on top of its defaults."""
    cfg = check_causality.check_config({k: str(v) for k, v in knobs.items()})
    model = check_causality.random_model(cfg, seed)
    return cfg, model, check_causality.random_stream(cfg, torch.Generator().manual_seed(seed + 1), n_tokens)


def evaluator(cfg, model, tokens, log=print) -> tg.Evaluator:
    """The trainer's evaluator on a token stream that charges one byte per token."""
    return tg.Evaluator(cfg, model, tg.ValidationData(tokens, check_causality.one_byte_per_token(cfg.VOCAB_SIZE)), CPU,
                        log)


@pytest.mark.parametrize("n_tokens,seq_len,stride", [(11, 16, 4), (17, 16, 4), (18, 16, 4), (101, 16, 1),
                                                     (101, 16, 16), (130, 32, 7), (2, 8, 8)])
def test_sliding_scores_every_target_exactly_once(n_tokens, seq_len, stride):
    cfg, model, tokens = setup(n_tokens=n_tokens, EVAL_SEQ_LEN=seq_len, EVAL_STRIDE=stride, EVAL_BATCH_WINDOWS=3)
    scores, _ = evaluator(cfg, model, tokens).run_pass(False, False, with_mass=True)
    assert scores.count.tolist() == [1] * (n_tokens - 1)
    assert ((scores.mass - 1).abs() < 1e-5).all() and (scores.nll > 0).all()


def test_windows_after_the_first_have_full_context():
    starts, first = tg.sliding_windows(1000, 64, 16)
    assert first[0] == 0 and (first[1:] == 48).all() and (starts[1:] - starts[:-1] == 16).all()
    assert starts[-1] + 64 >= 1000 > starts[-2] + 64  # the tail is covered, by one padded window


def test_stride_equal_to_length_reproduces_plain_evaluation(small_sample):
    sp = tg.load_tokenizer(Path(small_sample["tokenizer_model"]), 1024)
    tables = tg.byte_tables(sp)
    tokens = tg.load_validation_tokens(Path(small_sample["dataset_dir"]))
    cfg, model, _ = setup(VOCAB_SIZE=1024, EVAL_SEQ_LEN=128, EVAL_STRIDE=128, EVAL_BATCH_WINDOWS=8, NGRAM_TILT=0)
    data = tg.ValidationData(tokens, tables)
    plain = tg.evaluate(model, data, 128, 8, CPU)
    scores, _ = tg.Evaluator(cfg, model, data, CPU).run_pass(False, False)
    sliding = tg.summarize_scores(scores, data.byte_counts(CPU.device))
    assert sliding["val_loss"] == pytest.approx(plain["val_loss"], rel=1e-12, abs=0)
    assert sliding["val_bpb"] == pytest.approx(plain["val_bpb"], rel=1e-12, abs=0)
    assert float(data.byte_counts(CPU.device).sum()) == plain["val_bytes"]


def test_ttt_with_zero_lr_equals_sliding_exactly():
    cfg, model, tokens = setup(TTT_LR=0)
    sliding, _ = evaluator(cfg, model, tokens).run_pass(False, False, with_mass=True)
    ttt, info = evaluator(cfg, model, tokens).run_pass(True, False, with_mass=True)
    assert torch.equal(ttt.nll, sliding.nll)
    assert info["ttt_chunks_trained"] == info["ttt_chunks"] - 1  # it did train (at lr 0), never on the last chunk


def test_ttt_changes_later_scores_only_after_training():
    cfg, model, tokens = setup()
    sliding, _ = evaluator(cfg, model, tokens).run_pass(False, False, with_mass=True)
    ttt, _ = evaluator(cfg, model, tokens).run_pass(True, False, with_mass=True)
    first_chunk = slice(0, cfg.TTT_CHUNK_TOKENS)  # scored before any update
    assert torch.equal(ttt.nll[first_chunk], sliding.nll[first_chunk])
    assert not torch.equal(ttt.nll[cfg.TTT_CHUNK_TOKENS:], sliding.nll[cfg.TTT_CHUNK_TOKENS:])


def test_slot_with_zero_steps_equals_sliding_exactly():
    cfg, model, tokens = setup(SLOT_ENABLED=1, SLOT_STEPS=0, SLOT_LOGIT_BIAS=1)
    sliding, _ = evaluator(cfg, model, tokens).run_pass(False, False, with_mass=True)
    slot, _ = evaluator(cfg, model, tokens).run_pass(False, True, with_mass=True)
    assert torch.equal(slot.nll, sliding.nll)


def test_slot_lowers_context_loss_and_leaves_the_first_window_alone():
    cfg, model, tokens = setup(SLOT_ENABLED=1, SLOT_LR=0.5)
    sliding, _ = evaluator(cfg, model, tokens).run_pass(False, False, with_mass=True)
    slot, _ = evaluator(cfg, model, tokens).run_pass(False, True, with_mass=True)
    assert torch.equal(slot.nll[:cfg.EVAL_SEQ_LEN], sliding.nll[:cfg.EVAL_SEQ_LEN])  # window 0 has no context
    assert not torch.equal(slot.nll, sliding.nll)


def test_slot_leaves_the_model_gradients_alone():
    """SLOT differentiates through the head; none of that may reach the weights TTT will step."""
    cfg, model, tokens = setup(SLOT_ENABLED=1, SLOT_LOGIT_BIAS=1)
    evaluator(cfg, model, tokens).run_pass(False, True, with_mass=True)
    assert all(p.grad is None for p in model.parameters())


COMPLIANT = [dict(TTT_ENABLED=0), dict(TTT_ENABLED=1), dict(TTT_ENABLED=0, SLOT_ENABLED=1),
             dict(TTT_ENABLED=0, SLOT_ENABLED=1, SLOT_LOGIT_BIAS=1, SLOT_WARM_START=1),
             dict(TTT_ENABLED=1, SLOT_ENABLED=1, SLOT_WARM_START=1),
             dict(TTT_ENABLED=1, SLOT_ENABLED=1, SMEAR_GATE=1, SPARSE_ATTN_GATE=1, VARLEN_ATTENTION=1,
                  PARALLEL_LANES_START=2, ASYM_LOGIT_RESCALE=1)]


@pytest.mark.parametrize("knobs", COMPLIANT, ids=lambda k: " ".join(f"{a}={b}" for a, b in k.items()))
def test_causality_check_passes_compliant_configurations(knobs):
    verdicts = check_causality.check({k: str(v) for k, v in knobs.items()}, probes=4, n_tokens=160)
    for name, v in verdicts.items():
        assert v["C1/C3"] and v["C2"] and v["C4"], (name, v)


def leaks(verdicts) -> bool:
    return not all(v["C1/C3"] for v in verdicts.values())


@pytest.mark.parametrize("plant", ["slot-full", "slot-batch"])
def test_causality_check_catches_slot_fitted_on_what_it_scores(plant):
    real = (tg.fit_slot, tg.slot_parameters)
    with check_causality.planted(plant) as knobs:
        verdicts = check_causality.check(knobs, probes=4, n_tokens=160)
    assert leaks(verdicts) and verdicts["sliding"]["C1/C3"]
    assert (tg.fit_slot, tg.slot_parameters) == real  # the plant is gone again


def test_causality_check_catches_ttt_that_trains_before_scoring():
    with check_causality.planted("ttt-trains-first") as knobs:
        verdicts = check_causality.check(knobs, probes=4, n_tokens=160)
    assert not verdicts["ttt"]["C1/C3"] and verdicts["sliding"]["C1/C3"]


def test_causality_tool_exits_non_zero_on_a_leak():
    done = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "check_causality.py"), "--plant", "slot-full"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "slot     C1/C3 FAIL" in done.stdout and "verdict: VIOLATION" in done.stdout


def test_ttt_freeze_blocks_keeps_the_first_blocks_fixed():
    cfg, model, tokens = setup(TTT_FREEZE_BLOCKS=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    evaluator(cfg, model, tokens).run_pass(True, False, with_mass=True)
    after = model.state_dict()
    changed = {k.split(".")[1] if k.startswith("blocks.") else k for k in before if not torch.equal(before[k],
                                                                                                    after[k])}
    assert "0" not in changed and "1" not in changed and "2" in changed and "tok_emb.weight" in changed


def test_budget_overrun_stops_adapting_and_keeps_scoring():
    cfg, model, tokens = setup(EVAL_TIME_BUDGET=1e-6, SLOT_ENABLED=1)
    said = []
    sliding, _ = evaluator(cfg, model, tokens).run_pass(False, False, with_mass=True)
    ttt, info = evaluator(cfg, model, tokens, said.append).run_pass(True, True, with_mass=True)
    assert info["ttt_chunks_trained"] == 0 and torch.equal(ttt.nll[cfg.TTT_CHUNK_TOKENS:],
                                                           sliding.nll[cfg.TTT_CHUNK_TOKENS:])
    assert ttt.count.tolist() == [1] * (tokens.numel() - 1)
    assert any("EVAL_TIME_BUDGET" in line and "without adapting" in line for line in said)


def test_slow_scoring_does_not_stop_ttt_before_an_update_is_measured(monkeypatch):
    """Scoring the first of 5 chunks takes 5 s (as a slow SLOT can); an update takes far less. Guessing
    that the first update costs one scoring projects 5 + 4 * (5 + 5) = 45 s > 40 s and never adapts;
    with measured costs only the projection is about 5 * 5 = 25 s, and TTT adapts (with room for 3 s of real
    scoring and updating per chunk, which a loaded machine needs)."""
    real = tg.Evaluator.score_window_range
    slow = [5.0]

    def slow_first_scoring(*args, **kwargs):
        time.sleep(slow.pop() if slow else 0)
        real(*args, **kwargs)

    monkeypatch.setattr(tg.Evaluator, "score_window_range", slow_first_scoring)
    cfg, model, tokens = setup(EVAL_TIME_BUDGET=40, SLOT_ENABLED=1)
    torch.optim.SGD(model.parameters())  # the first optimizer in a process imports torch._dynamo: seconds, untimed
    said = []
    ttt, info = evaluator(cfg, model, tokens, said.append).run_pass(True, True, with_mass=True)
    assert info["ttt_chunks"] == 5 and info["ttt_chunks_trained"] > 1, said
    assert ttt.count.tolist() == [1] * (tokens.numel() - 1)


@pytest.mark.parametrize("knobs,names", [(dict(TTT_ENABLED=0), ["sliding"]), (dict(TTT_ENABLED=1), ["ttt"]),
                                         (dict(TTT_ENABLED=0, SLOT_ENABLED=1), ["slot"]),
                                         (dict(SLOT_ENABLED=1, EVAL_SLIDING_ALSO=1, TTT_MODE="chunk"),
                                          ["sliding", "ttt"])])
def test_the_sliding_pass_runs_alone_or_when_asked_for(knobs, names):
    cfg = tg.config_from_env({k: str(v) for k, v in knobs.items()})
    assert [name for name, _, _ in tg.eval_passes(cfg)] == names


def test_every_rank_starts_the_eval_clock_after_the_slowest_warm_up(tmp_path):
    """Rank 0 warms up 3 s longer than rank 1. Rank 1's clock must not start before rank 0 is ready,
    or its budget would pay for rank 0's warm-up (it would wait in the first collective)."""
    env = {**os.environ, "TTT_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO_ROOT / "tests" / "eval_clock_worker.py"), str(tmp_path / "rank"), "3"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["ready"] - ranks[1]["ready"] > 2  # the delay was there
    assert all(r["clock_start"] >= ranks[0]["ready"] for r in ranks)


@pytest.mark.parametrize("knobs", [dict(TTT_ENABLED=1, SLOT_ENABLED=1),
                                   dict(TTT_MODE="lora", TTT_WARM_START_A=0, PHASED_TTT_PHASES=2, PHASED_TTT_PREFIX_DOCS=6)],
                         ids=["sliding, and ttt with slot inside", "lora ttt with phases"])
def test_two_ranks_give_the_same_scores_as_one(knobs, tmp_path):
    env = {**os.environ, **{k: str(v) for k, v in knobs.items()}, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO_ROOT / "tests" / "eval_worker.py"), str(tmp_path / "two.pt")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two = torch.load(tmp_path / "two.pt")
    cfg, model, tokens = setup(**knobs)
    alone = evaluator(cfg, model, tokens, log=lambda _: None)
    for order in ("stream", "lora"):  # the n-gram tilt's hints: each rank computed a share
        hints = two.pop(f"{order} hints")
        assert torch.equal(hints, alone.tilt(order)[0].hint) and int((hints >= 0).sum()) > 0, order
    one = check_causality.run_passes(cfg, model, tokens)
    assert set(two) == set(one)
    for name in one:
        if name in ("sliding", "slot"):  # windows are scored (and fitted) independently: the split cannot matter
            assert torch.equal(two[name], one[name].nll), name
        elif "PHASED_TTT_PHASES" in knobs:  # the phases' summed gradients differ in the last bits, and the LoRA
            # steps after them, Adam with beta1 0 and eps 1e-10, turn near-zero gradients into +-LR steps
            torch.testing.assert_close(two[name], one[name].nll, rtol=1e-3, atol=1e-2)
        else:  # TTT sums gradients over ranks: the same up to float addition order
            torch.testing.assert_close(two[name], one[name].nll, rtol=1e-4, atol=1e-5)


def test_run_reports_every_pass_and_the_artifact_alone_reproduces_them(small_sample, tmp_path):
    env = tiny_env(small_sample, tmp_path, SLOT_ENABLED=1, EVAL_SLIDING_ALSO=1)
    summary = tg.main(env)
    log = (tmp_path / "logs" / "run.txt").read_text().split("=" * 100)[1]  # what the run said, after its source
    for key in ("sliding_val_bpb", "sliding_val_loss", "ttt_val_bpb", "ttt_val_loss", "sliding_seconds", "ttt_seconds",
                "eval_seconds", "quantized_eval_seconds", "ttt_chunks_trained"):
        assert key in summary, key
    assert summary["score_source"] == "ttt+slot"
    assert summary["val_bpb"] == summary["ttt_val_bpb"] and summary["eval_seconds"] >= summary["ttt_seconds"]
    assert "final_score" in log and "source:ttt+slot" in log
    assert summary["ruling_pending"] is True and "ruling_pending" in log and "issue #1336" in log  # SLOT's standing
    assert summary["overlap_check"] is None and "overlap_check:none (python3 tools/check_overlap.py" in log
    import eval_artifact  # the same passes from the artifact file alone, as a user re-scores one

    said = []  # shape knobs in the environment that disagree with the artifact are ignored, with a warning
    conflicting = {**env, "NUM_LAYERS": "9", "MLP_MULT": "2.0"}
    again = eval_artifact.evaluate_file(conflicting, tmp_path / "logs" / "run.ptz", log=said.append)
    for key in ("quantized_val_bpb", "sliding_val_bpb", "ttt_val_bpb", "score_source"):
        assert again[key] == summary[key], key
    assert again["model_config"] == {k: summary["config"][k] for k in again["model_config"]}
    warnings = [line for line in said if line.startswith("WARNING")]
    assert warnings == ["WARNING: NUM_LAYERS=9 in the environment is ignored: the artifact's model has NUM_LAYERS=4",
                        "WARNING: MLP_MULT=2.0 in the environment is ignored: the artifact's model has MLP_MULT=4.0"]


@pytest.mark.parametrize("vocab", [2048, 512])
def test_artifact_for_another_vocabulary_is_refused(small_sample, tmp_path, vocab):
    import eval_artifact

    path = tmp_path / f"sp{vocab}.ptz"
    path.write_bytes(tiny_artifact(vocab))
    with pytest.raises(tg.ArtifactError, match=f"{path}: its model has VOCAB_SIZE={vocab} but VOCAB_SIZE=1024"):
        eval_artifact.evaluate_file(tiny_env(small_sample, tmp_path), path, max_tokens=2000, log=lambda _: None)


def test_eval_tool_refuses_a_mismatched_artifact_in_one_line(small_sample, tmp_path):
    path = tmp_path / "sp2048.ptz"
    path.write_bytes(tiny_artifact(2048))
    tool = REPO_ROOT / "tools" / "eval_artifact.py"
    done = subprocess.run([sys.executable, str(tool), str(path), "--max-tokens", "2000"], capture_output=True,
                          text=True, env={**os.environ, **tiny_env(small_sample, tmp_path)}, timeout=300)
    assert done.returncode != 0 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [f"error: {path}: its model has VOCAB_SIZE=2048 but VOCAB_SIZE=1024 "
                                                "(the tokenizer's and the data's); use VOCAB_SIZE=2048 with that "
                                                "vocabulary's TOKENIZER_PATH and DATA_PATH"]


def test_eval_tool_refuses_data_of_another_vocabulary(small_sample, tmp_path):
    import eval_artifact

    data = tmp_path / "data"
    data.mkdir()
    tg.write_shard(data / "fineweb_val_000000.bin", [1, 5, 1500, 7])
    path = tmp_path / "sp1024.ptz"
    path.write_bytes(tiny_artifact(1024))
    with pytest.raises(tg.ConfigError, match="token id 1500 >= VOCAB_SIZE=1024"):
        eval_artifact.evaluate_file(tiny_env(small_sample, tmp_path, DATA_PATH=data), path, log=lambda _: None)


@pytest.mark.parametrize("knobs,expected_graphs", [
    (dict(TTT_ENABLED=1, SLOT_ENABLED=1, TTT_FREEZE_BLOCKS=1), 2), (dict(TTT_ENABLED=0, SLOT_ENABLED=1), 2),
    (dict(TTT_ENABLED=1, TTT_MODE="lora", PHASED_TTT_PHASES=1, PHASED_TTT_PREFIX_DOCS=4), 3)],
    ids=["ttt+slot", "slot", "lora ttt"])
def test_scored_passes_run_only_the_graphs_compiled_before_the_clock(knobs, expected_graphs, monkeypatch):
    """Compiled on CPU (a counting backend): the warm-up compiles one graph per batch shape (and LoRA TTT's one
    dynamic graph), and the plain, sliding, TTT and SLOT passes after the clock starts recompile nothing: not for
    partial last batches (300 tokens in batches of 4 sequences and of 6 windows), nor for TTT's frozen blocks."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    real_eval_forward, real_lora_forward, real_clock = tg.eval_forward, tg.lora_forward, tg.EvalClock
    monkeypatch.setattr(tg, "eval_forward", lambda *args: real_eval_forward(*args, backend=counting_backend))
    monkeypatch.setattr(tg, "lora_forward", lambda *args: real_lora_forward(*args, backend=counting_backend))
    warmed = []

    def clock_after_warm_up(budget):  # from here on any recompilation is an error
        warmed.append(len(graphs))
        torch._dynamo.config.error_on_recompile = True
        return real_clock(budget)

    monkeypatch.setattr(tg, "EvalClock", clock_after_warm_up)
    cfg, model, tokens = setup(EVAL_SLIDING_ALSO=1, **knobs)
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(error_on_recompile=False):  # restored on the way out
            data = tg.ValidationData(tokens, check_causality.one_byte_per_token(cfg.VOCAB_SIZE))
            summary = tg.summary_fields(tg.evaluate_artifact_model(cfg, model, data, 4, CPU, lambda _: None))
    finally:
        torch._dynamo.reset()
    assert warmed == [expected_graphs] and len(graphs) == expected_graphs
    assert "sliding_val_bpb" in summary and ("ttt_val_bpb" if knobs["TTT_ENABLED"] else "slot_val_bpb") in summary
