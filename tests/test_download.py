"""Tests for data/cached_challenge_fineweb.py against a fake hub: no network needed."""
import importlib.util
import json
import shutil
import subprocess
import sys
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
    (root / "tokenizers" / f"{tok}.model").write_bytes(f"model {vocab}".encode())
    (root / "tokenizers" / f"{tok}.vocab").write_bytes(f"vocab {vocab}".encode())
    manifest = {
        "datasets": [{"name": dataset, "tokenizer_name": tok, "stats": {"files_train": n_train, "files_val": n_val}}],
        "tokenizers": [{"name": tok, "model_path": f"tokenizers/{tok}.model", "vocab_path": f"tokenizers/{tok}.vocab"}],
    }
    (root / "manifest.json").write_text(json.dumps(manifest))


class FakeHub:
    """Stands in for hf_hub_download: copies remote files into a fake HF cache and records calls."""

    def __init__(self, remote: Path, cache: Path):
        self.remote, self.cache, self.calls = remote, cache, []
        self.error = None  # exception to raise on every call whose filename contains error_on
        self.error_on = ""

    def __call__(self, *, repo_id, filename, repo_type):
        assert repo_type == "dataset"
        self.calls.append((repo_id, filename))
        if self.error is not None and self.error_on in filename:
            raise self.error
        source = self.remote / repo_id / filename
        if not source.is_file():
            raise FileNotFoundError(f"404: {repo_id}/{filename}")
        cached = self.cache / repo_id / filename
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, cached)
        return str(cached)

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
        dl.main([*map(str, args), "--out", str(out)], download=hub)

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


def test_invalid_shard_from_hub_is_reported(env):
    hub, _, remote, run = env
    (remote / KEVCLARK / "datasets/datasets/fineweb10B_sp8192/fineweb_val_000000.bin").write_bytes(b"junk")
    with pytest.raises(SystemExit, match=r"fineweb_val_000000.bin.*arrived invalid"):
        run("--variant", "sp8192")


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
    manifest = {"datasets": {"fineweb10B_sp8192": {"tokenizer": "fineweb_8192_bpe", "train_shards": 5, "val_shards": 1}}}
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
