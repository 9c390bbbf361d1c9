"""Download the challenge's tokenized FineWeb shards and tokenizer from the Hugging Face hub.

    python3 data/cached_challenge_fineweb.py --variant sp8192 --train-shards 80
    python3 data/cached_challenge_fineweb.py --variant sp8192-caseops --train-shards 80

fills data/datasets/fineweb10B_sp8192/ (every val shard, the first N train shards) and
data/tokenizers/ (the tokenizer's .model and .vocab). The variant picks the dataset repo
(sp8192: kevclark/parameter-golf; sp8192-caseops: romeerp/parameter-golf-caseops-v1, the CaseOps
records' data in data/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved/ with its validation
byte sidecar fineweb_val_bytes_*.bin, one per val shard; everything else: willdepueoai/parameter-golf);
MATCHED_FINEWEB_REPO_ID overrides it and MATCHED_FINEWEB_REMOTE_ROOT_PREFIX (default
"datasets") names the repo folder that holds manifest.json, datasets/ and tokenizers/.

The manifest says how many shards each split has and which tokenizer files belong to the
variant. Accepted schema (the published one first; the alternatives are also read):

    {"datasets": [{"name": "fineweb10B_sp8192",
                   "tokenizer_name": "fineweb_8192_bpe",
                   "stats": {"files_train": 128, "files_val": 1}}],
     "tokenizers": [{"name": "fineweb_8192_bpe",
                     "model_path": "tokenizers/fineweb_8192_bpe.model",
                     "vocab_path": "tokenizers/fineweb_8192_bpe.vocab"}]}

  - "datasets" may also be a dict keyed by dataset name;
  - shard counts may also be flat "train_shards" / "val_shards" keys of the entry;
  - "tokenizer" may stand for "tokenizer_name"; a tokenizer with no "tokenizers" entry
    (or an entry without paths) means tokenizers/<name>.model and tokenizers/<name>.vocab;
    an entry may list a single "path" instead (byte260's .json tokenizer).

Manifests are cached per repository and prefix, at data/manifests/<owner>__<name>/<prefix>/
manifest.json, and refreshed on every run unless --skip-manifest is given. A bare
data/manifest.json (written by the public downloader) is never read: it does not record
which repository it came from, which is what broke switching from sp1024 to sp8192.

Tokenizer names and paths in the manifest must stay inside data/: plain names, relative paths
without '..'. The manifest carries no per-file hashes; the hub publishes each file's size and, for
LFS files (the shards, the tokenizer model), its sha256. Those are asked for once per run; when the
hub cannot be asked (offline), only the checks below are made.

Files are fetched into the HF cache and hard-linked (copied where linking fails) into data/.
Every file, already present or just fetched, must be valid and match what the hub lists: shards must
have a good header and exactly 1024 + 2n bytes, a .model must load as a SentencePiece model, a .json
must parse, other files must be non-empty, and the size and the sha256 must be the hub's where it
lists them. A present file that fails is fetched; a fetched one that fails is fetched once more,
bypassing the HF cache. A hash once verified is remembered beside the cached manifest
(data/manifests/<owner>__<name>/<prefix>/verified_sha256.json) with the file's size and modification
time, so a re-run hashes only the files that changed since.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import struct
import sys
from pathlib import Path
from typing import NamedTuple, NoReturn

DATA_DIR = Path(__file__).resolve().parent
DEFAULT_REPO = "willdepueoai/parameter-golf"
VARIANT_REPOS = {"sp1024": DEFAULT_REPO, "sp8192": "kevclark/parameter-golf",
                 "sp8192-caseops": "romeerp/parameter-golf-caseops-v1"}
# Variants whose dataset is not named fineweb10B_<variant>; a CaseOps dataset always comes with a byte sidecar.
VARIANT_DATASETS = {"sp8192-caseops": "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"}
DEFAULT_TRAIN_SHARDS = 80
SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_BYTES = 20240520, 1, 1024
SIDECAR_MAGICS = (20240521, SHARD_MAGIC)  # train_gpt.SIDECAR_MAGICS: the public sidecars carry the token magic
OFFLINE_HINT = ("check your network connection and HF_HUB_OFFLINE (offline, only files already in the "
                "HF cache can be used), and HF_TOKEN for gated repos; --skip-manifest reuses a manifest "
                "cached earlier for this same repo")


def fail(message: str) -> NoReturn:
    """Stop with one readable line instead of a traceback."""
    raise SystemExit(f"cached_challenge_fineweb: error: {message}")


def hf_download(**kwargs) -> str:
    # Imported here so the module (and its tests) work without huggingface_hub installed.
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        fail("huggingface_hub is not installed: pip install huggingface_hub")
    return hf_hub_download(**kwargs)


class Published(NamedTuple):
    """A file as the hub lists it: its size, and its sha256 when it is stored in LFS."""
    size: int
    sha256: str | None


def hub_file_info(repo_id: str, filenames: list[str]) -> dict[str, Published]:
    """What the hub publishes about each file that exists (a few API calls, however many files)."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    api, published = HfApi(), {}
    for start in range(0, len(filenames), 100):  # keeps each request small
        for f in api.get_paths_info(repo_id, filenames[start:start + 100], repo_type="dataset"):
            if isinstance(f, RepoFile):
                published[f.path] = Published(f.size, f.lfs.sha256 if f.lfs else None)
    return published


