"""Quantization and the artifact: shuffling, GPTQ, the container, the model config it carries, auto-fit, the guard."""
import ast
import dataclasses
import json
import math
import re
import subprocess
import shutil
import sys
import types
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt as tg
from test_training import tiny_env


@pytest.mark.parametrize("stride", [1, 2, 4])
def test_byte_shuffle_is_inverted_and_groups_bytes(stride):
    data = np.random.default_rng(stride).integers(0, 256, 24 * stride).astype(np.uint8).tobytes()
    shuffled = tg.byte_shuffle(data, stride)
    assert tg.byte_unshuffle(shuffled, stride) == data
    assert shuffled[:24] == data[::stride]  # first byte of every element, then the second, ...


def correlated_layer(seed=0, rows=48, cols=96, samples=4096):
    """A weight matrix and the Hessian of strongly correlated inputs (a low-rank mix plus noise)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, 8, generator=g)
    x = torch.randn(samples, 8, generator=g) @ mix.T + 0.1 * torch.randn(samples, cols, generator=g)
    return torch.randn(rows, cols, generator=g), x.T @ x / samples


def hessian_error(W, q, scale, H) -> float:
    delta = W - tg.dequantize(q, scale)
    return float(torch.trace(delta @ H @ delta.T))


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(bits):
    W, H = correlated_layer()
    factor = tg.gptq_factor(H, 0.01)
    q_gptq, s_gptq = tg.quantize_gptq(W, factor, bits, 12.85, block=32)
    q_rtn, s_rtn = tg.quantize_rtn(W, bits, 12.85)
    assert torch.equal(s_gptq, s_rtn)  # same std-based grid; only the rounding decisions differ
    assert q_gptq.abs().max() <= 2 ** (bits - 1) - 1
    assert hessian_error(W, q_gptq, s_gptq, H) < 0.8 * hessian_error(W, q_rtn, s_rtn, H)


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest():
    W, _ = correlated_layer()
    H = torch.diag(torch.rand(W.size(1)) + 0.5)
    H[5, 5] = 0.0  # a dead column: its weights are dropped, and it disturbs nothing else
    q, scale = tg.quantize_gptq(W, tg.gptq_factor(H, 0.01), 6, 12.85, block=16)
    q_rtn, _ = tg.quantize_rtn(W, 6, 12.85)
    assert torch.equal(q[:, 5], torch.zeros_like(q[:, 5]))
    keep = [c for c in range(W.size(1)) if c != 5]
    assert torch.equal(q[:, keep], q_rtn[:, keep])


def test_row_scale_is_k_std_over_qmax_in_fp16():
    W = torch.randn(6, 200) * torch.arange(1, 7)[:, None]
    W[2] = 0.0
    scale = tg.row_scales(W, 6, 10.0)
    expected = (10.0 * W.std(dim=1) / 31).half().float()
    assert torch.equal(scale[[0, 1, 3, 4, 5]], expected[[0, 1, 3, 4, 5]])
    assert scale[2] > 0 and tg.quantize_rtn(W, 6, 10.0)[0][2].abs().max() == 0  # a zero row stays zero


def synthetic_quantized(bits_list, seed=0):
    g = torch.Generator().manual_seed(seed)
    quantized = {}
    for bits in bits_list:
        qmax = 2 ** (bits - 1) - 1
        q = torch.randint(-qmax, qmax + 1, (37, 53), generator=g).to(torch.int8)
        quantized[f"w{bits}"] = dict(q=q, scale=torch.rand(37, generator=g).half(), bits=bits, group="mlp")
    passthrough = {"gain": torch.randn(5, generator=g).half(), "mix": torch.randn(2, 3, generator=g).half()}
    model_config = tg.ModelConfig(NUM_LAYERS=3, MLP_MULT=3.5, MODEL_DIM=96, NUM_HEADS=3, NUM_KV_HEADS=1, ROPE_DIMS=8,
                                  LOOP_START=1, LOOP_END=2)
    return tg.QuantizedModel(quantized, passthrough, model_config)


@pytest.mark.parametrize("compressor", ["brotli", "lzma", "rans"])
def test_container_round_trip_is_exact(compressor):
    qm = synthetic_quantized(range(2, 9))
    blob, by_group = tg.encode_artifact(qm, compressor)
    back = tg.decode_artifact(blob)
    for name, e in qm.quantized.items():
        assert torch.equal(back.quantized[name]["q"], e["q"]) and torch.equal(back.quantized[name]["scale"], e["scale"])
    assert all(torch.equal(back.passthrough[k], v) for k, v in qm.passthrough.items())
    assert back.model_config == qm.model_config and isinstance(back.model_config, tg.ModelConfig)
    assert sum(by_group.values()) == len(blob)


TINY_MODEL = dict(NUM_LAYERS=2, MODEL_DIM=32, NUM_HEADS=2, NUM_KV_HEADS=1, ROPE_DIMS=8, XSA_LAST_N=2, NUM_LOOPS=0,
                  PARALLEL_RESIDUAL_START=1)


def tiny_artifact(vocab_size: int = 1024) -> bytes:
    """An artifact of a small random model (every tensor fp16 pass-through) for the given vocabulary."""
    cfg = tg.config_from_env({k: str(v) for k, v in dict(TINY_MODEL, VOCAB_SIZE=vocab_size).items()})
    torch.manual_seed(0)
    model = tg.GPT(cfg, "sdpa")
    qm = tg.QuantizedModel({}, {k: v.half() for k, v in model.state_dict().items()}, cfg.model)
    return tg.encode_artifact(qm, "lzma")[0]


def test_asym_logit_rescale_gives_the_artifacts_model_two_caps_at_its_softcap():
    """ASYM_LOGIT_RESCALE is an evaluation knob: the artifact holds no caps, the model built from it gets both at
    the stored LOGIT_SOFTCAP; a model without a softcap has none to split, and says so."""
    cfg = tg.config_from_env({k: str(v) for k, v in dict(TINY_MODEL, VOCAB_SIZE=1024, ASYM_LOGIT_RESCALE=1).items()})
    qm = tg.decode_artifact(tiny_artifact(1024))
    assert not any("cap" in name for name in qm.passthrough)
    model = tg.model_from_artifact(qm, cfg, "sdpa", torch.device("cpu"))
    assert [c.item() for c in model.split_caps] == [qm.model_config.LOGIT_SOFTCAP] * 2
    assert tg.model_from_artifact(qm, tg.dataclasses.replace(cfg, ASYM_LOGIT_RESCALE=0), "sdpa",
                                  torch.device("cpu")).split_caps is None
    capless = tg.dataclasses.replace(qm, model_config=tg.dataclasses.replace(qm.model_config, LOGIT_SOFTCAP=0.0))
    with pytest.raises(tg.ArtifactError, match="no logit softcap .* set ASYM_LOGIT_RESCALE=0"):
        tg.model_from_artifact(capless, cfg, "sdpa", torch.device("cpu"), origin="capless.ptz")


def with_header(blob: bytes, change) -> bytes:
    """The artifact with change(header) applied and a valid CRC: what a hand edit or another writer produces."""
    magic, cid, header_len, _ = tg.ARTIFACT_PREFIX.unpack_from(blob)
    compressor, start = tg.COMPRESSORS[cid], tg.ARTIFACT_PREFIX.size
    header = json.loads(tg.decompress(blob[start:start + header_len], compressor))
    change(header)
    header_blob = tg.compress(json.dumps(header).encode(), compressor)
    prefix = tg.ARTIFACT_PREFIX.pack(magic, cid, len(header_blob), zlib.crc32(header_blob))
    return prefix + header_blob + blob[start + header_len:]


def test_artifact_format_is_written_and_an_older_one_is_refused_by_number():
    blob = tiny_artifact()
    assert blob[:4] == b"PGQ5"
    assert tg.decode_artifact(with_header(blob, lambda h: None)).model_config.NUM_LAYERS == 2
    older = with_header(blob, lambda h: h.update(format=4))
    with pytest.raises(tg.ArtifactError, match="old.ptz: format 4 artifact, but this train_gpt.py reads format 5"):
        tg.decode_artifact(older, "old.ptz")


@pytest.mark.parametrize("found", sorted(tg.OLDER_ARTIFACT_FORMATS) + [tg.ARTIFACT_FORMAT + 1])
def test_an_artifact_of_another_format_is_named_with_the_version_that_reads_it(found):
    """The magic carries the format digit and is read first: an older artifact used to be called corrupt."""
    blob = b"PGQ%d" % found + tiny_artifact()[4:]
    with pytest.raises(tg.ArtifactError) as err:
        tg.decode_artifact(blob, "old.ptz")
    message = str(err.value)
    assert message.startswith(f"old.ptz: a format-{found} artifact") and "corrupt" not in message
    if found in tg.OLDER_ARTIFACT_FORMATS:
        commit = tg.OLDER_ARTIFACT_FORMATS[found][1]
        assert f"Read it with the train_gpt.py of commit {commit}, the last to read format {found}" in message
    else:
        assert "written by a newer train_gpt.py" in message


def test_each_named_commit_is_the_last_before_its_format_changed():
    """The table's commits, checked against this repository's history where the clone has it: each reads its format
    and is the parent of the commit that moved to the next one."""
    repo = Path(tg.__file__).resolve().parent

    def git(*args) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)

    def format_at(commit: str) -> int:
        found = re.search(r'^ARTIFACT_FORMAT = (\d+)|^ARTIFACT_MAGIC = b"PGQ(\d+)"',
                          git("show", f"{commit}:train_gpt.py").stdout, re.M)
        return int(found.group(1) or found.group(2))

    changes = git("log", "--format=%H %P", "-G", r"^ARTIFACT_(FORMAT|MAGIC) = ", "--", "train_gpt.py")
    commits = [commit for _, commit in tg.OLDER_ARTIFACT_FORMATS.values()]
    if changes.returncode != 0 or any(git("cat-file", "-e", commit).returncode for commit in commits):
        pytest.skip("this clone lacks the repository's history")
    moves = [line.split() for line in changes.stdout.splitlines()]
    for found, (_, commit) in tg.OLDER_ARTIFACT_FORMATS.items():
        assert format_at(commit) == found, commit
        assert any(format_at(child) == found + 1 and any(p.startswith(commit) for p in parents)
                   for child, *parents in moves), commit


@pytest.mark.parametrize("knob, value, words", [
    ("NUM_LAYERS", 100000, "NUM_LAYERS='100000' is out of range: accepted 1 <= NUM_LAYERS <= 256"),
    ("MODEL_DIM", -32, "MODEL_DIM='-32' is out of range"),
    ("NUM_LAYERS", 2.5, "NUM_LAYERS='2.5' is not a valid int"),
    ("MLP_MULT", math.nan, "MLP_MULT='nan' is not a valid float"),
    ("ROPE_BASE", "fast", "ROPE_BASE='fast' is not a valid float"),
    ("MATRIX_LR", 0.1, "has 'MATRIX_LR', which is not a ModelConfig field"),
    ("NUM_HEADS", 3, "MODEL_DIM=32 must be divisible by NUM_HEADS=3"),
])
def test_header_model_knobs_are_checked_like_environment_knobs(knob, value, words):
    edited = with_header(tiny_artifact(), lambda h: h["model_config"].update({knob: value}))
    with pytest.raises(tg.ArtifactError) as err:
        tg.decode_artifact(edited, "edited.ptz")
    assert str(err.value).startswith("edited.ptz: header model_config") and words in str(err.value)


def test_a_new_model_config_field_travels_through_the_artifact_with_no_other_edit(monkeypatch):
    """What adding a field to ModelConfig does, simulated with a subclass: the header stores it, decoding
    range-checks it like a knob and hands it to the rebuilt model's config, with no list to update."""
    cfg = tg.config_from_env({k: str(v) for k, v in dict(TINY_MODEL, VOCAB_SIZE=1024).items()})
    extended = tg.dataclasses.make_dataclass("ModelConfig", [("NEW_SWITCH", "int", tg.knob(0, 0, 7))],
                                             bases=(tg.ModelConfig,))
    model_config = extended(**tg.dataclasses.asdict(cfg.model), NEW_SWITCH=5)
    monkeypatch.setattr(tg, "ModelConfig", extended)
    torch.manual_seed(0)
    model = tg.GPT(model_config, "sdpa")
    qm = tg.QuantizedModel({}, {k: v.half() for k, v in model.state_dict().items()}, model_config)
    blob = tg.encode_artifact(qm, "lzma")[0]
    back = tg.decode_artifact(blob)
    assert back.model_config == model_config and back.model_config.NEW_SWITCH == 5
    rebuilt = tg.model_from_artifact(back, cfg, "sdpa", torch.device("cpu"))
    assert all(torch.equal(v, model.state_dict()[k].half().float()) for k, v in rebuilt.state_dict().items())
    with pytest.raises(tg.ArtifactError, match="NEW_SWITCH='9' is out of range"):
        tg.decode_artifact(with_header(blob, lambda h: h["model_config"].update(NEW_SWITCH=9)))


