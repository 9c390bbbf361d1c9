"""Tests for data/cached_challenge_fineweb.py against a fake hub: no network needed."""
import functools
import hashlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "data" / "cached_challenge_fineweb.py"
_spec = importlib.util.spec_from_file_location("cached_challenge_fineweb", SCRIPT)
dl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dl)

OFFICIAL, KEVCLARK = "willdepueoai/parameter-golf", "kevclark/parameter-golf"


def shard_bytes(tokens) -> bytes:
    header = np.zeros(256, dtype="<i4")
    header[:3] = (20240520, 1, len(tokens))
    return header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes()


@functools.cache
def sentencepiece_files() -> tuple[bytes, bytes]:
    """A real (tiny) SentencePiece model and its vocab, trained once: the downloader loads what it keeps."""
    import sentencepiece as spm

    words = [f"w{i}x{j}" for i in range(30) for j in range(5)]
    lines = [" ".join(words[k * 7 % 150:k * 7 % 150 + 20]) for k in range(300)]
    with tempfile.TemporaryDirectory() as tmp:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=f"{tmp}/t", model_type="bpe",
                                       vocab_size=64, hard_vocab_limit=False, minloglevel=2)
        return Path(f"{tmp}/t.model").read_bytes(), Path(f"{tmp}/t.vocab").read_bytes()


def publish(remote: Path, repo_id: str, vocab: int, n_train: int, n_val: int, prefix: str = "datasets") -> None:
    """Write a fake dataset repo in the published manifest schema."""
    root = remote / repo_id / prefix
    dataset, tok = f"fineweb10B_sp{vocab}", f"fineweb_{vocab}_bpe"
    rng = np.random.default_rng(vocab)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            path = root / "datasets" / dataset / f"fineweb_{split}_{i:06d}.bin"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(shard_bytes(rng.integers(0, vocab, size=10 + 7 * i)))
    (root / "tokenizers").mkdir(parents=True, exist_ok=True)
    model, vocab_file = sentencepiece_files()
    (root / "tokenizers" / f"{tok}.model").write_bytes(model)
    (root / "tokenizers" / f"{tok}.vocab").write_bytes(vocab_file)
    manifest = {
        "datasets": [{"name": dataset, "tokenizer_name": tok, "stats": {"files_train": n_train, "files_val": n_val}}],
        "tokenizers": [{"name": tok, "model_path": f"tokenizers/{tok}.model", "vocab_path": f"tokenizers/{tok}.vocab"}],
    }
    (root / "manifest.json").write_text(json.dumps(manifest))


class FakeHub:
    """Stands in for hf_hub_download and the hub's file listing: copies remote files into a fake HF
    cache, records calls, and can serve damaged bytes or list no sizes and hashes."""

    def __init__(self, remote: Path, cache: Path):
        self.remote, self.cache, self.calls, self.forced = remote, cache, [], []
        self.error = None  # exception to raise on every call whose filename contains error_on
        self.error_on = ""
        self.damage = {}  # filename -> (how many downloads to damage, bytes -> bytes)
        self.info_error = None  # exception the file listing raises (offline)
        self.lfs = True  # whether the listing has sha256s

    def __call__(self, *, repo_id, filename, repo_type, force_download=False):
        assert repo_type == "dataset"
        self.calls.append((repo_id, filename))
        if force_download:
            self.forced.append(filename)
        if self.error is not None and self.error_on in filename:
            raise self.error
        source = self.remote / repo_id / filename
        if not source.is_file():
            raise FileNotFoundError(f"404: {repo_id}/{filename}")
        cached = self.cache / repo_id / filename
        cached.parent.mkdir(parents=True, exist_ok=True)
        data = source.read_bytes()
        times, damage = self.damage.get(filename, (0, None))
        if times:
            self.damage[filename] = (times - 1, damage)
            data = damage(data)
        cached.unlink(missing_ok=True)  # a new blob, as the HF cache writes one; old hard links keep the old bytes
        cached.write_bytes(data)
        return str(cached)

    def file_info(self, repo_id, filenames):
        if self.info_error is not None:
            raise self.info_error
        published = {}
        for f in filenames:
            source = self.remote / repo_id / f
            if source.is_file():
                sha = hashlib.sha256(source.read_bytes()).hexdigest() if self.lfs else None
                published[f] = dl.Published(source.stat().st_size, sha)
        return published

    def files(self):
        return [f for _, f in self.calls]


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.delenv("MATCHED_FINEWEB_REPO_ID", raising=False)
    monkeypatch.delenv("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", raising=False)
    remote = tmp_path / "remote"
    publish(remote, OFFICIAL, 1024, n_train=4, n_val=1)
    publish(remote, KEVCLARK, 8192, n_train=5, n_val=2)
    hub = FakeHub(remote, tmp_path / "hf_cache")
    out = tmp_path / "data"

    def run(*args):
        dl.main([*map(str, args), "--out", str(out)], download=hub, file_info=hub.file_info)

    return hub, out, remote, run


