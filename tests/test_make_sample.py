"""Tests for data/make_sample.py: the embedded sample corpus and JSONL corpora in shard layout."""
import json
import lzma
import random
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from conftest import make_sample
from train_gpt import read_shard

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
ENWIKI_TRAIN = SHARED_DATA / "enwiki_2015.part1of4.jsonl.xz"
ENWIKI_VAL = SHARED_DATA / "enwiki_2015.part4of4.jsonl.xz"


BOS = 1


# ------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------

def split_tokens(summary, split) -> np.ndarray:
    return np.concatenate([np.asarray(read_shard(p)) for p in summary[split]["shards"]])


def split_at_bos(tokens) -> list[list[int]]:
    """Documents' ids (without BOS); the stream must start with BOS."""
    assert tokens.size and tokens[0] == BOS
    starts = np.flatnonzero(tokens == BOS)
    return [tokens[a + 1:b].tolist() for a, b in zip(starts, [*starts[1:], tokens.size])]


def normalized(sp, text) -> str:
    """What decode(encode(text)) gives: nmt_nfkc normalization, whose output spells spaces as ▁
    (it also turns newlines into spaces and collapses runs of whitespace)."""
    return sp.normalize(text).replace("\u2581", " ")


def load_sp(summary):
    return spm.SentencePieceProcessor(model_file=str(summary["tokenizer_model"]))


def write_jsonl(path: Path, records) -> Path:
    lines = "".join(json.dumps(r) + "\n" for r in records)
    if path.suffix == ".xz":
        with lzma.open(path, "wt", encoding="utf-8") as f:
            f.write(lines)
    else:
        path.write_text(lines, encoding="utf-8")
    return path


WORDS = ("the of and to in is was for on that with as by at from his an were are which this be "
         "river city music game team year first history world school north water light").split()


def fake_docs(n: int, seed: int, extra: str = "") -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 120))) + f". {extra} {i}\nNext line."
            for i in range(n)]


def built_files(summary) -> dict:
    files = [summary["tokenizer_model"], summary["tokenizer_vocab"],
             *summary["train"]["shards"], *summary["val"]["shards"]]
    return {p.name: p.read_bytes() for p in files}


# ------------------------------------------------------------------------------------------
# The default sample (built once per session; a build takes about 5 s)
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def sp(sample):
    return load_sp(sample)


@pytest.fixture(scope="session")
def sample_documents():
    return make_sample.sample_documents()  # scanning the stdlib takes ~3 s: do it once


@pytest.fixture(scope="session")
def sample_texts(sample_documents):
    return make_sample.split_documents(sample_documents)


def test_layout_and_speed(sample, tmp_path_factory):
    out = sample["dataset_dir"].parent.parent
    assert sample["dataset_dir"] == out / "datasets" / "sample_sp1024"
    assert [p.name for p in sample["train"]["shards"]] == ["fineweb_train_000000.bin"]
    assert [p.name for p in sample["val"]["shards"]] == ["fineweb_val_000000.bin"]
    assert sample["tokenizer_model"] == out / "tokenizers" / "sample_1024_bpe.model"
    assert sample["tokenizer_vocab"].is_file()
    assert sample["seconds"] < 60, f"default build took {sample['seconds']} s"
    assert make_sample.DEFAULT_OUT == REPO_ROOT / "data"


def test_two_builds_are_byte_identical(sample, tmp_path):
    again = make_sample.build(out=tmp_path, verbose=False)
    first, second = built_files(sample), built_files(again)
    assert first.keys() == second.keys()
    for name in first:
        assert first[name] == second[name], f"{name} differs between two builds"


@pytest.mark.parametrize("split", ["train", "val"])
def test_shards_hold_one_bos_per_document(sample, split):
    tokens = split_tokens(sample, split)
    assert tokens.size == sample[split]["tokens"]
    assert tokens[0] == BOS
    assert int((tokens == BOS).sum()) == sample[split]["docs"]
    assert int(tokens.max()) < 1024


def test_corpus_sizes(sample):
    train, val = sample["train"], sample["val"]
    assert val["tokens"] >= 100_000, "validation split should hold at least ~100k tokens"
    assert 0.08 < val["docs"] / (train["docs"] + val["docs"]) < 0.2
    assert train["bytes"] > 1_000_000 and train["tokens"] > 500_000
    # The tokenizer saw the train documents only.
    assert sample["tokenizer_train"] == {"docs": train["docs"], "bytes": train["bytes"]}


def test_tokenizer_settings(sp):
    assert sp.vocab_size() == 1024
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]
    assert sp.piece_to_id("\u2581") != sp.unk_id()
    byte_ids = [sp.piece_to_id(f"<0x{b:02X}>") for b in range(256)]
    assert all(sp.is_byte(i) for i in byte_ids)
    assert [sp.id_to_piece(i) for i in sp.encode("2024")] == ["2", "0", "2", "4"]  # split_digits
    assert not sp.id_to_piece(sp.encode("hello")[0]).startswith("\u2581")  # no dummy prefix
    rare = "snowman \u2603 emoji \U0001F600"
    assert sp.decode(sp.encode(rare)) == rare  # byte fallback: nothing becomes <unk>
    assert sp.unk_id() not in sp.encode(rare)