def test_every_model_config_field_is_a_knob_and_config_model_copies_them_all():
    names = [f.name for f in tg.dataclasses.fields(tg.ModelConfig)]
    assert [f.name for f in tg.dataclasses.fields(tg.Config)][:len(names)] == names  # inherited: one declaration
    env = {name: str(2 * getattr(tg.ModelConfig(), name)) for name in ("NUM_LAYERS", "XSA_LAST_N", "ROPE_BASE")}
    cfg = tg.config_from_env(env)
    assert cfg.model == tg.ModelConfig(NUM_LAYERS=22, XSA_LAST_N=22, ROPE_BASE=20000.0)
    assert type(cfg.model) is tg.ModelConfig and tg.dataclasses.asdict(cfg.model).keys() == set(names)


def test_a_header_without_a_model_field_is_refused_by_name():
    edited = with_header(tiny_artifact(), lambda h: h["model_config"].pop("XSA_LAST_N"))
    with pytest.raises(tg.ArtifactError, match="edited.ptz: header model_config lacks 'XSA_LAST_N'"):
        tg.decode_artifact(edited, "edited.ptz")


def test_a_header_written_before_the_leaky_slope_knob_reads_as_the_slope_it_was_trained_with():
    """MLP_LEAKY_SLOPE came within format 5: a header without it is an artifact of the fixed slope 0.5, and the
    slope a header holds is the one the rebuilt model runs."""
    older = tg.decode_artifact(with_header(tiny_artifact(), lambda h: h["model_config"].pop("MLP_LEAKY_SLOPE")))
    assert older.model_config.MLP_LEAKY_SLOPE == 0.5
    cfg = tg.config_from_env({"VOCAB_SIZE": "1024"})
    steep = tg.decode_artifact(with_header(tiny_artifact(), lambda h: h["model_config"].update(MLP_LEAKY_SLOPE=0.3)))
    model = tg.model_from_artifact(steep, cfg, "sdpa", torch.device("cpu"))
    assert {block.mlp.slope for block in model.blocks} == {0.3}