def remote_paths(variant, train, val, prefix="datasets"):
    d = f"{prefix}/datasets/fineweb10B_{variant}"
    tok = f"{prefix}/tokenizers/fineweb_{variant[2:]}_bpe"
    return ([f"{prefix}/manifest.json"] + [f"{d}/fineweb_val_{i:06d}.bin" for i in range(val)]
            + [f"{d}/fineweb_train_{i:06d}.bin" for i in range(train)] + [f"{tok}.model", f"{tok}.vocab"])


@pytest.mark.parametrize("variant, repo", [("sp1024", OFFICIAL), ("sp8192", KEVCLARK)])
def test_variant_picks_repo(env, variant, repo):
    hub, _, _, run = env
    run("--variant", variant, "--train-shards", 1)
    assert {r for r, _ in hub.calls} == {repo}


def test_env_overrides_repo_and_prefix(env, monkeypatch):
    hub, out, remote, run = env
    publish(remote, "someone/mirror", 8192, n_train=2, n_val=1, prefix="export")
    monkeypatch.setenv("MATCHED_FINEWEB_REPO_ID", "someone/mirror")
    monkeypatch.setenv("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", "export")
    run("--variant", "sp8192", "--train-shards", 2)
    assert {r for r, _ in hub.calls} == {"someone/mirror"}
    assert hub.files() == remote_paths("sp8192", train=2, val=1, prefix="export")
    assert (out / "datasets/fineweb10B_sp8192/fineweb_train_000001.bin").is_file()


def test_fetches_exactly_val_first_train_and_tokenizer(env):
    hub, out, remote, run = env
    run("--variant", "sp8192", "--train-shards", 3)
    assert hub.files() == remote_paths("sp8192", train=3, val=2)
    for f in hub.files()[1:]:
        local = out / f.removeprefix("datasets/")  # datasets/datasets/x -> data/datasets/x
        assert local.read_bytes() == (remote / KEVCLARK / f).read_bytes(), local
    assert not (out / "datasets/fineweb10B_sp8192/fineweb_train_000003.bin").exists()
    assert (out / "tokenizers/fineweb_8192_bpe.model").is_file()


def test_default_is_80_train_shards_or_all_there_are(env):
    hub, _, _, run = env
    run("--variant", "sp8192")  # the fake repo has 5 < 80
    assert hub.files() == remote_paths("sp8192", train=5, val=2)


def test_zero_train_shards(env):
    hub, _, _, run = env
    run("--variant", "sp8192", "--train-shards", 0)
    assert hub.files() == remote_paths("sp8192", train=0, val=2)


def test_positional_train_shards(env):
    hub, _, _, run = env
    run(2, "--variant", "sp1024")
    assert hub.files() == remote_paths("sp1024", train=2, val=1)


def test_train_shard_count_given_twice_or_negative(env):
    _, _, _, run = env
    with pytest.raises(SystemExit):
        run(2, "--train-shards", 3)
    with pytest.raises(SystemExit):
        run("--train-shards", -1)


def test_more_train_shards_than_published(env):
    hub, _, _, run = env
    with pytest.raises(SystemExit, match=r"sp8192 on kevclark/parameter-golf has only 5 train shards.*requested 6"):
        run("--variant", "sp8192", "--train-shards", 6)
    assert hub.files() == ["datasets/manifest.json"]