def test_default_corpus_sources(sample_documents, sample_texts):
    documents = sample_documents
    keys = [key for key, _ in documents]
    assert len(keys) == len(set(keys))
    assert any(k.startswith("pydoc_topics:") for k in keys)
    assert "stdlib:json/__init__.py" in keys
    assert not any("/test/" in k or "/tests/" in k or "idlelib/" in k or "lib2to3/" in k for k in keys)
    assert all(len(text) >= make_sample.MIN_DOC_CHARS for _, text in documents)
    train, val = sample_texts
    assert len(train) + len(val) == len(documents)


def test_module_docstrings_in_source_order():
    source = '"""Module doc."""\nclass A:\n    """Class doc."""\n    def f(self):\n        """Method\n        doc."""\n' \
             'def g():\n    pass\nasync def h():\n    """Async doc."""\n'
    assert make_sample.module_docstrings(source) == "Module doc.\n\nClass doc.\n\nMethod\ndoc.\n\nAsync doc."
    assert make_sample.module_docstrings("x = 1\n") == ""


def test_split_is_stable_and_by_document():
    # sha256 of the key, never the per-process randomized hash(): pinned answers hold everywhere.
    assert [i for i in range(40) if make_sample.is_validation(f"doc{i}", 0.17)] == [8, 14, 16, 25, 26, 37, 38]
    docs = [(f"doc{i}", f"text {i}") for i in range(1000)]
    train, val = make_sample.split_documents(docs, 0.1)
    assert len(train) + len(val) == 1000 and 60 < len(val) < 140
    assert not set(train) & set(val)


def test_train_and_val_documents_are_disjoint(sample, sp, sample_texts):
    train_texts, val_texts = sample_texts
    assert not set(train_texts) & set(val_texts)
    decoded = {s: [sp.decode(ids) for ids in split_at_bos(split_tokens(sample, s))] for s in ("train", "val")}
    assert len(decoded["train"]) == len(train_texts) and len(decoded["val"]) == len(val_texts)
    assert not set(decoded["train"]) & set(decoded["val"])


def test_val_documents_decode_to_normalized_text(sample, sp, sample_texts):
    _, val_texts = sample_texts
    documents = split_at_bos(split_tokens(sample, "val"))
    assert len(documents) == len(val_texts)
    for ids, text in zip(documents, val_texts):
        assert sp.decode(ids) == normalized(sp, text)


# ------------------------------------------------------------------------------------------
# JSONL mode
# ------------------------------------------------------------------------------------------

def test_jsonl_plain_and_xz(tmp_path):
    train_a = write_jsonl(tmp_path / "a.jsonl", [{"text": t, "title": "x"} for t in fake_docs(30, 1)])
    train_b = write_jsonl(tmp_path / "b.jsonl.xz", [{"text": t} for t in fake_docs(20, 2)])
    # "Ж" appears only in validation, so a tokenizer trained on train text has no piece for it.
    val = write_jsonl(tmp_path / "v.jsonl.xz", [{"text": t} for t in fake_docs(10, 3, extra="ЖЖЖ")])
    s = make_sample.build(out=tmp_path / "out", name="toy_sp", tokenizer_name="toy_bpe", vocab_size=400,
                          jsonl=[train_a, train_b], val_jsonl=[val], verbose=False)
    assert s["dataset_dir"] == tmp_path / "out" / "datasets" / "toy_sp"
    assert s["tokenizer_model"] == tmp_path / "out" / "tokenizers" / "toy_bpe.model"
    assert (s["train"]["docs"], s["val"]["docs"]) == (50, 10)
    sp = load_sp(s)
    assert sp.piece_to_id("Ж") == sp.unk_id()
    expected = {"train": fake_docs(30, 1) + fake_docs(20, 2), "val": fake_docs(10, 3, extra="ЖЖЖ")}
    for split, texts in expected.items():
        documents = split_at_bos(split_tokens(s, split))
        assert [sp.decode(ids) for ids in documents] == [normalized(sp, t) for t in texts]


def test_jsonl_limits_and_shard_rollover(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in fake_docs(40, 4)])
    val = write_jsonl(tmp_path / "v.jsonl", [{"text": t} for t in fake_docs(10, 5)])
    out = tmp_path / "out"
    s = make_sample.build(out=out, jsonl=[train], val_jsonl=[val], vocab_size=300, shard_tokens=1000,
                          max_train_docs=25, max_val_docs=4, verbose=False)
    assert (s["train"]["docs"], s["val"]["docs"]) == (25, 4)
    shards = s["train"]["shards"]
    assert len(shards) > 1
    assert [p.name for p in shards] == [f"fineweb_train_{i:06d}.bin" for i in range(len(shards))]
    assert all(read_shard(p).size == 1000 for p in shards[:-1]) and 0 < read_shard(shards[-1]).size <= 1000
    assert int((split_tokens(s, "train") == BOS).sum()) == 25
    # A rebuild with one shard per split leaves no stale shards from the larger build behind.
    s2 = make_sample.build(out=out, jsonl=[train], val_jsonl=[val], vocab_size=300, verbose=False)
    assert sorted(p.name for p in s2["dataset_dir"].iterdir()) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin"]


