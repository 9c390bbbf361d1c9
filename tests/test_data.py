"""Shard format, training loader, validation loader and exact byte accounting."""
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

import train_gpt as tg
from train_gpt import ConfigError


def test_shard_round_trip(tmp_path):
    tokens = np.array([1, 0, 65535, 42, 7] * 3, dtype=np.int64)
    path = tmp_path / "fineweb_train_000000.bin"
    tg.write_shard(path, tokens)
    assert path.stat().st_size == 1024 + 2 * tokens.size
    assert np.array_equal(tg.read_shard(path), tokens)
    assert list(tmp_path.iterdir()) == [path]  # the temporary file was renamed away


def test_shard_writer_refuses_ids_beyond_uint16(tmp_path):
    with pytest.raises(ValueError, match="uint16"):
        tg.write_shard(tmp_path / "x.bin", [1, 70000])


def corrupt(path: Path, header_updates=None, size_delta=0) -> Path:
    raw = bytearray(path.read_bytes())
    header = np.frombuffer(raw[:1024], dtype="<i4").copy()
    for index, value in (header_updates or {}).items():
        header[index] = value
    raw[:1024] = header.tobytes()
    raw = raw[:len(raw) + size_delta] if size_delta < 0 else raw + bytes(size_delta)
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize("change, message", [
    (dict(header_updates={0: 12345}), "bad magic 12345"),
    (dict(header_updates={1: 2}), "unsupported shard version 2"),
    (dict(size_delta=-2), "header promises 100 tokens"),
    (dict(size_delta=+6), "header promises 100 tokens"),
    (dict(header_updates={2: 101}), "header promises 101 tokens"),
])
def test_corrupt_shards_are_refused_with_the_file_named(tmp_path, change, message):
    path = tmp_path / "fineweb_val_000000.bin"
    tg.write_shard(path, np.arange(100))
    corrupt(path, **change)
    with pytest.raises(ConfigError) as err:
        tg.read_shard(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_truncated_header(tmp_path):
    path = tmp_path / "fineweb_val_000000.bin"
    path.write_bytes(b"\0" * 100)
    with pytest.raises(ConfigError, match="shorter than the 1024-byte shard header"):
        tg.read_shard(path)


def test_a_folder_named_like_a_shard_is_refused_by_name(tmp_path):
    tg.write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(100))
    folder = tmp_path / "fineweb_train_000001.bin"
    folder.mkdir()
    with pytest.raises(ConfigError, match=f"{folder} is named like a shard but is not a file"):
        tg.find_shards(tmp_path, "train")
    with pytest.raises(ConfigError, match=f"{folder}: not a shard file"):
        tg.shard_token_count(folder)


def test_data_path_with_glob_characters_is_taken_literally(tmp_path):
    data = tmp_path / "runs[1]*?"
    data.mkdir()
    tg.write_shard(data / "fineweb_val_000000.bin", [1, 2, 3])
    assert tg.find_shards(data, "val") == [data / "fineweb_val_000000.bin"]
    assert tg.load_validation_tokens(data).tolist() == [1, 2, 3]


def test_missing_shards_explain_how_to_get_data(tmp_path):
    with pytest.raises(ConfigError, match="no fineweb_train_\\*.bin shards in .*cached_challenge_fineweb.py"):
        tg.find_shards(tmp_path, "train")


# ---------------------------------------------------------------------------- training loader


def make_shards(folder: Path, sizes) -> list[Path]:
    """Shards whose tokens encode (shard, position) so windows can be traced back."""
    paths = []
    for i, size in enumerate(sizes):
        paths.append(folder / f"fineweb_train_{i:06d}.bin")
        tg.write_shard(paths[-1], (np.arange(size) + 10000 * i) % 65536)
    return paths


def test_windows_are_contiguous_slices_of_the_shards(tmp_path):
    files = make_shards(tmp_path, [3000, 1700])
    batch = tg.TrainLoader(files, 32, seed=1).next_batch(64, 0, 1)
    assert batch.shape == (64, 33)
    assert torch.all(batch[:, 1:] - batch[:, :-1] == 1)  # consecutive tokens of one shard