def test_manifest_of_one_repo_is_not_used_for_another(env):
    hub, out, remote, run = env
    run("--variant", "sp1024", "--train-shards", 1)
    # The public downloader's bare data/manifest.json (sp1024 only) must not be trusted either.
    shutil.copyfile(remote / OFFICIAL / "datasets/manifest.json", out / "manifest.json")
    hub.calls.clear()
    run("--variant", "sp8192", "--train-shards", 1)
    assert hub.calls[0] == (KEVCLARK, "datasets/manifest.json")
    assert (out / "datasets/fineweb10B_sp8192/fineweb_val_000001.bin").is_file()
    assert dl.manifest_path(out, OFFICIAL, "datasets") != dl.manifest_path(out, KEVCLARK, "datasets")
    assert dl.manifest_path(out, KEVCLARK, "datasets").is_file()


def test_skip_manifest_needs_one_from_the_same_repo(env):
    hub, out, _, run = env
    run("--variant", "sp1024", "--train-shards", 0)
    hub.calls.clear()
    with pytest.raises(SystemExit, match=r"no manifest cached for repo kevclark/parameter-golf"):
        run("--variant", "sp8192", "--skip-manifest")
    assert hub.calls == []
    run("--variant", "sp1024", "--train-shards", 1, "--skip-manifest")  # same repo: works offline
    assert hub.files() == ["datasets/datasets/fineweb10B_sp1024/fineweb_train_000000.bin"]


def test_variant_missing_from_manifest_names_manifest_and_contents(env, monkeypatch):
    _, _, _, run = env
    monkeypatch.setenv("MATCHED_FINEWEB_REPO_ID", OFFICIAL)
    with pytest.raises(SystemExit) as exc:
        run("--variant", "sp8192")
    message = str(exc.value)
    assert "fineweb10B_sp8192" in message and "willdepueoai__parameter-golf" in message
    assert "it has: fineweb10B_sp1024" in message and "MATCHED_FINEWEB_REPO_ID" in message


def test_existing_valid_files_are_skipped(env):
    hub, _, _, run = env
    run("--variant", "sp8192", "--train-shards", 2)
    hub.calls.clear()
    run("--variant", "sp8192", "--train-shards", 2)
    assert hub.files() == ["datasets/manifest.json"]


@pytest.mark.parametrize("corrupt", ["bad_magic", "truncated", "too_long"])
def test_corrupt_local_shard_is_fetched_again(env, corrupt):
    hub, out, remote, run = env
    run("--variant", "sp8192", "--train-shards", 2)
    rel = "datasets/fineweb10B_sp8192/fineweb_train_000001.bin"
    good = (remote / KEVCLARK / "datasets" / rel).read_bytes()
    bad = {"bad_magic": b"\0\0\0\0" + good[4:], "truncated": good[:-2], "too_long": good + b"\0\0"}[corrupt]
    (out / rel).unlink()  # replace rather than rewrite: the local file is a hard link into the fake cache
    (out / rel).write_bytes(bad)
    hub.calls.clear()
    run("--variant", "sp8192", "--train-shards", 2)
    assert hub.files() == ["datasets/manifest.json", f"datasets/{rel}"]
    assert (out / rel).read_bytes() == good


def test_a_present_file_is_hashed_once_and_again_when_it_changes(env, monkeypatch):
    """A flipped byte leaves the size and the header as they were: only the sha256 tells, and it is checked for
    files already on disk too; a hash verified before is not computed again for an unchanged file."""
    hub, out, remote, run = env
    hashed = []
    real_sha256 = dl.sha256_of
    monkeypatch.setattr(dl, "sha256_of", lambda path: hashed.append(path.name) or real_sha256(path))
    run("--variant", "sp8192", "--train-shards", 2)
    assert len(hashed) == 6  # 2 val + 2 train shards and the tokenizer's two files, each once, as it arrived
    hashed.clear()
    run("--variant", "sp8192", "--train-shards", 2)
    assert hashed == [] and hub.files().count("datasets/manifest.json") == 2  # nothing changed, nothing hashed
    rel = "datasets/fineweb10B_sp8192/fineweb_train_000001.bin"
    good = (out / rel).read_bytes()
    (out / rel).unlink()  # a new file rather than a rewrite: the local file is a hard link into the fake cache
    (out / rel).write_bytes(flip_last_byte(good))
    hub.calls.clear()
    run("--variant", "sp8192", "--train-shards", 2)
    assert hub.files() == ["datasets/manifest.json", f"datasets/{rel}"] and (out / rel).read_bytes() == good
    assert hashed == ["fineweb_train_000001.bin"] * 2  # the damaged copy, then the fetched one