@pytest.mark.parametrize("knob, value, words", [
    ("MODEL_DIM", 64, "or stores it in another shape"),
])
def test_header_knobs_that_disagree_with_the_weights_are_refused(knob, value, words):
    edited = tg.decode_artifact(with_header(tiny_artifact(), lambda h: h["model_config"].update({knob: value})))
    cfg = tg.config_from_env({"VOCAB_SIZE": "1024"})
    with pytest.raises(tg.ArtifactError, match=f"edited.ptz: .*{words}"):
        tg.model_from_artifact(edited, cfg, "sdpa", torch.device("cpu"), origin="edited.ptz")


def test_compressed_size_does_not_grow_with_clip_sigmas():
    W = torch.randn(256, 512, generator=torch.Generator().manual_seed(3))
    sizes = []
    for k in (3.0, 6.0, 12.85, 20.0, 40.0):
        q, scale = tg.quantize_rtn(W, 6, k)
        qm = tg.QuantizedModel({"w": dict(q=q, scale=scale.half(), bits=6, group="mlp")}, {}, tg.ModelConfig())
        sizes.append(len(tg.encode_artifact(qm, "brotli")[0]))
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < 0.7 * sizes[0]


@pytest.fixture(scope="module")
def artifact_run(small_sample, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("artifact")
    summary = tg.main(tiny_env(small_sample, tmp))
    return summary, tmp / "logs" / "run.ptz"


def test_run_reports_every_byte(artifact_run):
    summary, path = artifact_run
    assert summary["model_bytes"] == path.stat().st_size
    assert summary["artifact_bytes_total"] == summary["model_bytes"] + summary["code_bytes"]
    assert sum(summary["artifact_bytes_by_group"].values()) == summary["model_bytes"]
    source = (tg.Path(tg.__file__)).read_text()
    assert summary["code_bytes"] == len(tg.pack_source(source).encode()) and summary["code_bytes_raw"] == len(source.encode())
    assert summary["code_bytes"] < summary["code_bytes_raw"] / 2
    assert summary["quant_gap_bpb"] == summary["quantized_val_bpb"] - summary["pre_quant_val_bpb"]
    assert abs(summary["quant_gap_bpb"]) < 0.05
    for key in ("hessian_seconds", "gptq_seconds", "compress_seconds", "decompress_seconds",
                "artifact_production_seconds"):
        assert summary[key] >= 0, key


def test_artifact_alone_rebuilds_the_quantized_model(artifact_run, small_sample, tmp_path):
    summary, path = artifact_run
    cfg = tg.config_from_env(tiny_env(small_sample, tmp_path, NUM_LAYERS=9, MODEL_DIM=32))  # knobs come from the file
    model = tg.model_from_artifact(tg.load_artifact(path), cfg, "sdpa", torch.device("cpu"))
    assert len(model.blocks) == 4 and model.tok_emb.weight.shape == (1024, 64) and model.looping
    data = tg.Path(small_sample["dataset_dir"])
    tables = tg.byte_tables(tg.load_tokenizer(tg.Path(small_sample["tokenizer_model"]), 1024))
    val = tg.ValidationData(tg.load_validation_tokens(data), tables)
    result = tg.evaluate(model, val, 64, 64, tg.Runtime(0, 1, torch.device("cpu")))
    assert result["val_bpb"] == summary["quantized_val_bpb"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "magic", "extend"])
