"""tools/compress_report.py: every byte of an artifact reported in its group, each coder's stream decoded back,
order-0 entropy as defined, and the groups a decoded artifact carries equal to the ones quantization gave."""
import sys
from pathlib import Path

import pytest
import torch

import train_gpt as tg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import compress_report  # noqa: E402


@pytest.fixture(scope="module")
def quantized():
    """A small model with every kind of tensor: GPTQ-free RTN matrices, int7 embedding, int8 sparse gates, LQER."""
    cfg = tg.config_from_env(dict(VOCAB_SIZE="256", NUM_LAYERS="2", MODEL_DIM="64", NUM_HEADS="2", NUM_KV_HEADS="1",
                                  ROPE_DIMS="8", XSA_LAST_N="2", NUM_LOOPS="0", PARALLEL_RESIDUAL_START="1",
                                  QUANT_PASSTHROUGH_NUMEL="1024", LQER_TOP_K="2", QUANT_ATTN_GATE="1"))
    torch.manual_seed(0)
    model = tg.GPT(cfg, "sdpa")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return tg.quantize_model(cfg, model, tg.quantization_plan(model, cfg), None)


def test_decoded_tensors_carry_the_group_quantization_gave_them(quantized):
    decoded = tg.decode_artifact(tg.encode_artifact(quantized, "brotli")[0])
    assert {n: e["group"] for n, e in decoded.quantized.items()} == \
        {n: e["group"] for n, e in quantized.quantized.items()}
    assert {e["group"] for e in decoded.quantized.values()} == {"embedding", "attention", "mlp", "gate", "lqer"}


def test_every_byte_is_in_one_group_and_each_coder_matches_its_own_compressor(quantized):
    _, by_group = tg.encode_artifact(quantized, "brotli")
    r = compress_report.report(quantized, by_group, with_lrzip=False)
    rows = r["groups"]
    q_bytes = sum(e["q"].numel() for e in quantized.quantized.values())
    assert sum(rows[g]["raw_bytes"] for g in ("embedding", "attention", "mlp", "gate", "lqer")) == q_bytes
    assert rows["scales"]["raw_bytes"] == 2 * sum(e["scale"].numel() for e in quantized.quantized.values())
    assert rows["passthrough"]["raw_bytes"] == 2 * sum(t.numel() for t in quantized.passthrough.values())
    streams = compress_report.group_streams(quantized)
    for group, (data, _, names) in streams.items():
        assert rows[group]["coded"]["brotli"] == len(tg.compress(data, "brotli"))
        assert rows[group]["coded"]["lzma"] == len(tg.compress(data, "lzma"))
        assert rows[group]["artifact_bytes"] == by_group[group]
        assert bool(names) == (group not in ("scales", "passthrough"))
    assert r["coders"] == ["brotli", "lzma", "rans"] and not r["lrzip"]


def test_the_rans_column_is_what_the_artifact_spends_on_the_group(quantized):
    """Roles never cross groups, so a group coded alone gets the same tables and buckets as in the artifact; it
    pays only its own framing, LZMA overhead and lane states, so the column is at or a little above the artifact's
    figure for the group."""
    _, by_group = tg.encode_artifact(quantized, "rans")
    rows = compress_report.report(quantized, by_group, with_lrzip=False)["groups"]
    for group in ("scales", "passthrough"):
        assert rows[group]["coded"]["rans"] == by_group[group]
    quantized_groups = ("embedding", "attention", "mlp", "gate", "lqer")
    alone = sum(rows[g]["coded"]["rans"] for g in quantized_groups)
    together = sum(by_group[g] for g in quantized_groups)
    framing = sum(4 + 80 + 8 * tg.rans_lanes(rows[g]["values"]) for g in quantized_groups)  # length, LZMA, lanes
    assert together <= alone <= together + framing


def test_the_scales_stream_holds_awq_blocks_row_steps_as_the_artifact_does():
    from test_quantization import awq_model
    cfg, model, plan, factors = awq_model()
    qm = tg.quantize_model(cfg, model, plan, factors)
    blob = tg.encode_artifact(qm, "brotli")[0]
    header_len = tg.ARTIFACT_PREFIX.unpack_from(blob)[2]
    start = tg.ARTIFACT_PREFIX.size
    header = tg.json.loads(tg.decompress(blob[start:start + header_len], "brotli"))
    scales, _, _ = compress_report.group_streams(qm)["scales"]
    assert len(scales) == header["streams"][-2][1]
    assert any(e.get("awq") for e in qm.quantized.values())


def test_order0_entropy_of_known_streams():
    assert compress_report.order0_entropy_bytes(bytes([0, 1]) * 50) == pytest.approx(100 / 8)
    assert compress_report.order0_entropy_bytes(bytes(64)) == 0.0
    assert compress_report.order0_entropy_bytes(bytes(range(256)) * 4) == pytest.approx(1024.0)


def test_a_coder_that_does_not_give_back_its_input_stops_the_report(quantized, monkeypatch):
    monkeypatch.setattr(compress_report, "coders",
                        lambda qm, with_lrzip=True: {"broken": (lambda d, _: d, lambda d, _: d[1:])})
    with pytest.raises(RuntimeError, match="broken does not give back the embedding stream"):
        compress_report.report(quantized, {}, with_lrzip=False)


def test_without_the_brotli_package_the_report_leaves_brotli_out_and_says_so(quantized, monkeypatch):
    monkeypatch.setitem(sys.modules, "brotli", None)  # import brotli now raises ImportError
    _, by_group = tg.encode_artifact(quantized, "rans")
    r = compress_report.report(quantized, by_group, with_lrzip=False)
    assert r["coders"] == ["lzma", "rans"]
    assert "brotli: not installed, left out (pip install brotli to compare it)" in compress_report.table(r)


def test_the_command_prints_the_table_and_says_when_lrzip_is_missing(quantized, tmp_path, monkeypatch, capsys):
    path = tmp_path / "model.ptz"
    path.write_bytes(tg.encode_artifact(quantized, "brotli")[0])
    monkeypatch.setattr(compress_report.shutil, "which", lambda _: None)
    assert compress_report.main([str(path), "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "| mlp |" in out and "lrzip: not on PATH" in out and "re-encoding" not in out
    assert (tmp_path / "r.json").is_file()
