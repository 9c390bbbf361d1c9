"""tools/check_overlap.py: planted train/validation overlaps are found and counted exactly, clean data is clean, and
the saved result goes stale when a shard changes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import train_gpt

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tools"))
import check_overlap  # noqa: E402

BOS = check_overlap.DEFAULT_BOS_ID
WINDOW = check_overlap.DEFAULT_WINDOW


def random_doc(rng, length: int) -> np.ndarray:
    """Random content tokens (never BOS), so two documents share no window by chance."""
    return rng.integers(2, 1000, length).astype(np.uint16)


def stream(docs) -> np.ndarray:
    return np.concatenate([np.concatenate([[BOS], d]) for d in docs]).astype(np.uint16)


def write_split(folder: Path, split: str, tokens: np.ndarray, cuts=()) -> None:
    """The tokens as shards cut at the given positions (which may fall inside documents)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, part in enumerate(np.split(tokens, list(cuts))):
        train_gpt.write_shard(folder / f"fineweb_{split}_{i:06d}.bin", part)


def other_token(token: int) -> int:
    return 2 + (int(token) - 1) % 998  # a content token that differs from `token`


@pytest.fixture
def planted(tmp_path):
    """Validation: six documents. Training: random documents plus, planted among them, document A whole, a
    64-token span of B inside a longer document, C with its last token changed, and short document D whole."""
    rng = np.random.default_rng(7)
    a, b, c, d, e, f = (random_doc(rng, n) for n in (300, 500, 200, 20, 400, 100))
    span = b[100:100 + WINDOW]
    around_b = np.concatenate([random_doc(rng, 50), span, random_doc(rng, 50)])
    around_b[49], around_b[50 + WINDOW] = other_token(b[99]), other_token(b[100 + WINDOW])  # the span is exactly 64
    c_changed = c.copy()
    c_changed[-1] = other_token(c[-1])
    noise = [random_doc(rng, n) for n in rng.integers(50, 400, 30)]
    train_docs = noise[:10] + [a] + noise[10:15] + [around_b] + noise[15:20] + [c_changed, d] + noise[20:]
    train = stream(train_docs)
    a_start = sum(len(doc) + 1 for doc in train_docs[:10]) + 1
    write_split(tmp_path, "train", train, cuts=(a_start + 150, a_start + 151 + 2 * WINDOW))  # shards cut A, twice
    write_split(tmp_path, "val", stream([a, b, c, d, e, f]))
    expected = dict(val_documents=6, val_tokens=300 + 500 + 200 + 20 + 400 + 100, exact_documents=2,
                    window_documents=3, window_tokens=300 + WINDOW + 199, overlapping_documents=4,
                    overlapping_tokens=300 + WINDOW + 199 + 20, train_shards=3, train_tokens=len(train))
    return tmp_path, expected


@pytest.mark.parametrize("chunk_tokens, workers", [(None, 1), (97, 1), (97, 2)],
                         ids=["one_chunk", "small_chunks", "two_workers"])
def test_planted_overlaps_are_found_and_counted_exactly(planted, monkeypatch, chunk_tokens, workers):
    """Small chunks put seams inside windows and documents; two workers join documents across shards."""
    data, expected = planted
    if chunk_tokens:
        monkeypatch.setattr(check_overlap, "CHUNK_TOKENS", chunk_tokens)
    result = check_overlap.check_overlap(data, workers=workers)
    summary = result["summary"]
    assert {k: summary[k] for k in expected} == expected
    assert summary["overlap"] is True and summary["window"] == WINDOW
    assert summary["overlapping_document_share"] == pytest.approx(4 / 6)
    assert summary["overlapping_token_share"] == pytest.approx(expected["overlapping_tokens"] / expected["val_tokens"])
    examples = {e["val_document"]: e for e in result["examples"]}
    assert sorted(examples) == [0, 1, 2, 3]
    assert examples[0]["kind"] == "exact copy" and examples[0]["val_span"] == [0, 300]
    assert examples[0]["train_shard"] == "fineweb_train_000000.bin"  # A starts in the first shard
    assert examples[1]["kind"] == "shared span" and examples[1]["val_span"] == [100, 100 + WINDOW]
    assert examples[2]["val_span"] == [0, 199] and examples[3]["val_span"] == [0, 20]