def test_damaged_artifact_gives_a_clear_error(artifact_run, tmp_path, damage):
    blob = bytearray(artifact_run[1].read_bytes())
    if damage == "truncate":
        blob = blob[:-100]
    elif damage == "flip":
        blob[-500] ^= 0x10
    elif damage == "magic":
        blob[:4] = b"PK\x03\x04"
    else:
        blob += b"\0"
    bad = tmp_path / "bad.ptz"
    bad.write_bytes(bytes(blob))
    with pytest.raises(tg.ArtifactError, match=f"{bad}: .*truncated or corrupt"):
        tg.load_artifact(bad)
    with pytest.raises(tg.ArtifactError, match="not found"):
        tg.load_artifact(tmp_path / "missing.ptz")


def test_every_single_bit_flip_in_prefix_and_header_is_caught(artifact_run, tmp_path):
    blob = artifact_run[1].read_bytes()
    _, _, header_len, _ = tg.ARTIFACT_PREFIX.unpack_from(blob)
    for i in range(tg.ARTIFACT_PREFIX.size + header_len):
        damaged = bytearray(blob)
        damaged[i] ^= 1 << (i % 8)
        with pytest.raises(tg.ArtifactError, match="truncated or corrupt"):
            tg.decode_artifact(bytes(damaged), "x")