def download_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "this file could not be fetched" (offline, 404, gated, bad repo id)."""
    try:
        from huggingface_hub import errors
    except ImportError:
        return (OSError,)
    return (OSError, errors.EntryNotFoundError, errors.HfHubHTTPError, errors.HFValidationError)


def variant_name(text: str) -> str:
    if not re.fullmatch(r"sp\d+|byte260", text) and text not in VARIANT_DATASETS:
        raise argparse.ArgumentTypeError(f"unknown variant {text!r}: expected sp<vocab size> "
                                         f"(e.g. sp1024, sp8192), byte260 or {', '.join(VARIANT_DATASETS)}")
    return text


def shard_count_arg(text: str) -> int:
    if not text.isdecimal():
        raise argparse.ArgumentTypeError(f"train shard count must be a non-negative integer, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Download the challenge's tokenized FineWeb shards and tokenizer.")
    p.add_argument("train_shards_positional", nargs="?", type=shard_count_arg, metavar="N",
                   help="same as --train-shards N")
    p.add_argument("--train-shards", type=shard_count_arg, metavar="N",
                   help=f"number of train shards to fetch, from the first (default {DEFAULT_TRAIN_SHARDS}, "
                        "or all the repo has if fewer)")
    p.add_argument("--variant", type=variant_name, default="sp1024",
                   help="sp<vocab size>, byte260 or sp8192-caseops (default sp1024)")
    p.add_argument("--skip-manifest", action="store_true",
                   help="do not fetch manifest.json; use the one cached earlier for the same repo")
    p.add_argument("--out", type=Path, default=DATA_DIR, help="local data folder (default: this script's folder)")
    return p


def shard_problem(path: Path, magics: tuple[int, ...] = (SHARD_MAGIC,)) -> str | None:
    """Why path is not a challenge shard, or None when it is one."""
    try:
        with open(path, "rb") as f:
            magic, version, count = struct.unpack("<3i", f.read(12))
        size = path.stat().st_size
    except (OSError, struct.error):
        return "missing, unreadable or shorter than a shard header"
    if magic not in magics or version != SHARD_VERSION:
        return f"bad shard header (magic {magic}, version {version})"
    if size != SHARD_HEADER_BYTES + 2 * count:
        return f"{size} bytes, but its header promises {count} tokens"
    return None


def sidecar_problem(path: Path) -> str | None:
    """Why path is not a byte sidecar (the shard layout, either magic), or None when it is one."""
    return shard_problem(path, SIDECAR_MAGICS)


def tokenizer_problem(path: Path) -> str | None:
    """Why path is not a usable tokenizer file, or None when it is one."""
    if not path.is_file() or path.stat().st_size == 0:
        return "missing or empty"
    if path.suffix == ".json":
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            return f"not JSON ({exc})"
    if path.suffix == ".model":
        return sentencepiece_problem(path)
    return None


def sentencepiece_problem(path: Path) -> str | None:
    try:
        import sentencepiece
    except ImportError:  # the trainer needs it anyway; without it the size and hash checks remain
        return None
    try:
        sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as exc:
        return f"not a SentencePiece model ({exc})"
    return None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def size_problem(path: Path, published: Published | None) -> str | None:
    if published is not None and path.stat().st_size != published.size:
        return f"{path.stat().st_size} bytes, the hub lists {published.size}"
    return None


def hash_problem(path: Path, published: Published | None) -> str | None:
    if published is not None and published.sha256 and sha256_of(path) != published.sha256:
        return f"its sha256 differs from the hub's {published.sha256}"
    return None


def place(cached: Path, dest: Path) -> None:
    """Put the HF-cache file at dest without touching whatever dest pointed to before."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".partial")
    tmp.unlink(missing_ok=True)
    try:
        os.link(cached.resolve(), tmp)  # cache entries are symlinks to blobs; link the blob, costs no space
    except OSError:
        shutil.copyfile(cached, tmp)  # other filesystem, or no hard links there
    # Replacing (not writing into) dest matters: an old dest may be a hard link to a cache blob.
    os.replace(tmp, dest)


