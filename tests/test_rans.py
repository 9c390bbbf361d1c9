"""COMPRESSOR=rans: the context-modelled rANS coder of the quantized values, bit-exact and near its ideal length."""
import math

import numpy as np
import pytest
import torch

import train_gpt as tg


def random_coding_problem(n, contexts, seed=0):
    """Symbols drawn from a different skewed distribution per context, and their exact tables."""
    rng = np.random.default_rng(seed)
    ctx = rng.integers(0, contexts, n).astype(np.uint16)
    spread = np.geomspace(0.5, 20, contexts)
    values = np.clip(np.rint(rng.laplace(0, spread[ctx])), -127, 127).astype(np.int64) + 128
    symbols = values.astype(np.uint8)
    freq = tg.rans_frequencies(tg.log_codes(tg.context_counts(ctx, symbols, contexts)))
    return symbols, ctx, freq


@pytest.mark.parametrize("n, steps", [(0, tg.RANS_STEPS), (1, tg.RANS_STEPS), (7, tg.RANS_STEPS), (1000, tg.RANS_STEPS),
                                      (1000, 8), (2000, 9)])
def test_rans_round_trip_is_exact_for_any_length_and_lane_count(n, steps, monkeypatch):
    """One lane per value, the 64-lane minimum with a partial last step, and (few values per lane) more lanes."""
    monkeypatch.setattr(tg, "RANS_STEPS", steps)
    symbols, ctx, freq = random_coding_problem(n, 5)
    stream = tg.rans_encode(symbols, ctx, freq)
    assert np.array_equal(tg.rans_decode(stream, ctx, freq), symbols)


def test_rans_is_within_a_few_bytes_per_lane_of_the_ideal_code_length():
    symbols, ctx, freq = random_coding_problem(200_000, 6)
    ideal_bits = float((tg.RANS_PROB_BITS - np.log2(freq[ctx, symbols])).sum())
    stream = tg.rans_encode(symbols, ctx, freq)
    assert ideal_bits / 8 <= len(stream) <= ideal_bits / 8 * 1.0005 + 12 * tg.rans_lanes(symbols.size)


def test_a_context_with_one_symbol_costs_nothing_and_round_trips():
    ctx = np.zeros(1000, np.uint16)
    symbols = np.full(1000, 131, np.uint8)
    freq = tg.rans_frequencies(tg.log_codes(tg.context_counts(ctx, symbols, 1)))
    assert freq[0, 131] == 1 << tg.RANS_PROB_BITS
    stream = tg.rans_encode(symbols, ctx, freq)
    assert len(stream) == 8 * tg.rans_lanes(1000)  # the lanes' final states, and no word
    assert np.array_equal(tg.rans_decode(stream, ctx, freq), symbols)


def test_frequency_tables_sum_exactly_and_keep_every_symbol_that_occurs():
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 256, (40, 256)).astype(np.uint8)
    codes[0] = 0           # an unused context
    codes[1] = 255         # 256 equal symbols
    codes[2, :] = 1        # every symbol at the smallest code...
    codes[2, 7] = 255      # ...beside one that takes almost all
    freq = tg.rans_frequencies(codes)
    assert (freq[0] == 0).all() and (freq[1] == 256).all()
    assert (freq[1:].sum(1) == 1 << tg.RANS_PROB_BITS).all()
    assert ((freq > 0) == (codes > 0)).all()


def test_a_corrupt_or_truncated_stream_is_refused():
    symbols, ctx, freq = random_coding_problem(5000, 3)
    stream = bytearray(tg.rans_encode(symbols, ctx, freq))
    with pytest.raises(ValueError):
        tg.rans_decode(bytes(stream[:-4]), ctx, freq)
    stream[20] ^= 0x40  # a lane's final state
    with pytest.raises(ValueError, match="does not end where its values do|ends before its last value"):
        tg.rans_decode(bytes(stream), ctx, freq)


def column_scaled_model(seed=0):
    """Quantized matrices whose columns differ in spread, as trained input channels do, sharing roles over layers."""
    rng = np.random.default_rng(seed)
    quantized = {}
    for layer in range(3):
        for role, shape in (("mlp.fc.weight", (256, 96)), ("attn.c_k.weight", (64, 96)), ("attn.gate_w", (4, 12)),
                            ("attn.proj.weight", (32, 96))):
            column_spread = 0.0 if role == "attn.proj.weight" else 0.6  # proj: no column holds more than another
            spread = 3.0 * np.exp(rng.normal(0, column_spread, shape[1]))
            q = np.clip(np.rint(rng.laplace(0, spread, shape)), -31, 31).astype(np.int8)
            name = f"blocks.{layer}.{role}"
            quantized[name] = dict(q=torch.from_numpy(q), scale=torch.ones(shape[0]).half(), bits=6,
                                   group=tg.tensor_group(name))
    model_config = tg.ModelConfig(NUM_LAYERS=3, MLP_MULT=3.5, MODEL_DIM=96, NUM_HEADS=3, NUM_KV_HEADS=1, ROPE_DIMS=8,
                                  LOOP_START=1, LOOP_END=2)
    return tg.QuantizedModel(quantized, {"gain": torch.randn(5).half()}, model_config)