def test_a_shorter_stage_cuts_the_same_windows_into_rows(tmp_path):
    """Progressive context: a stage at a third of the loader's window reads the same tokens as the full
    window, as three rows whose targets continue one another, so the batch's token count is fixed."""
    files = make_shards(tmp_path, [3000, 1700])
    whole = tg.TrainLoader(files, 48, seed=1).next_batch(8, 0, 1)
    split = tg.TrainLoader(files, 48, seed=1).next_batch(8, 0, 1, split_len=16)
    assert split.shape == (24, 17)
    assert torch.equal(split[:, :-1].reshape(8, 48), whole[:, :-1])
    assert torch.equal(split[:, 1:].reshape(8, 48), whole[:, 1:])


def test_world_size_only_splits_the_global_batch(tmp_path):
    files = make_shards(tmp_path, [3000, 1700, 900])
    single = tg.TrainLoader(files, 16, seed=3)
    ranks = [tg.TrainLoader(files, 16, seed=3) for _ in range(4)]
    for _ in range(12):  # several epochs' worth, so wrapping is covered
        whole = single.next_batch(32, 0, 1)
        parts = [loader.next_batch(32, r, 4) for r, loader in enumerate(ranks)]
        assert torch.equal(torch.cat(parts), whole)
        starts = [set(p[:, 0].tolist()) for p in parts]
        assert all(not (a & b) for i, a in enumerate(starts) for b in starts[i + 1:])  # disjoint ranks


def record_packed_spans(shards: list[np.ndarray], row_len: int, steps: int, spans_per_step: int, bos: int) -> list:
    """The 1.0611 record's DocumentPackingLoader on 8 GPUs (one micro-batch each), written out plainly: each shard
    from its first BOS, a step takes 8 consecutive spans of row_len + 1 (rank r the r-th), skipping a shard's rest
    where they do not fit and coming back to the first shard after the last."""
    shard, cursor, out = 0, int(np.flatnonzero(shards[0] == bos)[0]), []
    for _ in range(steps):
        need = spans_per_step * (row_len + 1)
        while cursor + need > len(shards[shard]):
            shard = (shard + 1) % len(shards)
            cursor = int(np.flatnonzero(shards[shard] == bos)[0])
        out.append([shards[shard][cursor + r * (row_len + 1):cursor + (r + 1) * (row_len + 1)].tolist()
                    for r in range(spans_per_step)])
        cursor += need
    return out


def test_the_packed_loader_reads_the_records_spans_for_any_world_size(tmp_path):
    g = np.random.default_rng(0)
    shards = []
    for i, size in enumerate([700, 460, 530]):
        tokens = g.integers(2, 500, size)
        tokens[[5 + i, 40, 300]] = 1  # the first BOS a few tokens in: what comes before it is never read
        shards.append(tokens)
    folder = tmp_path / "data"
    folder.mkdir()
    files = [folder / f"fineweb_train_{i:06d}.bin" for i in range(3)]
    for f, tokens in zip(files, shards):
        tg.write_shard(f, tokens)
    want = record_packed_spans(shards, row_len=15, steps=9, spans_per_step=8, bos=1)  # wraps around twice
    for world in (1, 2, 8):
        loaders = [tg.PackedLoader(files, 15, bos_id=1, vocab_size=500) for _ in range(world)]
        for step in range(9):
            rows = torch.cat([loader.next_batch(8, rank, world) for rank, loader in enumerate(loaders)])
            assert rows.tolist() == want[step], (world, step)


def test_a_packed_step_that_fits_no_shard_names_the_fix(tmp_path):
    files = make_shards(tmp_path, [300])
    with pytest.raises(ConfigError, match="no training shard holds 400 tokens .* TRAIN_LOADER=windows"):
        tg.PackedLoader(files, 49, bos_id=1).next_batch(8, 0, 1)


def test_seed_changes_the_data_order_and_is_reproducible(tmp_path):
    files = make_shards(tmp_path, [5000])
    first = lambda seed: tg.TrainLoader(files, 16, seed).next_batch(16, 0, 1)
    assert torch.equal(first(1), first(1))
    assert not torch.equal(first(1), first(2))


def test_an_epoch_covers_every_window_once(tmp_path):
    files = make_shards(tmp_path, [16 * 17 * 5])
    loader = tg.TrainLoader(files, 16, seed=0)
    count = loader.window_start.size
    starts = loader.next_batch(count, 0, 1)[:, 0].tolist()
    assert len(set(starts)) == count