def test_invalid_shard_from_hub_is_reported(env):
    hub, _, remote, run = env
    (remote / KEVCLARK / "datasets/datasets/fineweb10B_sp8192/fineweb_val_000000.bin").write_bytes(b"junk")
    with pytest.raises(SystemExit, match=r"fineweb_val_000000.bin.*arrived invalid"):
        run("--variant", "sp8192")


def flip_last_byte(data: bytes) -> bytes:
    """Same size, valid shard header: only the hash can tell."""
    return data[:-1] + bytes([data[-1] ^ 1])


def shorter_valid_shard(data: bytes) -> bytes:
    """A well-formed shard, but not the one the hub lists: only the size can tell."""
    return shard_bytes(np.frombuffer(data[1024:], dtype="<u2")[:-1])


def test_corrupt_download_is_fetched_again_past_the_cache(env):
    hub, out, remote, run = env
    name = "datasets/datasets/fineweb10B_sp8192/fineweb_train_000001.bin"
    hub.damage[name] = (1, flip_last_byte)
    run("--variant", "sp8192", "--train-shards", 2)
    assert hub.files().count(name) == 2 and hub.forced == [name]
    assert (out / name.removeprefix("datasets/")).read_bytes() == (remote / KEVCLARK / name).read_bytes()


def test_download_corrupt_every_time_stops_naming_the_hash(env):
    hub, _, _, run = env
    name = "datasets/datasets/fineweb10B_sp8192/fineweb_val_000001.bin"
    hub.damage[name] = (2, flip_last_byte)
    with pytest.raises(SystemExit, match=r"fineweb_val_000001.bin.*arrived invalid.*twice.*sha256 differs"):
        run("--variant", "sp8192", "--train-shards", 0)
    assert hub.files().count(name) == 2


def test_without_hashes_the_listed_size_is_checked(env):
    hub, out, remote, run = env
    hub.lfs = False
    name = "datasets/datasets/fineweb10B_sp8192/fineweb_train_000000.bin"
    hub.damage[name] = (1, shorter_valid_shard)
    run("--variant", "sp8192", "--train-shards", 1)
    assert hub.forced == [name]
    assert (out / name.removeprefix("datasets/")).read_bytes() == (remote / KEVCLARK / name).read_bytes()


def test_local_shard_of_another_size_than_listed_is_fetched_again(env):
    hub, out, _, run = env
    run("--variant", "sp8192", "--train-shards", 1)
    local = out / "datasets/fineweb10B_sp8192/fineweb_train_000000.bin"
    shorter = shorter_valid_shard(local.read_bytes())
    local.unlink()
    local.write_bytes(shorter)
    hub.calls.clear()
    run("--variant", "sp8192", "--train-shards", 1)
    assert hub.files() == ["datasets/manifest.json", "datasets/datasets/fineweb10B_sp8192/fineweb_train_000000.bin"]


@pytest.mark.parametrize("junk", [b"0123456789", bytes(range(256)) * 40], ids=["tiny", "not_sentencepiece"])
def test_local_tokenizer_that_does_not_load_is_never_kept(env, junk):
    hub, out, remote, run = env
    run("--variant", "sp8192", "--train-shards", 0)
    local = out / "tokenizers/fineweb_8192_bpe.model"
    local.unlink()
    local.write_bytes(junk)
    hub.calls.clear()
    hub.info_error = ConnectionError("offline")  # no listed size: the file itself must give it away
    run("--variant", "sp8192", "--train-shards", 0)
    assert hub.files() == ["datasets/manifest.json", "datasets/tokenizers/fineweb_8192_bpe.model"]
    assert local.read_bytes() == (remote / KEVCLARK / "datasets/tokenizers/fineweb_8192_bpe.model").read_bytes()


def test_tokenizer_from_hub_that_is_not_sentencepiece_is_refused(env):
    hub, out, remote, run = env
    (remote / KEVCLARK / "datasets/tokenizers/fineweb_8192_bpe.model").write_bytes(b"model 8192")
    with pytest.raises(SystemExit, match=r"fineweb_8192_bpe.model.*twice.*not a SentencePiece model"):
        run("--variant", "sp8192", "--train-shards", 0)


def test_hub_listing_unavailable_falls_back_to_header_checks(env, capsys):
    hub, out, _, run = env
    hub.info_error = ConnectionError("Network is unreachable")
    run("--variant", "sp8192", "--train-shards", 1)
    assert "the hub did not list sizes and hashes (ConnectionError" in capsys.readouterr().out
    assert (out / "datasets/fineweb10B_sp8192/fineweb_train_000000.bin").is_file()