def test_the_cli_exits_1_on_overlap_and_saves_the_result(planted, capsys):
    data, _ = planted
    assert check_overlap.main([str(data), "--quiet", "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert "OVERLAP:" in out and f"sharing a {WINDOW}-token span with training:" in out
    assert "4 (66.67 %) documents" in out and "M tokens/s" in out
    saved = json.loads((data / check_overlap.RESULT_NAME).read_text())
    assert saved["summary"]["overlapping_documents"] == 4 and saved["summary"]["version"] == check_overlap.VERSION
    assert saved["shards"] == check_overlap.shard_fingerprints(data)
    read = check_overlap.read_overlap_result(data)
    assert read["status"] == "overlap" and read["overlapping_documents"] == 4


def test_the_trainer_logs_the_saved_answer_and_says_when_there_is_none(planted):
    data, _ = planted
    assert train_gpt.describe_overlap_check(train_gpt.overlap_check(data), data).startswith("overlap_check:none")
    check_overlap.main([str(data), "--quiet", "--workers", "1"])
    line = train_gpt.describe_overlap_check(train_gpt.overlap_check(data), data)
    assert line.startswith("WARNING: the training shards hold validation text") and "overlap_check:overlap" in line
    assert "documents:4/6 " in line


def test_examples_are_decoded_with_a_tokenizer(planted):
    class Letters:  # stands in for a SentencePiece processor
        def decode(self, ids):
            return "".join(chr(ord("a") + i % 26) for i in ids)

    data, _ = planted
    [example] = check_overlap.check_overlap(data, examples=1, tokenizer=Letters())["examples"]
    assert example["val_document"] == 0 and len(example["text"]) == 160 and example["text"].endswith("...")


def test_clean_data_reports_zero_and_exits_0(tmp_path):
    rng = np.random.default_rng(3)
    write_split(tmp_path, "train", stream([random_doc(rng, n) for n in rng.integers(1, 300, 60)]), cuts=(1000,))
    write_split(tmp_path, "val", stream([random_doc(rng, n) for n in rng.integers(1, 300, 20)]))
    done = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "check_overlap.py"), str(tmp_path), "--quiet"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "clean: no validation document" in done.stdout
    read = check_overlap.read_overlap_result(tmp_path)
    assert read["status"] == "clean" and read["overlap"] is False and read["val_documents"] == 20
    assert read["overlapping_documents"] == read["overlapping_tokens"] == read["exact_documents"] == 0
    assert read["version"] == check_overlap.VERSION and read["train_shards"] == 2


def test_a_changed_shard_makes_the_saved_result_stale(tmp_path):
    rng = np.random.default_rng(5)
    train = stream([random_doc(rng, 200) for _ in range(10)])
    write_split(tmp_path, "train", train, cuts=(700,))
    write_split(tmp_path, "val", stream([random_doc(rng, 100) for _ in range(3)]))
    assert check_overlap.read_overlap_result(tmp_path) is None  # never run
    check_overlap.save_result(tmp_path, check_overlap.check_overlap(tmp_path))
    assert check_overlap.read_overlap_result(tmp_path)["status"] == "clean"

    shard = tmp_path / "fineweb_train_000001.bin"
    stat = shard.stat()
    changed = train[700:].copy()
    changed[5] = other_token(changed[5])
    train_gpt.write_shard(shard, changed)  # same size, other tokens
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert check_overlap.read_overlap_result(tmp_path)["status"] == "stale"

    check_overlap.save_result(tmp_path, check_overlap.check_overlap(tmp_path))
    assert check_overlap.read_overlap_result(tmp_path)["status"] == "clean"
    train_gpt.write_shard(tmp_path / "fineweb_train_000002.bin", train[:50])  # a shard more
    assert check_overlap.read_overlap_result(tmp_path)["status"] == "stale"
    (tmp_path / check_overlap.RESULT_NAME).write_text("{not json")
    assert check_overlap.read_overlap_result(tmp_path)["status"] == "unreadable"


def test_errors_name_the_problem_and_exit_2(tmp_path, capsys):
    assert check_overlap.main([str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err
    write_split(tmp_path, "train", stream([np.arange(2, 40, dtype=np.uint16)]))
    assert check_overlap.main([str(tmp_path)]) == 2
    assert "no fineweb_val_*.bin shards in" in capsys.readouterr().err
    (tmp_path / "fineweb_val_000000.bin").write_bytes(b"\0" * 100)
    assert check_overlap.main([str(tmp_path)]) == 2
    assert "shorter than the 1024-byte shard header" in capsys.readouterr().err


def test_hashes_do_not_depend_on_position_and_join():
    hasher = check_overlap.SpanHasher(0, 100)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 65536, 90).astype(np.uint16)
    sums = hasher.prefix_sums(tokens)
    windows = hasher.windows(sums, 8)
    alone = [int(hasher.windows(hasher.prefix_sums(tokens[i:i + 8]), 8)[0]) for i in range(len(tokens) - 7)]
    assert windows.tolist() == alone
    first, second = hasher.spans(sums, np.array([0, 30]), np.array([30, 90])).tolist()
    assert hasher.join(first, 30, second) == int(hasher.spans(sums, np.array([0]), np.array([90]))[0])


def test_window_comparison_in_runs_matches_comparing_each_window(monkeypatch):
    """same_windows shares one comparison among windows that advance in step; it must answer as if it compared
    every window alone, at run breaks and batch edges too."""
    rng = np.random.default_rng(11)
    other = rng.integers(0, 4, 3000).astype(np.uint16)  # few token values: many near-equal windows
    tokens = other.copy()
    tokens[rng.integers(0, 3000, 40)] = 4
    starts = np.sort(rng.choice(3000 - 16, 900, replace=False))
    other_starts = np.where(rng.random(900) < 0.8, starts, rng.integers(0, 3000 - 16, 900))
    expected = [np.array_equal(tokens[a:a + 16], other[b:b + 16]) for a, b in zip(starts, other_starts)]
    assert check_overlap.same_windows(tokens, starts, other, other_starts, 16).tolist() == expected
    monkeypatch.setattr(check_overlap, "VERIFY_BATCH", 7)
    assert check_overlap.same_windows(tokens, starts, other, other_starts, 16).tolist() == expected
    assert 100 < sum(expected) < 900


def test_the_fast_sorts_agree_with_numpy():
    """argsort_hashes and first_occurrences replace np.argsort(kind="stable") and np.unique(return_index=True)."""
    rng = np.random.default_rng(2)
    high = rng.integers(0, 20, 5000).astype(np.uint64) << np.uint64(40)  # ties in the top bits, not the low ones
    hashes = high | rng.integers(0, 1 << 12, 5000).astype(np.uint64)
    hashes[::7] = hashes[0]
    assert np.array_equal(check_overlap.argsort_hashes(hashes), np.argsort(hashes, kind="stable"))
    values = rng.integers(0, 300, 4000)
    distinct, first = check_overlap.first_occurrences(values)
    expected = np.unique(values, return_index=True)
    assert np.array_equal(distinct, expected[0]) and np.array_equal(first, expected[1])