def test_tokenizer_trains_on_leading_docs_only(tmp_path):
    # Documents after the first 10 carry "Ω"; the tokenizer never sees them.
    texts = fake_docs(10, 6) + fake_docs(10, 7, extra="ΩΩΩ")
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    val = write_jsonl(tmp_path / "v.jsonl", [{"text": t} for t in fake_docs(3, 8)])
    s = make_sample.build(out=tmp_path / "out", jsonl=[train], val_jsonl=[val], vocab_size=300,
                          tokenizer_train_docs=10, verbose=False)
    assert s["tokenizer_train"]["docs"] == 10 and s["train"]["docs"] == 20
    sp = load_sp(s)
    assert sp.piece_to_id("Ω") == sp.unk_id()
    s = make_sample.build(out=tmp_path / "out2", jsonl=[train], val_jsonl=[val], vocab_size=300, verbose=False)
    sp = load_sp(s)
    assert sp.piece_to_id("Ω") != sp.unk_id()


def test_whitespace_piece_is_forced_for_space_free_text(tmp_path):
    texts = ["".join(random.Random(i).choice("abcdefgh") for _ in range(300)) for i in range(20)]
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    val = write_jsonl(tmp_path / "v.jsonl", [{"text": "abc def"}])
    s = make_sample.build(out=tmp_path / "out", jsonl=[train], val_jsonl=[val], vocab_size=300, verbose=False)
    sp = load_sp(s)
    assert sp.piece_to_id("\u2581") != sp.unk_id()
    assert sp.decode(split_at_bos(split_tokens(s, "val"))[0]) == "abc def"


def test_missing_file_is_named(tmp_path, capsys):
    present = write_jsonl(tmp_path / "v.jsonl", [{"text": "hello there"}])
    missing = tmp_path / "nope.jsonl.xz"
    with pytest.raises(SystemExit, match="nope.jsonl.xz"):
        make_sample.build(out=tmp_path / "out", jsonl=[missing], val_jsonl=[present], verbose=False)
    with pytest.raises(SystemExit) as exc:
        make_sample.main(["--out", str(tmp_path / "out"), "--jsonl", str(missing), "--val-jsonl", str(present)])
    assert exc.value.code == 2 and "nope.jsonl.xz" in capsys.readouterr().err


def test_jsonl_requires_val_jsonl(tmp_path, capsys):
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello there"}])
    with pytest.raises(SystemExit) as exc:
        make_sample.main(["--out", str(tmp_path / "out"), "--jsonl", str(train)])
    assert exc.value.code == 2 and "--val-jsonl" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--val-jsonl"):
        make_sample.build(out=tmp_path / "out", jsonl=[train], verbose=False)


@pytest.mark.parametrize("name", ["bad.jsonl", "bad.jsonl.xz"])
def test_line_without_text_is_named(tmp_path, name):
    bad = write_jsonl(tmp_path / name, [{"text": "fine"}, {"title": "no text here"}])
    val = write_jsonl(tmp_path / "v.jsonl", [{"text": "hello there"}])
    with pytest.raises(SystemExit, match=rf"{name}:2: .*\"text\""):
        make_sample.build(out=tmp_path / "out", jsonl=[bad], val_jsonl=[val], verbose=False)


@pytest.mark.skipif(not (ENWIKI_TRAIN.is_file() and ENWIKI_VAL.is_file()),
                    reason="shared enwiki corpus not present at ../shared/data/ next to the repo")
def test_enwiki_subset(tmp_path):
    s = make_sample.main(["--out", str(tmp_path), "--name", "enwiki_sp1024", "--tokenizer-name", "enwiki_1024_bpe",
                          "--jsonl", str(ENWIKI_TRAIN), "--val-jsonl", str(ENWIKI_VAL),
                          "--max-train-docs", "200", "--max-val-docs", "50"])
    assert (s["train"]["docs"], s["val"]["docs"]) == (200, 50)
    assert s["seconds"] < 30
    sp = load_sp(s)
    assert sp.vocab_size() == 1024 and sp.piece_to_id("\u2581") != sp.unk_id()
    val_docs = split_at_bos(split_tokens(s, "val"))
    assert len(val_docs) == 50
    first = json.loads(lzma.open(ENWIKI_VAL, "rt", encoding="utf-8").readline())["text"]
    assert sp.decode(val_docs[0]) == normalized(sp, first)