def rewrite_manifest(remote: Path, change) -> None:
    path = remote / KEVCLARK / "datasets/manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest["datasets"][0], manifest["tokenizers"][0])
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("count", ["many", -1, 2.5, True])
def test_manifest_shard_count_that_is_not_a_count(env, count):
    _, _, remote, run = env
    rewrite_manifest(remote, lambda dataset, _: dataset["stats"].update(files_train=count))
    reason = r"is (not a non-negative integer|negative)"
    with pytest.raises(SystemExit, match=rf"train shard count {re.escape(repr(count))} {reason}"):
        run("--variant", "sp8192")


@pytest.mark.parametrize("key, value", [("model_path", "../../escape.model"), ("model_path", "/tmp/escape.model"),
                                        ("vocab_path", "tokenizers\\..\\..\\escape.vocab"), ("name", "../escape")])
def test_manifest_tokenizer_names_stay_inside_the_data_folder(env, key, value):
    hub, out, remote, run = env

    def change(dataset, tokenizer):
        tokenizer[key] = value
        if key == "name":
            dataset["tokenizer_name"] = value

    rewrite_manifest(remote, change)
    with pytest.raises(SystemExit, match=r"(tokenizer path|tokenizer_name) .* plain name"):
        run("--variant", "sp8192", "--train-shards", 0)
    assert not any("escape" in f for f in hub.files())


def test_copies_when_hard_links_fail(env, monkeypatch):
    _, out, remote, run = env

    def no_link(*_):
        raise OSError("cross-device link")

    monkeypatch.setattr(dl.os, "link", no_link)
    run("--variant", "sp1024", "--train-shards", 1)
    rel = "tokenizers/fineweb_1024_bpe.vocab"
    assert (out / rel).read_bytes() == (remote / OFFICIAL / "datasets" / rel).read_bytes()


def offline_errors():
    from huggingface_hub.errors import LocalEntryNotFoundError
    return [OSError("Network is unreachable"), ConnectionError("connection refused"),
            LocalEntryNotFoundError("cannot find the requested files in the local cache")]


@pytest.mark.parametrize("error", offline_errors(), ids=lambda e: type(e).__name__)
def test_offline_manifest_gives_one_clear_message(env, error):
    hub, _, _, run = env
    hub.error = error
    with pytest.raises(SystemExit) as exc:
        run("--variant", "sp8192")
    message = str(exc.value)
    assert "'datasets/manifest.json'" in message and "kevclark/parameter-golf" in message
    assert "HF_HUB_OFFLINE" in message and "--skip-manifest" in message
    assert exc.value.__context__ is error  # the cause is kept for debugging, but the exit is one message


def test_offline_shard_names_the_shard(env):
    hub, _, _, run = env
    hub.error, hub.error_on = ConnectionError("connection reset"), "fineweb_train_000001"
    with pytest.raises(SystemExit, match=r"'datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin' "
                                         r"from dataset repo willdepueoai/parameter-golf"):
        run("--variant", "sp1024", "--train-shards", 2)


def test_unknown_variant(env, capsys):
    hub, _, _, run = env
    with pytest.raises(SystemExit) as exc:
        run("--variant", "gpt2")
    assert exc.value.code == 2
    assert "unknown variant 'gpt2'" in capsys.readouterr().err
    assert hub.calls == []