def human(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n} B"


class VerifiedHashes:
    """The sha256 of each local file already checked against the hub, keyed by its path with the size and
    modification time it had then: a file changed since (a new mtime or size) is hashed again."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.entries = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.entries = {}

    @staticmethod
    def stamp(file: Path) -> list[int]:
        st = file.stat()
        return [st.st_size, st.st_mtime_ns]

    def known(self, file: Path, sha256: str) -> bool:
        return self.entries.get(str(file.resolve())) == [*self.stamp(file), sha256]

    def remember(self, file: Path, sha256: str) -> None:
        self.entries[str(file.resolve())] = [*self.stamp(file), sha256]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".partial")
        tmp.write_text(json.dumps(self.entries, indent=0), encoding="utf-8")
        os.replace(tmp, self.path)


class Fetcher:
    """Fetches files of one dataset repo into the local layout, and counts what it did."""

    def __init__(self, repo_id: str, prefix: str, out: Path, download, file_info=hub_file_info):
        self.repo_id, self.prefix, self.out, self.download = repo_id, prefix.strip("/"), out, download
        self.file_info, self.published = file_info, {}
        self.verified = VerifiedHashes(manifest_path(out, repo_id, self.prefix).with_name("verified_sha256.json"))
        self.fetched = self.skipped = self.fetched_bytes = self.skipped_bytes = self.hashed = 0

    def remote(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def learn_published(self, rels: list[str]) -> None:
        """Ask the hub for the sizes and hashes of the files to come; without them, check what can be checked."""
        try:
            self.published = self.file_info(self.repo_id, [self.remote(rel) for rel in rels])
        except download_errors() + (ImportError,) as exc:
            print(f"note: the hub did not list sizes and hashes ({type(exc).__name__}: {exc}); "
                  "checking shard headers and tokenizer files only", flush=True)

    def fetch(self, rel: str, dest: Path, force: bool = False) -> None:
        filename = self.remote(rel)
        try:
            # force: a corrupt file in the HF cache would otherwise be handed back again
            cached = self.download(repo_id=self.repo_id, repo_type="dataset", filename=filename, force_download=force)
        except download_errors() as exc:
            fail(f"could not download {filename!r} from dataset repo {self.repo_id}: "
                 f"{type(exc).__name__}: {exc}\n  {OFFLINE_HINT}")
        place(Path(cached), dest)
        self.fetched += 1
        self.fetched_bytes += dest.stat().st_size
        print(f"fetched {dest} ({human(dest.stat().st_size)})", flush=True)

    def hash_problem(self, path: Path, published: Published | None) -> str | None:
        """hash_problem, skipped for a file verified before and unchanged since; a match is remembered."""
        if published is None or not published.sha256 or self.verified.known(path, published.sha256):
            return None
        self.hashed += 1
        why = hash_problem(path, published)
        if why is None:
            self.verified.remember(path, published.sha256)
        return why

    def ensure(self, rel: str, problem) -> Path:
        """Fetch rel to out/rel unless a valid copy is already there; verify what arrives, and
        fetch it once more if it is corrupt. problem(path) says what is wrong with a file, or None."""
        dest, published = self.out / rel, self.published.get(self.remote(rel))
        why = problem(dest) or size_problem(dest, published) or self.hash_problem(dest, published)
        if why is None:
            self.skipped += 1
            self.skipped_bytes += dest.stat().st_size
            hashed = "sha256 checked" if published is not None and published.sha256 else "no sha256 listed"
            print(f"present {dest} ({hashed})", flush=True)
            return dest
        if dest.exists():
            print(f"invalid {dest} ({why}): fetching it again", flush=True)
        for force in (False, True):
            self.fetch(rel, dest, force)
            why = problem(dest) or size_problem(dest, published) or self.hash_problem(dest, published)
            if why is None:
                return dest
            print(f"corrupt {dest} ({why})", flush=True)
        fail(f"{self.remote(rel)!r} from {self.repo_id} arrived invalid at {dest} twice ({why}); "
             "retry later, or report it to the repo's owners")


def manifest_path(out: Path, repo_id: str, prefix: str) -> Path:
    return out / "manifests" / repo_id.replace("/", "__") / prefix / "manifest.json"


def load_manifest(fetcher: Fetcher, skip: bool) -> tuple[dict, Path]:
    local = manifest_path(fetcher.out, fetcher.repo_id, fetcher.prefix)
    if skip and not local.is_file():
        fail(f"--skip-manifest: no manifest cached for repo {fetcher.repo_id} (prefix {fetcher.prefix!r}) "
             f"at {local}; run once without --skip-manifest (manifests of other repos, and a bare "
             "data/manifest.json, are never used)")
    if not skip:
        fetcher.fetch("manifest.json", local)  # always refresh: the hub may have published more shards
    try:
        return json.loads(local.read_text(encoding="utf-8")), local
    except (OSError, ValueError) as exc:
        fail(f"manifest {local} from {fetcher.repo_id} is unreadable ({exc}); run without --skip-manifest")


def by_name(items) -> dict:
    """A manifest section as {name: entry}, whether it is a list of named entries or a dict."""
    if isinstance(items, dict):
        return items
    return {e.get("name"): e for e in items or [] if isinstance(e, dict)}


def shard_count(entry: dict, split: str, where: str) -> int:
    count = (entry.get("stats") or {}).get(f"files_{split}", entry.get(f"{split}_shards"))
    if count is None:
        fail(f"{where}: no {split} shard count (stats.files_{split} or {split}_shards)")
    if isinstance(count, bool) or not (isinstance(count, int) or (isinstance(count, str) and count.isdecimal())):
        fail(f"{where}: {split} shard count {count!r} is not a non-negative integer; the manifest is corrupt")
    if int(count) < 0:
        fail(f"{where}: {split} shard count {count!r} is negative; the manifest is corrupt")
    return int(count)


def is_plain_name(name) -> bool:
    """A name that stays inside the folder it is joined to."""
    return isinstance(name, str) and name not in ("", ".") and not any(bad in name for bad in ("/", "\\", "..", "\0"))


def inside_data(rel, where: str) -> str:
    """rel, if it is a relative path of plain names (so out/rel stays inside out); else stop."""
    if not isinstance(rel, str) or not all(is_plain_name(part) for part in rel.split("/")):
        fail(f"{where}: tokenizer path {rel!r} must be a relative path of plain names (no '..', '\\' or leading "
             "'/'); the manifest is corrupt")
    return rel


def tokenizer_files(manifest: dict, entry: dict, where: str) -> list[str]:
    name = entry.get("tokenizer_name") or entry.get("tokenizer")
    if not name:
        fail(f"{where}: no tokenizer_name")
    if not is_plain_name(name):
        fail(f"{where}: tokenizer_name {name!r} is not a plain name (no '/', '\\' or '..'); the manifest is corrupt")
    tok = by_name(manifest.get("tokenizers")).get(name) or {}
    paths = [tok[k] for k in ("model_path", "vocab_path", "path") if tok.get(k)]
    return [inside_data(p, where) for p in paths] or [f"tokenizers/{name}.model", f"tokenizers/{name}.vocab"]


def dataset_name(variant: str) -> str:
    return VARIANT_DATASETS.get(variant, f"fineweb10B_{variant}")


def plan(manifest: dict, where: str, variant: str, requested: int | None,
         repo_id: str) -> tuple[int, int, list[str], bool]:
    """(val shards, train shards, tokenizer files, whether each val shard has a byte sidecar) for the variant."""
    datasets = by_name(manifest.get("datasets"))
    dataset = dataset_name(variant)
    if dataset not in datasets:
        fail(f"manifest {where} (repo {repo_id}) has no dataset {dataset} for variant {variant}; it has: "
             f"{', '.join(sorted(map(str, datasets))) or 'none'}. Set MATCHED_FINEWEB_REPO_ID to a repo that has it.")
    entry = datasets[dataset]
    where = f"manifest {where}, dataset {dataset}"
    val, available = shard_count(entry, "val", where), shard_count(entry, "train", where)
    if requested is None:
        train = min(DEFAULT_TRAIN_SHARDS, available)
    elif requested > available:
        fail(f"{variant} on {repo_id} has only {available} train shards ({where}); requested {requested}")
    else:
        train = requested
    sidecar = variant in VARIANT_DATASETS or bool(entry.get("val_bytes_glob"))
    return val, train, tokenizer_files(manifest, entry, where), sidecar


def main(argv=None, download=hf_download, file_info=hub_file_info) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.train_shards is not None and args.train_shards_positional is not None:
        parser.error("give the train shard count once (positional N or --train-shards N)")
    requested = args.train_shards if args.train_shards is not None else args.train_shards_positional
    repo_id = os.environ.get("MATCHED_FINEWEB_REPO_ID") or VARIANT_REPOS.get(args.variant, DEFAULT_REPO)
    prefix = os.environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", "datasets")
    fetcher = Fetcher(repo_id, prefix, args.out, download, file_info)
    print(f"variant {args.variant} from dataset repo {repo_id} (prefix {fetcher.prefix!r}) into {args.out}", flush=True)

    manifest, where = load_manifest(fetcher, args.skip_manifest)
    val, train, tokenizer, has_sidecar = plan(manifest, str(where), args.variant, requested, repo_id)
    shard_dir = f"datasets/{dataset_name(args.variant)}"
    shards = [f"{shard_dir}/fineweb_{split}_{i:06d}.bin" for split, n in (("val", val), ("train", train))
              for i in range(n)]
    sidecars = [f"{shard_dir}/fineweb_val_bytes_{i:06d}.bin" for i in range(val if has_sidecar else 0)]
    fetcher.learn_published(shards + sidecars + tokenizer)
    for rel in shards:
        fetcher.ensure(rel, shard_problem)
    for rel in sidecars:
        fetcher.ensure(rel, sidecar_problem)
    for rel in tokenizer:
        fetcher.ensure(rel, tokenizer_problem)
    print(f"done: {val} val + {train} train shards, {len(sidecars)} byte sidecars, {len(tokenizer)} tokenizer files; "
          f"fetched {fetcher.fetched} files ({human(fetcher.fetched_bytes)}), "
          f"{fetcher.skipped} already present ({human(fetcher.skipped_bytes)}); {fetcher.hashed} files hashed\n"
          f"  shards:    {args.out / shard_dir}\n  tokenizer: {', '.join(str(args.out / t) for t in tokenizer)}",
          flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