def test_calibration_reads_training_shards_only(small_sample, tmp_path, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(small_sample["dataset_dir"], data)
    for val in data.glob("fineweb_val_*.bin"):
        val.write_bytes(b"poison")  # any read of a validation shard would now fail
    opened = []
    real_read_shard = tg.read_shard
    monkeypatch.setattr(tg, "read_shard", lambda path: opened.append(tg.Path(path).name) or real_read_shard(path))
    cfg = tg.config_from_env(tiny_env(small_sample, tmp_path, DATA_PATH=data, GPTQ_CALIBRATION_BATCHES=2))
    torch.manual_seed(0)
    model = tg.GPT(cfg)
    model.looping = True
    plan = tg.quantization_plan(model, cfg)
    rt = tg.Runtime(0, 1, torch.device("cpu"))
    hessians, tokens = tg.collect_hessians(cfg, model, plan, tg.calibration_batches(cfg, tg.find_shards(data, "train"),
                                                                                    rt), rt)
    assert opened and all(name.startswith("fineweb_train_") for name in opened)
    assert tokens == 2 * cfg.TRAIN_BATCH_TOKENS and set(hessians) == {g.hessian for g in plan}

    # Same Hessians by hand: the final hidden state and every pass through a looped layer.
    seen = {"final_hidden": [], "blocks.1.attn.qkv": []}
    hook = model.blocks[1].attn.c_q.register_forward_pre_hook(lambda _m,
                                                              args: seen["blocks.1.attn.qkv"].append(args[0]))
    loader = tg.TrainLoader(tg.find_shards(data, "train"), cfg.TRAIN_SEQ_LEN, cfg.SEED)
    with torch.no_grad():
        for _ in range(2):
            batch = loader.next_batch(tg.global_seqs(cfg), 0, 1)
            for micro in batch.chunk(8):
                seen["final_hidden"].append(model.forward_hidden(micro[:, :-1]))
    hook.remove()
    assert len(seen["blocks.1.attn.qkv"]) == 2 * len(seen["final_hidden"])  # layer 1 runs twice per forward
    for key, xs in seen.items():
        x = torch.cat([t.flatten(0, 1) for t in xs])
        torch.testing.assert_close(hessians[key], x.T @ x / tokens, rtol=1e-4, atol=1e-6)


def test_autofit_lands_under_the_target_and_reports_its_cost(artifact_run, small_sample, tmp_path, monkeypatch):
    reference, _ = artifact_run
    target = int(reference["artifact_bytes_total"] * 0.85)
    calls = []
    for name in ("model_from_artifact", "evaluate_artifact_model"):
        real = getattr(tg, name)
        monkeypatch.setattr(tg, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    summary = tg.main(tiny_env(small_sample, tmp_path, ARTIFACT_TARGET_BYTES=target))
    # the model at the configured sigmas is rebuilt for its diagnostic after the scored evaluation, not in its way
    assert calls == ["model_from_artifact", "evaluate_artifact_model", "model_from_artifact"]
    assert summary["artifact_bytes_total"] <= target < reference["artifact_bytes_total"]
    assert summary["autofit_sigma_scale"] > 1 and abs(summary["autofit_probes"][0][1] - reference["artifact_bytes_total"]) <= 64
    assert summary["clip_sigmas"]["mlp"] == pytest.approx(tg.Config.MLP_CLIP_SIGMAS * summary["autofit_sigma_scale"])
    assert "autofit_bpb_cost" in summary and "autofit: sigma_scale:" in (tmp_path / "logs" / "run.txt").read_text()


def test_over_budget_fails_loudly_but_keeps_log_and_artifact(artifact_run, small_sample, tmp_path, monkeypatch):
    reference, _ = artifact_run
    monkeypatch.setattr(tg, "ARTIFACT_LIMIT_BYTES", reference["artifact_bytes_total"] // 2)
    with pytest.raises(tg.ArtifactError, match="ARTIFACT OVER BUDGET"):
        tg.main(tiny_env(small_sample, tmp_path, QUANT_METHOD="rtn"))
    summary = json.loads((tmp_path / "logs" / "run.json").read_text())
    assert summary["status"] == "failed" and "OVER BUDGET" in summary["error"]
    assert (tmp_path / "logs" / "run.ptz").stat().st_size == summary["model_bytes"]
    assert "error: ARTIFACT OVER BUDGET" in (tmp_path / "logs" / "run.txt").read_text()


def test_artifact_failure_on_rank_zero_stops_every_rank(small_sample, tmp_path):
    """An impossible target fails on rank 0 while rank 1 waits for the artifact: both must exit."""
    import os
    import subprocess
    import sys

    env = {**os.environ, **tiny_env(small_sample, tmp_path, ARTIFACT_TARGET_BYTES=1000, RUN_ID="ddp"),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(tg.Path(tg.__file__))]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode != 0
    assert "ARTIFACT_TARGET_BYTES=1000: still" in done.stderr and "rank 0 could not build the artifact" in done.stderr
    summary = json.loads((tmp_path / "logs" / "ddp.json").read_text())
    assert summary["status"] == "failed" and "ARTIFACT_TARGET_BYTES=1000" in summary["error"]


def test_autofit_on_two_ranks_keeps_the_collectives_in_step(artifact_run, small_sample, tmp_path):
    """Auto-fit's extra evaluation runs on rank 0 alone; the ranks must still finish together."""
    import os
    import subprocess
    import sys

    target = int(artifact_run[0]["artifact_bytes_total"] * 0.85)
    env = {**os.environ, **tiny_env(small_sample, tmp_path, ARTIFACT_TARGET_BYTES=target, RUN_ID="ddp"),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(tg.Path(tg.__file__))]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "logs" / "ddp.json").read_text())
    assert summary["artifact_bytes_total"] <= target and "autofit_bpb_cost" in summary and summary["score_source"] == "ttt"


def test_the_shipped_code_drops_the_knob_docs_and_keeps_every_knob(monkeypatch):
    """The packed file leaves out knob(doc=...) (docs/knobs.md is generated from the source), nothing else."""
    source = tg.Path(tg.__file__).read_text()
    minified = tg.minify_source(source)
    def knob_docs(text):
        return [k for node in ast.walk(ast.parse(text)) if isinstance(node, ast.Call) and getattr(node.func, "id",
                                                                                                  "") == "knob"
                for k in node.keywords if k.arg == "doc"]
    assert len(knob_docs(source)) > 50 and knob_docs(minified) == []
    shipped = types.ModuleType("shipped_train_gpt")
    monkeypatch.setitem(sys.modules, shipped.__name__, shipped)  # dataclasses look their module up
    exec(compile(minified, "shipped_train_gpt.py", "exec"), shipped.__dict__)

    def knobs(config_class):
        return [(f.name, f.default, *(f.metadata[k] for k in ("lo", "hi",
                                                              "choices"))) for f in tg.dataclasses.fields(config_class)]
    assert knobs(shipped.Config) == knobs(tg.Config)
    assert all(f.metadata["doc"] == "" for f in tg.dataclasses.fields(shipped.Config))


def perturbed_model(**knobs) -> tuple:
    """TINY_MODEL at vocabulary 1024 with these knobs, seeded, every weight moved off its initial value."""
    cfg = tg.config_from_env({k: str(v) for k, v in dict(TINY_MODEL, VOCAB_SIZE=1024, **knobs).items()})
    torch.manual_seed(0)
    model = tg.GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return cfg, model


def test_every_frontier_switch_survives_the_artifact():
    """With every gate and both lanes on, each tensor is quantized or passed through, the header's ModelConfig
    rebuilds the same network, and the decoded model computes what the packed weights compute."""
    cfg, model = perturbed_model(NUM_LAYERS=3, XSA_LAST_N=3, SMEAR_GATE=1, SPARSE_ATTN_GATE=1, VARLEN_ATTENTION=1,
                                 PARALLEL_LANES_START=2, QUANT_ATTN_GATE=1)
    qm = tg.quantize_model(cfg, model, tg.quantization_plan(model, cfg), None)
    stored = {n for n in qm.quantized if not n.endswith((tg.LQER_A, tg.LQER_B))} | set(qm.passthrough)
    assert stored == set(model.state_dict())
    assert {"smear_w", "smear_lambda", "blocks.2.lane_post"} <= set(qm.passthrough)
    for i in range(3):  # the sparse gate: int8 per row, each row's largest weight at +-127, within half a step
        gate, stored = model.state_dict()[f"blocks.{i}.attn.gate_w"], qm.quantized[f"blocks.{i}.attn.gate_w"]
        assert (stored["bits"], stored["group"], stored["q"].dtype) == (8, "gate", torch.int8)
        assert torch.equal(stored["q"].abs().amax(1), torch.full((cfg.NUM_HEADS,), 127, dtype=torch.int8))
        error = (tg.dequantize(stored["q"], stored["scale"]) - gate).abs()
        assert torch.all(error <= stored["scale"].float()[:, None] * 0.5 + 1e-3 * gate.abs())
    rebuilt = tg.model_from_artifact(tg.decode_artifact(tg.encode_artifact(qm, "lzma")[0]), cfg, "sdpa", torch.device("cpu"))
    assert rebuilt.smear_gate and rebuilt.varlen and rebuilt.blocks[2].lanes and not rebuilt.blocks[1].lanes
    reference = tg.GPT(cfg)
    reference.load_state_dict(qm.state_dict(reference.state_dict()))
    tokens = torch.randint(0, 1024, (1, 32))
    tokens[0, 10] = 1  # a BOS inside the row
    with torch.no_grad():
        assert torch.equal(rebuilt.forward_hidden(tokens), reference.forward_hidden(tokens))


def test_quant_attn_gate_0_keeps_the_gates_in_fp16_as_2135_does():
    cfg, model = perturbed_model(NUM_LAYERS=2, XSA_LAST_N=2, SPARSE_ATTN_GATE=1, QUANT_ATTN_GATE=0)
    qm = tg.decode_artifact(tg.encode_artifact(tg.quantize_model(cfg, model, tg.quantization_plan(model, cfg), None),
                                               "rans")[0])
    for i in range(2):
        name = f"blocks.{i}.attn.gate_w"
        assert name not in qm.quantized and torch.equal(qm.passthrough[name], model.state_dict()[name].half())


def test_per_module_damping_reaches_each_group_and_falls_back_to_gptq_damp():
    cfg = tg.config_from_env({**{k: str(v) for k, v in TINY_MODEL.items()}, "GPTQ_DAMP_MLP": "0.5",
                              "GPTQ_DAMP_EMBED": "0.001", "QUANT_PASSTHROUGH_NUMEL": "0"})
    model = tg.GPT(cfg)
    plan, state = tg.quantization_plan(model, cfg), model.state_dict()
    assert {group.group for group in plan} == {"attention", "mlp", "embedding"}
    g = torch.Generator().manual_seed(0)
    hessians = {}
    for group in plan:
        X = torch.randn(256, state[group.names[0]].size(1), generator=g)
        hessians[group.hessian] = X.T @ X / 256
    factors = tg.gptq_factors(cfg, plan, hessians)
    damps = {"attention": cfg.GPTQ_DAMP, "mlp": 0.5, "embedding": 0.001}
    for group in plan:
        want = tg.gptq_factor(hessians[group.hessian], damps[group.group]).upper
        assert torch.equal(factors[group.hessian].upper, want), group.hessian
        if group.group != "attention":  # the knob changed the factor
            assert not torch.equal(want, tg.gptq_factor(hessians[group.hessian], cfg.GPTQ_DAMP).upper)


def lqer_problem(**knobs):
    """A model with planned matrices of uneven error, quantized coarsely (RTN int3) with the given LQER knobs."""
    env = {**{k: str(v) for k, v in TINY_MODEL.items()}, "QUANT_PASSTHROUGH_NUMEL": "0", "MATRIX_BITS": "3",
           **{k: str(v) for k, v in knobs.items()}}
    cfg = tg.config_from_env(env)
    torch.manual_seed(0)
    model = tg.GPT(cfg)
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(torch.randn_like(p) * 0.02 * (1 + i % 3))
    return cfg, model, tg.quantize_model(cfg, model, tg.quantization_plan(model, cfg), None)


def test_lqer_corrects_the_largest_errors_on_int2_and_int4_grids():
    cfg, model, with_lqer = lqer_problem(LQER_RANK=4, LQER_TOP_K=3, LQER_GROUP=16)
    _, _, without = lqer_problem(LQER_RANK=0)
    state = model.state_dict()
    matrices = [n for n in without.quantized if without.quantized[n]["group"] != "gate"]
    error = {n: float((state[n] - tg.dequantize(without.quantized[n]["q"], without.quantized[n]["scale"])).norm())
             for n in matrices}
    corrected = sorted(n[:-len(tg.LQER_A)] for n in with_lqer.quantized if n.endswith(tg.LQER_A))
    assert corrected == sorted(sorted(error, key=error.get)[-3:])  # the three largest errors, no other
    template = {n: t.float() for n, t in state.items()}
    fixed, plain = with_lqer.state_dict(template), without.state_dict(template)
    for n in corrected:
        a, b = with_lqer.quantized[n + tg.LQER_A], with_lqer.quantized[n + tg.LQER_B]
        assert a["q"].min() >= -2 and a["q"].max() <= 1 and b["q"].min() >= -8 and b["q"].max() <= 7
        assert a["q"].shape[0] == 1 and b["q"].shape[1] == 16  # one scale for A, one per 16 columns of B
        error, after = (state[n] - plain[n]), (state[n] - fixed[n]).norm()
        best = torch.linalg.svdvals(error)[4:].square().sum().sqrt()  # the unquantized rank-4 optimum
        assert error.norm() - after > 0.5 * (error.norm() - best)  # int2/int4 factors keep most of its gain
    assert all(torch.equal(fixed[n], plain[n]) for n in state if n not in corrected)


def test_lqer_factor_bits_set_the_grids_and_more_bits_correct_more():
    """LQER_A_BITS / LQER_B_BITS: the signed grids -2^(b-1)..2^(b-1)-1 with the largest magnitude half a step
    inside; with int4/int8 factors the corrected matrices land nearer the weights than with int2/int4."""
    cfg, model, coarse = lqer_problem(LQER_RANK=4, LQER_TOP_K=2, LQER_GROUP=16)
    _, _, fine = lqer_problem(LQER_RANK=4, LQER_TOP_K=2, LQER_GROUP=16, LQER_A_BITS=4, LQER_B_BITS=8)
    state = model.state_dict()
    template = {n: t.float() for n, t in state.items()}
    corrected = [n[:-len(tg.LQER_A)] for n in fine.quantized if n.endswith(tg.LQER_A)]
    for n in corrected:
        a, b = fine.quantized[n + tg.LQER_A], fine.quantized[n + tg.LQER_B]
        assert (a["bits"], b["bits"]) == (4, 8)
        for entry, lo, hi in ((a, -8, 7), (b, -128, 127)):  # each row's largest magnitude at an end of the grid
            q = entry["q"].int()
            assert lo <= int(q.min()) and int(q.max()) <= hi and bool((q.abs().amax(1) >= hi).all())
    far = sum(float((state[n] - coarse.state_dict(template)[n]).norm()) for n in corrected)
    near = sum(float((state[n] - fine.state_dict(template)[n]).norm()) for n in corrected)
    assert near < far
    decoded = tg.decode_artifact(tg.encode_artifact(fine, "rans")[0])
    assert all(torch.equal(x, y) for x, y in zip(decoded.state_dict(template).values(),
                                                 fine.state_dict(template).values()))


@pytest.mark.parametrize("compressor", ["lzma", "rans"])
def test_lqer_artifact_round_trip_is_exact_and_refuses_a_stray_factor(compressor):
    cfg, model, qm = lqer_problem(LQER_RANK=2, LQER_TOP_K=2)
    blob, by_group = tg.encode_artifact(qm, compressor)
    assert by_group["lqer"] > 0
    decoded = tg.decode_artifact(blob)
    template = model.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(decoded.state_dict(template).values(), qm.state_dict(template).values()))
    stray = dataclasses.replace(qm, quantized={n: e for n, e in qm.quantized.items() if not n.endswith(tg.LQER_B)})
    with pytest.raises(tg.ArtifactError, match="LQER factor without its matrix or its other factor"):
        tg.decode_artifact(tg.encode_artifact(stray, compressor)[0], "stray.ptz")