def test_shards_too_small_for_a_window(tmp_path):
    files = make_shards(tmp_path, [10])
    with pytest.raises(ConfigError, match="no window of TRAIN_SEQ_LEN\\+1=33 tokens"):
        tg.TrainLoader(files, 32, seed=0)


# ---------------------------------------------------------------------------- byte accounting


def test_byte_count_equals_utf8_length_of_decoded_validation_text(sample):
    """Summed per-token bytes over every validation target equal the UTF-8 length of the text the
    tokens decode to (SentencePiece-normalized), document by document and in total."""
    sp = spm.SentencePieceProcessor(model_file=str(sample["tokenizer_model"]))
    tables = tg.byte_tables(sp)
    tokens = torch.from_numpy(np.concatenate([np.asarray(tg.read_shard(p)) for p in sample["val"]["shards"]]).astype(np.int64))
    per_target = tg.target_bytes(tables, tokens[:-1], tokens[1:])
    bos = torch.nonzero(tokens == sp.bos_id()).flatten().tolist() + [tokens.numel()]
    assert bos[0] == 0
    for a, b in zip(bos[:-1], bos[1:]):
        doc_bytes = len(sp.decode(tokens[a + 1:b].tolist()).encode("utf-8"))
        assert int(per_target[a:b - 1].sum()) == doc_bytes
    total = sum(len(sp.decode(tokens[a + 1:b].tolist()).encode("utf-8")) for a, b in zip(bos[:-1], bos[1:]))
    assert int(per_target.sum()) == total > 200_000


def test_byte_tables_on_hand_picked_pieces(sample):
    sp = spm.SentencePieceProcessor(model_file=str(sample["tokenizer_model"]))
    base, space, boundary = tg.byte_tables(sp)
    space_id = sp.piece_to_id("\u2581")
    assert (base[space_id], bool(space[space_id])) == (0, True)
    assert all(bool(boundary[i]) and base[i] == 0 for i in range(4))
    byte_e9 = sp.piece_to_id("<0xE9>")
    assert base[byte_e9] == 1 and not space[byte_e9]
    ids = sp.encode("caf\u00e9 \u00e9t\u00e9 \u20ac5")  # accented letters, a currency sign, a digit
    inputs = torch.tensor([sp.bos_id()] + ids[:-1])
    assert int(tg.target_bytes((base, space, boundary), inputs,
                               torch.tensor(ids)).sum()) == len("caf\u00e9 \u00e9t\u00e9 \u20ac5".encode())


def test_validation_stream_keeps_every_token(tmp_path):
    tg.write_shard(tmp_path / "fineweb_val_000000.bin", [1, 2, 3])
    tg.write_shard(tmp_path / "fineweb_val_000001.bin", [4, 5])
    assert tg.load_validation_tokens(tmp_path).tolist() == [1, 2, 3, 4, 5]


def test_training_ids_beyond_the_vocabulary_stop_the_run_naming_the_shard(tmp_path, monkeypatch):
    """At start, the first ids of every shard; while training, every batch (an id past the sample)."""
    good, bad_early, bad_late = tmp_path / "a.bin", tmp_path / "b.bin", tmp_path / "c.bin"
    tg.write_shard(good, np.arange(4000) % 1000)
    tg.write_shard(bad_early, np.r_[np.arange(100), 1500, np.arange(100)])
    with pytest.raises(ConfigError, match=f"{bad_early}: token id 1500 >= VOCAB_SIZE=1024"):
        tg.check_training_shards([good, bad_early], 1024)
    late = np.arange(4000) % 1000
    late[-50] = 2000
    tg.write_shard(bad_late, late)
    monkeypatch.setattr(tg, "SHARD_SAMPLE_TOKENS", 1000)
    tg.check_training_shards([bad_late], 1024)  # past the sampled start: only the loader can see it
    loader = tg.TrainLoader([bad_late], 63, seed=0, vocab_size=1024)
    with pytest.raises(ConfigError, match=f"{bad_late}: token id 2000 >= VOCAB_SIZE=1024"):
        loader.next_batch(loader.window_start.size, 0, 1)  # the whole epoch: some window holds the bad id