def order0_bytes(arrays) -> float:
    """What any coder that sees values alone, with their own histogram, needs at least."""
    values = np.concatenate([a.ravel() for a in arrays]).astype(np.int64) + 128
    p = np.bincount(values)[np.bincount(values) > 0] / values.size
    return -float((p * np.log2(p)).sum()) * values.size / 8


def test_rans_beats_order0_entropy_by_using_column_contexts():
    qm = column_scaled_model()
    side, stream, shares = tg.rans_encode_quantized(qm, sorted(qm.quantized))
    by_role = {}
    for name, e in qm.quantized.items():
        by_role.setdefault(tg.coder_role(name), []).append(e["q"].numpy())
    entropy = sum(order0_bytes(arrays) for arrays in by_role.values())
    coded = len(stream) + len(tg.compress(side, "rans"))
    assert coded < 0.99 * entropy
    assert math.isclose(sum(shares.values()) / 8, len(stream), rel_tol=0.01)


def test_a_tensor_whose_buckets_cost_more_than_they_save_is_coded_without_them():
    qm = column_scaled_model()
    names = sorted(qm.quantized)
    side, _, _ = tg.rans_encode_quantized(qm, names)
    roles = {tg.coder_role(n) for n in names}
    _, at = tg.rans_tables_from(side, len(roles) * tg.RANS_CONTEXTS)
    flags = {}
    for name in names:  # per tensor: a flag, then its buckets if the flag is 1
        flags[name] = side[at]
        at += 1 + (qm.quantized[name]["q"].shape[1] if side[at] else 0)
    assert at == len(side)
    assert all(flags[n] == 1 for n in names if "mlp.fc" in n)  # 256 rows per column: buckets pay
    assert all(flags[n] == 0 for n in names if "attn.proj" in n)  # columns alike: buckets would only cost
    assert all(flags[n] == 0 for n in names if "gate_w" in n)  # 4 rows: never


def test_rans_artifact_is_smaller_than_brotli_and_lzma_and_refuses_corruption():
    qm = column_scaled_model()
    blobs = {c: tg.encode_artifact(qm, c) for c in ("brotli", "lzma", "rans")}
    blob, by_group = blobs["rans"]
    assert len(blob) < min(len(blobs["brotli"][0]), len(blobs["lzma"][0]))
    assert sum(by_group.values()) == len(blob) and by_group["mlp"] > by_group["attention"] > by_group["gate"] > 0
    assert by_group["header"] == tg.ARTIFACT_PREFIX.size + tg.ARTIFACT_PREFIX.unpack_from(blob)[2]
    back = tg.decode_artifact(blob)
    assert all(torch.equal(back.quantized[n]["q"], e["q"]) for n, e in qm.quantized.items())
    corrupt = bytearray(blob)
    corrupt[len(blob) // 2] ^= 0x10
    with pytest.raises(tg.ArtifactError, match="corrupt.ptz: stream"):
        tg.decode_artifact(bytes(corrupt), "corrupt.ptz")


def test_an_artifact_from_a_coder_this_version_lacks_is_refused_by_name(monkeypatch):
    blob = bytearray(tg.encode_artifact(column_scaled_model(), "brotli")[0])
    monkeypatch.setitem(__import__("sys").modules, "brotli", None)  # import brotli now raises ImportError
    with pytest.raises(tg.ArtifactError, match="a.ptz: written with brotli, which needs the brotli package to read: "
                                               "`pip install brotli`"):
        tg.decode_artifact(bytes(blob), "a.ptz")
    blob[4] = len(tg.COMPRESSORS)
    with pytest.raises(tg.ArtifactError, match=r"b.ptz: written with coder 3, .*\(it has 0 brotli, 1 lzma, 2 rans\)"):
        tg.decode_artifact(bytes(blob), "b.ptz")


def test_rans_codes_a_model_with_nothing_quantized_or_nothing_but_zeros():
    qm = column_scaled_model()
    nothing = tg.QuantizedModel({}, qm.passthrough, qm.model_config)
    assert torch.equal(tg.decode_artifact(tg.encode_artifact(nothing, "rans")[0]).passthrough["gain"],
                       qm.passthrough["gain"])
    zeros = tg.QuantizedModel({n: dict(e, q=torch.zeros_like(e["q"])) for n, e in qm.quantized.items()},
                              qm.passthrough, qm.model_config)
    blob, by_group = tg.encode_artifact(zeros, "rans")
    assert all(torch.equal(e["q"], zeros.quantized[n]["q"]) for n, e in tg.decode_artifact(blob).quantized.items())
    # every value is free, yet the stream's bytes still land in the quantized groups, not in the header's
    assert by_group["header"] == tg.ARTIFACT_PREFIX.size + tg.ARTIFACT_PREFIX.unpack_from(blob)[2]
    assert min(by_group[g] for g in ("mlp", "attention", "gate")) > 0


def test_a_header_whose_tensor_list_does_not_read_is_refused_as_corrupt():
    from test_quantization import with_header
    blob = tg.encode_artifact(column_scaled_model(), "rans")[0]
    for change in (lambda h: h.pop("tensors"), lambda h: h.update(tensors=7), lambda h: h["tensors"].append([])):
        with pytest.raises(tg.ArtifactError, match="x.ptz: header's tensor list does not read .*truncated or corrupt"):
            tg.decode_artifact(with_header(blob, change), "x.ptz")