def test_alternative_manifest_schema(env, monkeypatch):
    hub, _, remote, run = env
    root = remote / "alt/repo/datasets"
    shutil.copytree(remote / KEVCLARK / "datasets", root)
    manifest = {"datasets": {"fineweb10B_sp8192": {"tokenizer": "fineweb_8192_bpe", "train_shards": 5,
                                                   "val_shards": 1}}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setenv("MATCHED_FINEWEB_REPO_ID", "alt/repo")
    run("--variant", "sp8192", "--train-shards", 1)
    assert hub.files() == remote_paths("sp8192", train=1, val=1)


def test_byte260_single_tokenizer_path(env, monkeypatch):
    hub, out, remote, run = env
    root = remote / OFFICIAL / "datasets"
    (root / "datasets/fineweb10B_byte260").mkdir(parents=True)
    (root / "datasets/fineweb10B_byte260/fineweb_val_000000.bin").write_bytes(shard_bytes([1, 2, 3]))
    (root / "tokenizers/fineweb_pure_byte_260.json").write_text("{}")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["datasets"].append({"name": "fineweb10B_byte260", "tokenizer_name": "pure_byte_260",
                                 "stats": {"files_train": 0, "files_val": 1}})
    manifest["tokenizers"].append({"name": "pure_byte_260", "path": "tokenizers/fineweb_pure_byte_260.json"})
    (root / "manifest.json").write_text(json.dumps(manifest))
    run("--variant", "byte260")
    assert hub.files()[-1] == "datasets/tokenizers/fineweb_pure_byte_260.json"
    assert (out / "tokenizers/fineweb_pure_byte_260.json").read_text() == "{}"


def test_imports_without_huggingface_hub():
    code = f"import sys; sys.modules['huggingface_hub'] = None; import runpy; runpy.run_path({str(SCRIPT)!r})"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


CASEOPS_REPO = "romeerp/parameter-golf-caseops-v1"
CASEOPS_DATASET = "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"


def publish_caseops(remote: Path, n_train: int, n_val: int, sidecar_magic: int = 20240520) -> None:
    """The CaseOps repo's layout: its own dataset name, a byte sidecar per val shard (the public files carry the
    token magic), and val_bytes_glob in the manifest."""
    publish(remote, CASEOPS_REPO, 8192, n_train, n_val)
    root = remote / CASEOPS_REPO / "datasets"
    (root / "datasets" / "fineweb10B_sp8192").rename(root / "datasets" / CASEOPS_DATASET)
    for i in range(n_val):
        count = (len((root / "datasets" / CASEOPS_DATASET / f"fineweb_val_{i:06d}.bin").read_bytes()) - 1024) // 2
        header = np.zeros(256, dtype="<i4")
        header[:3] = (sidecar_magic, 1, count)
        (root / "datasets" / CASEOPS_DATASET / f"fineweb_val_bytes_{i:06d}.bin").write_bytes(
            header.tobytes() + np.ones(count, dtype="<u2").tobytes())
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["datasets"][0].update(name=CASEOPS_DATASET, val_bytes_glob="fineweb_val_bytes_*.bin")
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_the_caseops_variant_fetches_its_repo_dataset_and_byte_sidecars(env):
    hub, out, remote, run = env
    publish_caseops(remote, n_train=2, n_val=2)
    run("--variant", "sp8192-caseops", "--train-shards", 1)
    assert {r for r, _ in hub.calls} == {CASEOPS_REPO}
    d = f"datasets/datasets/{CASEOPS_DATASET}"
    assert hub.files() == ["datasets/manifest.json", f"{d}/fineweb_val_000000.bin", f"{d}/fineweb_val_000001.bin",
                           f"{d}/fineweb_train_000000.bin", f"{d}/fineweb_val_bytes_000000.bin",
                           f"{d}/fineweb_val_bytes_000001.bin", "datasets/tokenizers/fineweb_8192_bpe.model",
                           "datasets/tokenizers/fineweb_8192_bpe.vocab"]
    for f in hub.files()[1:]:
        assert (out / f.removeprefix("datasets/")).read_bytes() == (remote / CASEOPS_REPO / f).read_bytes()


def test_a_damaged_byte_sidecar_is_fetched_again(env):
    hub, out, remote, run = env
    publish_caseops(remote, n_train=1, n_val=1)
    name = f"datasets/datasets/{CASEOPS_DATASET}/fineweb_val_bytes_000000.bin"
    hub.damage[name] = (1, lambda data: data[:-2])
    run("--variant", "sp8192-caseops", "--train-shards", 0)
    assert hub.forced == [name]
    assert (out / name.removeprefix("datasets/")).read_bytes() == (remote / CASEOPS_REPO / name).read_bytes()


def test_a_caseops_sidecar_with_a_foreign_magic_is_refused():
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fineweb_val_bytes_000000.bin"
        header = np.zeros(256, dtype="<i4")
        header[:3] = (12345, 1, 0)
        path.write_bytes(header.tobytes())
        assert dl.sidecar_problem(path) == "bad shard header (magic 12345, version 1)"
        header[0] = 20240521
        path.write_bytes(header.tobytes())
        assert dl.sidecar_problem(path) is None and dl.shard_problem(path) is not None
