"""Knobs: parsing, ranges, cross-checks, near-miss warnings, and input checks before any work."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

import train_gpt as tg
from train_gpt import ConfigError, config_from_env


def test_defaults_are_the_record_configuration():
    cfg = config_from_env({})
    assert (cfg.NUM_LAYERS, cfg.MODEL_DIM, cfg.NUM_HEADS, cfg.NUM_KV_HEADS, cfg.VOCAB_SIZE) == (11, 512, 8, 4, 8192)
    assert (cfg.LOOP_START, cfg.LOOP_END, cfg.NUM_LOOPS, cfg.ENABLE_LOOPING_AT) == (3, 5, 2, 0.35)
    assert (cfg.QK_GAIN_INIT, cfg.MATRIX_LR, cfg.MUON_WD, cfg.EMA_DECAY, cfg.WARMDOWN_FRAC) == (5.0, 0.028, 0.095,
                                                                                                0.9965, 0.85)
    assert (cfg.MAX_WALLCLOCK_SECONDS, cfg.GPTQ_RESERVE_SECONDS, cfg.ARTIFACT_TARGET_BYTES) == (600.0, 3.0, 16_000_000)


def test_environment_overrides_preset_and_defaults():
    cfg = config_from_env({"PRESET": "sample", "NUM_LAYERS": "5", "MATRIX_LR": "1e-2"})
    assert cfg.NUM_LAYERS == 5 and cfg.MATRIX_LR == 0.01
    assert cfg.VOCAB_SIZE == 1024  # from the preset


@pytest.mark.parametrize("env, words", [
    ({"NUM_LAYERS": "eleven"}, ["NUM_LAYERS", "not a valid int"]),
    ({"MATRIX_LR": "fast"}, ["MATRIX_LR", "not a valid float"]),
    ({"MATRIX_LR": "nan"}, ["MATRIX_LR", "not a valid float"]),
    ({"EMA_DECAY": "1.5"}, ["EMA_DECAY", "out of range", "0.0 <= EMA_DECAY <= 1.0"]),
    ({"NUM_LAYERS": "0"}, ["NUM_LAYERS", "1 <= NUM_LAYERS"]),
    ({"MUON_ROW_NORMALIZE": "2"}, ["MUON_ROW_NORMALIZE", "0 <= MUON_ROW_NORMALIZE <= 1"]),
    ({"MUON_NS_COEFFS": "cubic"}, ["MUON_NS_COEFFS", "quintic, polar_express"]),
    ({"PRESET": "tiny"}, ["PRESET", "record, r1061, r1081, sample"]),
    ({"NUM_KV_HEADS": "3"}, ["NUM_KV_HEADS=3", "NUM_HEADS=8"]),
    ({"MODEL_DIM": "500"}, ["MODEL_DIM=500", "NUM_HEADS=8"]),
    ({"ROPE_DIMS": "15"}, ["ROPE_DIMS=15", "even"]),
    ({"ROPE_DIMS": "128"}, ["ROPE_DIMS=128", "head dim 64"]),
    ({"LOOP_END": "11"}, ["LOOP_END=11", "NUM_LAYERS=11"]),
    ({"LOOP_START": "6"}, ["LOOP_START=6", "LOOP_START <= LOOP_END"]),
    ({"TRAIN_BATCH_TOKENS": "1000"}, ["TRAIN_BATCH_TOKENS=1000", "multiple of TRAIN_SEQ_LEN=2048"]),
    ({"GPTQ_RESERVE_SECONDS": "600"}, ["GPTQ_RESERVE_SECONDS", "no training time"]),
    ({"VAL_BATCH_TOKENS": "100"}, ["VAL_BATCH_TOKENS=100", "TRAIN_SEQ_LEN=2048"]),
    ({"TRAIN_SEQ_SCHEDULE": "1024@0.3"}, ["TRAIN_SEQ_SCHEDULE='1024@0.3'", "LENGTH:FRACTION"]),
    ({"TRAIN_SEQ_SCHEDULE": "2048:0.3"}, ["TRAIN_SEQ_SCHEDULE='2048:0.3'", "lengths must grow"]),
    ({"TRAIN_SEQ_SCHEDULE": "512:0.6,1024:0.3"}, ["TRAIN_SEQ_SCHEDULE='512:0.6,1024:0.3'", "fractions must grow"]),
    ({"TRAIN_SEQ_SCHEDULE": "1024:1.5"}, ["TRAIN_SEQ_SCHEDULE='1024:1.5'", "within (0, 1)"]),
    ({"TRAIN_SEQ_SCHEDULE": "1000:0.5"}, ["TRAIN_SEQ_SCHEDULE='1000:0.5'", "multiple of 256000"]),
    ({"RUN_ID": "../escape"}, ["RUN_ID='../escape'", "plain file name"]),
    ({"RUN_ID": "/tmp/run"}, ["RUN_ID='/tmp/run'", "plain file name"]),
    ({"RUN_ID": "sub\\run"}, ["RUN_ID='sub\\\\run'", "plain file name"]),
    ({"RUN_ID": ".."}, ["RUN_ID='..'", "plain file name"]),
    ({"ASYM_LOGIT_RESCALE": "1", "LOGIT_SOFTCAP": "0"}, ["ASYM_LOGIT_RESCALE=1", "LOGIT_SOFTCAP=0"]),
    ({"ASYM_LOGIT_RESCALE": "1", "PHASED_TTT_PHASES": "0"}, ["ASYM_LOGIT_RESCALE=1", "PHASED_TTT_PHASES > 0"]),
    ({"ASYM_LOGIT_RESCALE": "1", "TTT_ENABLED": "0"}, ["ASYM_LOGIT_RESCALE=1", "TTT_ENABLED=1"]),
    ({"PHASED_TTT_PHASES": "2", "TTT_MODE": "chunk"}, ["PHASED_TTT_PHASES=2 would do nothing", "TTT_MODE=lora"]),
    ({"PHASED_TTT_PHASES": "2", "TTT_ENABLED": "0", "TTT_MODE": "chunk"},
     ["TTT_MODE='chunk' would do nothing: it acts only with TTT_ENABLED=1; PHASED_TTT_PHASES=2 would do nothing: it "
      "acts only with TTT_ENABLED=1 with TTT_MODE=lora. Turn the mode on"]),
    ({"MUON_BACKEND_STEPS": "6"}, ["MUON_BACKEND_STEPS=6", "MUON_NS_COEFFS=quintic"]),
    ({"TRAIN_LOADER": "packed", "VARLEN_ATTENTION": "0"}, ["TRAIN_LOADER=packed", "VARLEN_ATTENTION=1"]),
    ({"TRAIN_LOADER": "packed", "TRAIN_SEQ_SCHEDULE": "1024:0.5"}, ["TRAIN_LOADER=packed", "TRAIN_SEQ_SCHEDULE"]),
])
def test_bad_knobs_name_the_knob_and_the_accepted_range(env, words):
    with pytest.raises(ConfigError) as err:
        config_from_env(env)
    for word in words:
        assert word in str(err.value)


def test_plain_run_ids_and_the_empty_one_are_accepted():
    for run_id in ("", "mytry_s42", "lr0.025-v2"):
        assert config_from_env({"RUN_ID": run_id}).RUN_ID == run_id


def test_recurrence_knobs_are_unchecked_when_recurrence_is_off_and_may_be_left_at_their_defaults():
    assert config_from_env({"NUM_LOOPS": "0", "NUM_LAYERS": "4"}).LOOP_END == 5  # beyond the layers, never read
    assert config_from_env({"NUM_LOOPS": "0", "LOOP_END": "5"}).NUM_LOOPS == 0  # set to its default: no change


# How to turn each mode of tg.KNOB_MODES off and on (with the knobs that mode needs to be valid).
MODE_SWITCHES = {
    "TTT_ENABLED=1": ({"TTT_ENABLED": "0"}, {}),
    "TTT_ENABLED=1 with TTT_MODE=chunk": ({}, {"TTT_MODE": "chunk"}),
    "a TTT that trains": ({"PHASED_TTT_PHASES": "0"}, {}),
    "TTT_ENABLED=1 with TTT_MODE=lora": ({"TTT_MODE": "chunk"}, {}),
    "TTT_MODE=lora with TTT_SHORT_DOC_CHUNK": ({}, {"TTT_SHORT_DOC_CHUNK": "24"}),
    "TTT_MODE=lora with PHASED_TTT_PHASES": ({"PHASED_TTT_PHASES": "0"}, {}),
    "NGRAM_TILT=1": ({"NGRAM_TILT": "0"}, {}),
    "SLOT_ENABLED=1": ({}, {"SLOT_ENABLED": "1", "TTT_MODE": "chunk"}),
    "TTT_ENABLED=1 or SLOT_ENABLED=1": ({"TTT_ENABLED": "0"}, {}),
    "NUM_LOOPS > 0": ({"NUM_LOOPS": "0"}, {}),
    "SMEAR_GATE=1": ({"SMEAR_GATE": "0"}, {}),
    "SPARSE_ATTN_GATE=1": ({"SPARSE_ATTN_GATE": "0"}, {}),
    "VARLEN_ATTENTION=1": ({"VARLEN_ATTENTION": "0"}, {}),
    "QUANT_METHOD=gptq": ({"QUANT_METHOD": "rtn"}, {}),
    "AWQ_TOP_GROUPS > 0": ({}, {"AWQ_TOP_GROUPS": "1"}),
    "LQER_RANK > 0": ({"LQER_RANK": "0"}, {}),
    "WD_TAPER_FINAL_MULT other than 1": ({}, {"WD_TAPER_FINAL_MULT": "0.5"}),
    "MUON_MOMENTUM_WARMUP_STEPS > 0": ({"MUON_MOMENTUM_WARMUP_STEPS": "0"}, {}),
}


def another_value(name: str) -> str:
    """A valid value of the knob other than its default."""
    field = tg.knob_fields()[name]
    default, meta = field.default, field.metadata
    if meta["choices"]:
        return next(c for c in meta["choices"] if c != default)
    if field.type == "int":
        return str(default + 1 if meta["hi"] is None or default + 1 <= meta["hi"] else default - 1)
    return str(default * 0.5 if default else 0.5)


MODE_KNOBS = [(mode, name) for mode, _, names in tg.KNOB_MODES for name in names]


@pytest.mark.parametrize("mode, name", MODE_KNOBS, ids=[name for _, name in MODE_KNOBS])
def test_a_knob_set_outside_its_mode_stops_the_run_and_within_it_is_accepted(mode, name):
    """One rule for every knob that acts only in a mode: set (changed from its default) without the mode, the run
    stops naming the knob and the mode; with the mode on, it is accepted and used."""
    off, on = MODE_SWITCHES[max((p for p in MODE_SWITCHES if mode.startswith(p)), key=len)]
    value = another_value(name)
    with pytest.raises(ConfigError, match=f"{name}={tg.parse_knob(name, value, tg.knob_fields()[name])!r}.* would "
                                          f"do nothing: .* only with {re.escape(mode)}"):
        config_from_env({**off, name: value})
    assert str(getattr(config_from_env({**on, name: value}), name)) == str(tg.parse_knob(name, value,
                                                                                         tg.knob_fields()[name]))
    assert config_from_env({**off, name: str(getattr(config_from_env(off), name))})  # its default changes nothing


def test_every_mode_has_its_switches_in_this_test():
    assert all(any(mode.startswith(prefix) for prefix in MODE_SWITCHES) for mode, _, _ in tg.KNOB_MODES)


@pytest.mark.parametrize("world_size, accum", [(1, 8), (2, 4), (3, 2), (8, 1), (16, 1), (64, 1)])
def test_any_world_size_that_splits_the_batch_is_accepted(world_size, accum):
    cfg = config_from_env({})  # 384 sequences of 2048 per step
    tg.check_batch_split(cfg, world_size)
    assert tg.Runtime(0, world_size, None).accum_steps == accum


@pytest.mark.parametrize("world_size, micro", [(5, 5), (256, 256)])
def test_a_world_size_that_cannot_split_the_batch_names_the_fix(world_size, micro):
    with pytest.raises(ConfigError, match=f"WORLD_SIZE={world_size} cannot split into {micro} equal micro-batches; "
                                          f"make it a multiple of {micro * 2048} tokens"):
        tg.check_batch_split(config_from_env({}), world_size)


@pytest.mark.parametrize("env, words", [
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE='0' is out of range: need 1 <= WORLD_SIZE"),
    ({"WORLD_SIZE": "-2"}, "WORLD_SIZE='-2' is out of range"),
    ({"RANK": "3", "WORLD_SIZE": "1"}, "RANK='3' is out of range: need 0 <= RANK <= 0"),
    ({"RANK": "x"}, "RANK='x' is not an integer"),
    ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "-1"}, "LOCAL_RANK='-1' is out of range"),
])
def test_launcher_variables_are_checked_before_anything_runs(env, words):
    with pytest.raises(ConfigError, match=words):
        tg.launcher_ranks(env)


def test_near_misses_warn_with_the_intended_knob():
    env = {"QK_GAIN": "5", "MUON_WEIGHT_DECAY": "0.1", "MATRIX_LRR": "0.02", "WARMDOWN_ITERS": "3500", "EMA": "0.99"}
    warnings = "\n".join(tg.near_miss_warnings(env))
    for wrong, right in [("QK_GAIN", "QK_GAIN_INIT"), ("MUON_WEIGHT_DECAY", "MUON_WD"), ("MATRIX_LRR", "MATRIX_LR"),
                         ("WARMDOWN_ITERS", "WARMDOWN_FRAC")]:
        assert f"{wrong} is not a knob and is ignored; did you mean {right}?" in warnings


def test_no_warnings_for_knobs_launchers_and_ordinary_environment():
    env = {"PATH": "/bin", "HOME": "/root", "LANG": "C", "USER": "me", "SHELL": "bash", "TERM": "xterm",
           "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_PORT": "1", "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": "0", "NCCL_DEBUG": "INFO", "HOSTNAME": "h", "PWD": "/", "SEED": "1",
           "MATRIX_LR": "0.1", "QK_GAIN_INIT": "5", "LOGNAME": "me", "SHLVL": "1", "DATA": "x"}
    assert tg.near_miss_warnings(env) == []


def test_the_sweep_seeds_variable_is_not_a_misspelled_seed():
    assert tg.near_miss_warnings({"SEEDS": "42 1337 2025"}) == []


def test_every_knob_is_printed(tmp_path):
    text = tg.format_config(config_from_env({}))
    for name in tg.knob_fields():
        assert f"  {name} = " in text


# ---------------------------------------------------------------------------- tokenizer checks


def test_tokenizer_that_disagrees_with_vocab_size(sample):
    with pytest.raises(ConfigError, match="has 1024 pieces but VOCAB_SIZE=8192; set VOCAB_SIZE=1024"):
        tg.load_tokenizer(sample["tokenizer_model"], 8192)


def test_missing_tokenizer(tmp_path):
    with pytest.raises(ConfigError, match="nothing.model not found"):
        tg.load_tokenizer(tmp_path / "nothing.model", 1024)


@pytest.mark.parametrize("content", [b"0123456789", b""], ids=["junk", "empty"])
def test_tokenizer_that_is_not_a_sentencepiece_model(tmp_path, content):
    (tmp_path / "tok.model").write_bytes(content)
    with pytest.raises(ConfigError, match=r"tok.model is not a SentencePiece model .*TOKENIZER_PATH"):
        tg.load_tokenizer(tmp_path / "tok.model", 1024)


def test_a_tokenizer_without_bos_names_the_switches_that_need_it(tmp_path):
    """The fix the message gives must work: BOS_ID=-1 is out of range, turning document handling off is not."""
    text = [" ".join(f"w{i}x{j}" for j in range(20)) for i in range(200)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=str(tmp_path / "nobos"), model_type="bpe",
                                   vocab_size=300, bos_id=-1, hard_vocab_limit=False, minloglevel=2)
    vocab = spm.SentencePieceProcessor(model_file=str(tmp_path / "nobos.model")).vocab_size()
    env = {"TOKENIZER_PATH": str(tmp_path / "nobos.model"), "VOCAB_SIZE": str(vocab)}
    with pytest.raises(ConfigError, match="has no BOS piece, but SMEAR_GATE=1 and VARLEN_ATTENTION=1 and TTT_MODE=lora "
                                          "cut documents at BOS_ID=1: for data without document starts set "
                                          "SMEAR_GATE=0 and VARLEN_ATTENTION=0 \\(and TTT_MODE=chunk\\)"):
        tg.checked_tokenizer(config_from_env(env))
    fixed = {**env, "SMEAR_GATE": "0", "VARLEN_ATTENTION": "0", "TTT_MODE": "chunk"}
    assert tg.checked_tokenizer(config_from_env(fixed)).bos_id() == -1
    # SmearGate without its BOS mask (#2135's) does not cut documents
    assert tg.checked_tokenizer(config_from_env({**fixed, "SMEAR_GATE": "1", "SMEAR_BOS_MASK": "0"})).bos_id() == -1


def test_tokenizer_without_a_bare_space_piece(tmp_path):
    text = ["".join(f"word{i}x{j}" for j in range(50)) for i in range(200)]  # no spaces at all
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=str(tmp_path / "nospace"),
                                   model_type="bpe", vocab_size=300, byte_fallback=True, add_dummy_prefix=False,
                                   hard_vocab_limit=False, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "nospace.model"))
    assert sp.piece_to_id("\u2581") == sp.unk_id()
    with pytest.raises(ConfigError, match="no bare '\u2581' piece"):
        tg.load_tokenizer(tmp_path / "nospace.model", sp.vocab_size())


def test_validation_token_beyond_vocab_is_refused_before_training(sample, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    tg.write_shard(data / "fineweb_train_000000.bin", np.arange(5000) % 1024)
    tg.write_shard(data / "fineweb_val_000000.bin", np.array([1, 5, 1500, 7]))
    env = {"PRESET": "sample", "DATA_PATH": str(data), "TOKENIZER_PATH": str(sample["tokenizer_model"]),
           "LOG_DIR": str(tmp_path / "logs"), "RUN_ID": "bad"}
    with pytest.raises(ConfigError, match="token id 1500 >= VOCAB_SIZE=1024"):
        tg.main(env)
    assert "token id 1500" in (tmp_path / "logs" / "bad.txt").read_text()


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def test_run_start_removes_temporaries_of_killed_writes_only(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    dead, alive = logs / f"old.ptz.tmp{dead_pid()}", logs / f"busy.json.tmp{os.getpid()}"
    unrelated = [logs / "notes.tmp", logs / "old.ptz", logs / f"backup.tar.tmp{dead_pid()}"]
    for path in [dead, alive, *unrelated]:
        path.write_bytes(b"x")
    env = {"PRESET": "sample", "TOKENIZER_PATH": str(tmp_path / "missing.model"), "LOG_DIR": str(logs), "RUN_ID": "r"}
    with pytest.raises(ConfigError, match="missing.model not found"):
        tg.main(env)
    assert not dead.exists() and alive.exists() and all(p.exists() for p in unrelated)
    assert f"removed {dead}, left by a write that was killed" in (logs / "r.txt").read_text()


def test_an_attention_backend_that_cannot_run_stops_the_run_before_any_input_is_read(tmp_path):
    """On a CPU, ATTENTION_BACKEND=fa3 fails first: the data and tokenizer paths do not even exist."""
    env = {"PRESET": "sample", "ATTENTION_BACKEND": "fa3", "DATA_PATH": str(tmp_path / "nowhere"),
           "TOKENIZER_PATH": str(tmp_path / "nowhere.model"), "LOG_DIR": str(tmp_path / "logs"), "RUN_ID": "fa3"}
    with pytest.raises(ConfigError, match="ATTENTION_BACKEND=fa3 cannot be used: it needs a CUDA GPU"):
        tg.main(env)
    summary = json.loads((tmp_path / "logs" / "fa3.json").read_text())
    assert summary["status"] == "failed" and "flash-attention/hopper" in summary["error"]
    said = (tmp_path / "logs" / "fa3.txt").read_text().split("=" * 100)[-1]  # the log after the script's source
    assert "error: ATTENTION_BACKEND=fa3 cannot be used" in said and "train_shards:" not in said


def test_the_backend_probe_checks_the_functions_the_model_calls(tmp_path, monkeypatch):
    """flash-attn-4 installs a `flash_attn` namespace package with neither flash_attn_func nor the varlen one: the
    import alone used to pass, `auto` would take fa2, and the model build then failed."""
    (tmp_path / "flash_attn").mkdir()  # a namespace package: no __init__.py
    (tmp_path / "flash_attn_interface.py").write_text("def flash_attn_func(q, k, v, causal=True):\n    return q\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("flash_attn", "flash_attn_interface"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    fa2, fa3 = tg.flash_module_problem("fa2"), tg.flash_module_problem("fa3")
    assert "module flash_attn (" in fa2 and "has no flash_attn_func or flash_attn_varlen_func" in fa2
    assert "has no flash_attn_varlen_func:" in fa3 and "flash_attn_func or" not in fa3
    (tmp_path / "flash_attn_interface.py").write_text("def flash_attn_func(): pass\ndef flash_attn_varlen_func(): pass\n")
    monkeypatch.delitem(sys.modules, "flash_attn_interface")
    assert tg.flash_module_problem("fa3") is None


@pytest.mark.parametrize("isolation", ["varlen", "flex"])
def test_a_document_isolation_that_needs_a_gpu_stops_a_cpu_run_before_any_input_is_read(tmp_path, isolation):
    env = {"PRESET": "sample", "DOC_ATTENTION": isolation, "DATA_PATH": str(tmp_path / "nowhere"),
           "TOKENIZER_PATH": str(tmp_path / "nowhere.model"), "LOG_DIR": str(tmp_path / "logs")}
    with pytest.raises(ConfigError, match=f"DOC_ATTENTION={isolation} needs a CUDA GPU .*set DOC_ATTENTION=mask"):
        tg.main(env)


@pytest.mark.parametrize("knob", ["FUSED_CE", "FUSED_MLP"])
def test_a_fused_kernel_off_a_gpu_stops_the_run_before_any_input_is_read(tmp_path, knob):
    env = {"PRESET": "sample", knob: "1", "DATA_PATH": str(tmp_path / "nowhere"),
           "TOKENIZER_PATH": str(tmp_path / "nowhere.model"), "LOG_DIR": str(tmp_path / "logs"), "RUN_ID": "ce"}
    with pytest.raises(ConfigError, match=f"{knob}=1: its Triton kernels need a CUDA GPU and this run is on cpu; "
                                          f"set {knob}=0"):
        tg.main(env)


def test_a_fused_kernel_whose_library_is_missing_is_named_with_its_install(monkeypatch):
    cfg = tg.config_from_env({"FUSED_MLP": "1"})
    real_import = tg.importlib.import_module

    def import_module(name):
        if name == "triton":
            raise ImportError("no")
        return real_import(name)
    monkeypatch.setattr(tg.importlib, "import_module", import_module)
    assert tg.fused_kernel_problem(cfg, torch.device("cuda")) == \
        "FUSED_MLP=1: triton cannot be imported (no); pip install triton, or set FUSED_MLP=0"


def test_import_has_no_side_effects(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import train_gpt"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(tg.__file__).parent), "NUM_LAYERS": "bad"})
    assert done.returncode == 0 and done.stdout == "" and done.stderr == ""
    assert list(tmp_path.iterdir()) == []


def test_knob_table_in_docs_is_current():
    """docs/knobs.md holds the table tools/knob_table.py generates from Config."""
    script = Path(tg.__file__).parent / "tools" / "knob_table.py"
    done = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_evaluation_table_gives_each_row_the_common_settings_its_modes_read():
    sys.path.insert(0, str(Path(tg.__file__).resolve().parent / "bench"))
    import eval_modes

    common = {"PRESET": "sample", "TTT_DOC_BATCH": "4", "PHASED_TTT_PREFIX_DOCS": "12", "SLOT_STEPS": "3"}
    rows = {name: eval_modes.row_environment(common, knobs) for name, knobs in eval_modes.MODES}
    assert "TTT_DOC_BATCH" not in rows["TTT"] and rows["LoRA TTT"]["TTT_DOC_BATCH"] == "4"
    assert "PHASED_TTT_PREFIX_DOCS" not in rows["LoRA TTT"]
    assert rows["LoRA TTT + phases"]["PHASED_TTT_PREFIX_DOCS"] == "12"
    assert rows["SLOT"]["SLOT_STEPS"] == "3" and "SLOT_STEPS" not in rows["sliding"]
    for env in rows.values():  # every row's knobs resolve: none is left where it would do nothing
        config_from_env(env)