def test_awq_lite_takes_the_block_that_matters_and_lowers_the_weighted_error():
    """Inputs 8x larger on columns 128..191: AWQ-lite picks that block, puts it on the int8 grid in the same
    GPTQ solve, and the Hessian-weighted error drops; the other columns keep the int6 grid."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 256, generator=g)
    x[:, 128:192] *= 8
    H, W = x.T @ x / x.size(0), torch.randn(32, 256, generator=g) * 0.05
    factor = tg.gptq_factor(H, 0.01)
    assert tg.awq_blocks(W, factor.diag, 64, 1) == [128]
    mask = tg.awq_mask([128], 64, 256)
    step = tg.quantize_grid(W[:, mask], -127, 127, 127)[1]
    q, scale = tg.quantize_gptq(W, factor, 6, 12.85, 128, (mask, step))
    with_awq = tg.dequantize_entry(dict(q=q, scale=scale, awq=[128], awq_size=64, awq_scale=step))
    without = tg.dequantize(*tg.quantize_gptq(W, factor, 6, 12.85, 128))
    error = lambda Wh: float(torch.trace((W - Wh) @ H @ (W - Wh).T))  # noqa: E731
    assert error(with_awq) < 0.5 * error(without)
    assert q[:, mask].abs().max() > 31 and q[:, ~mask].abs().max() <= 31


def awq_model():
    cfg = tg.config_from_env({k: str(v) for k, v in dict(TINY_MODEL, VOCAB_SIZE=256, MODEL_DIM=128, NUM_HEADS=4,
                                                         NUM_KV_HEADS=2, QUANT_PASSTHROUGH_NUMEL=1024,
                                                         AWQ_TOP_GROUPS=1, AWQ_GROUP_SIZE=32).items()})
    torch.manual_seed(0)
    model = tg.GPT(cfg, "sdpa")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    plan = tg.quantization_plan(model, cfg)
    state = model.state_dict()
    hessians = {}
    for group in plan:
        x = torch.randn(512, state[group.names[0]].size(1))
        hessians[group.hessian] = x.T @ x / 512
    return cfg, model, plan, tg.gptq_factors(cfg, plan, hessians)


@pytest.mark.parametrize("compressor", ["brotli", "rans"])
def test_an_artifact_with_awq_blocks_decodes_to_the_same_weights_bit_for_bit(compressor):
    cfg, model, plan, factors = awq_model()
    qm = tg.quantize_model(cfg, model, plan, factors)
    assert all(e.get("awq") and len(e["awq"]) == 1 for e in qm.quantized.values() if e["group"] != "gate"
               and not e["group"] == "lqer")
    blob, by_group = tg.encode_artifact(qm, compressor)
    decoded = tg.decode_artifact(blob)
    template = model.state_dict()
    for name, want in qm.state_dict(template).items():
        assert torch.equal(decoded.state_dict(template)[name], want), name
    assert sum(by_group.values()) == len(blob)
    no_awq = tg.quantize_model(dataclasses.replace(cfg, AWQ_TOP_GROUPS=0), model, plan, factors)
    assert by_group["scales"] > tg.encode_artifact(no_awq, compressor)[1]["scales"]  # the blocks' row steps


@pytest.mark.parametrize("blocks", [[[999], 32], [[0], 0], [[5], 32]])
def test_awq_blocks_that_do_not_fit_the_matrix_are_refused(blocks):
    cfg, model, plan, factors = awq_model()
    blob = tg.encode_artifact(tg.quantize_model(cfg, model, plan, factors), "brotli")[0]

    def change(header):
        entry = next(t for t in header["tensors"] if len(t) == 6)
        entry[4:] = blocks
    with pytest.raises(tg.ArtifactError, match="AWQ blocks .* do not fit"):
        tg.decode_artifact(with_header(blob, change))
