"""Build a small, deterministic training corpus in the challenge's FineWeb layout.

Default corpus: English text that ships with every Python installation (the pydoc topic pages
plus the docstrings of the standard library's own modules), so the trainer can run end to end
with no download. JSONL mode turns real-text corpora ({"text": ...} per line, optionally .xz)
into the same layout instead.

Output (paths relative to --out, default <repo>/data):
  datasets/<name>/fineweb_train_000000.bin  (000001... only past --shard-tokens)
  datasets/<name>/fineweb_val_000000.bin
  tokenizers/<tokenizer-name>.model and .vocab

Every document is written as BOS (id 1) followed by its SentencePiece ids; no EOS.
Two builds from the same inputs give byte-identical files.

--caseops builds CaseOps data (data/caseops.py): the tokenizer is trained on transformed text with the four
operators reserved as user-defined pieces, every document is transformed before encoding, and the validation
folder gets a byte sidecar, datasets/<name>/fineweb_val_bytes_000000.bin (the shard layout, its own magic, one
uint16 per validation token: the original UTF-8 bytes it stands for, 0 for BOS and the operators). Its bytes are
those of the text as the tokenizer normalizes it (--byte-convention normalized, the default: the count a tokenizer
without CaseOps gets), or of the raw text (--byte-convention raw: the public CaseOps export's convention, about
0.04 % more bytes; needs the protobuf package); the header records which, and the trainer logs it.

  python3 data/make_sample.py
  python3 data/make_sample.py --jsonl train.jsonl.xz --val-jsonl val.jsonl.xz --name enwiki_sp1024 \\
      --tokenizer-name enwiki_1024_bpe
  python3 data/make_sample.py --caseops     # datasets/sample_sp1024_caseops, tokenizers/sample_1024_bpe_caseops
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import io
import json
import lzma
import sys
import sysconfig
import time
import warnings
from pathlib import Path

import numpy as np
import sentencepiece as spm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # caseops.py beside this file, however it is loaded
import caseops  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "data"
DEFAULT_NAME = "sample_sp1024"
DEFAULT_TOKENIZER_NAME = "sample_1024_bpe"
BOS_ID = 1
WHITESPACE_PIECE = "\u2581"  # SentencePiece's visible space

# Python 3.11 yields 1.6 MB of stdlib docstrings plus 0.5 MB of pydoc topics (460 documents;
# the build takes about 5 s on two cores); the cap keeps it fast should a future Python ship more.
DEFAULT_MAX_TEXT_BYTES = 3_000_000
# 10% of the documents would hold only ~66k validation tokens (8% of the text); 17% of them hold
# 13% of the text, just over 100k tokens.
DEFAULT_VAL_FRACTION = 0.17
MIN_DOC_CHARS = 200  # shorter docstring collections are mostly one-liners, not prose
STDLIB_SKIP_DIRS = {"site-packages", "test", "tests", "idlelib", "lib2to3"}
DOCSTRING_NODES = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)

# The challenge's tokenizer settings. num_threads=1 and no shuffling make training deterministic.
SPM_SETTINGS = dict(
    model_type="bpe", character_coverage=0.999, byte_fallback=True, split_digits=True,
    normalization_rule_name="nmt_nfkc", add_dummy_prefix=False,
    pad_id=0, bos_id=BOS_ID, eos_id=2, unk_id=3, hard_vocab_limit=False,
    num_threads=1, shuffle_input_sentence=False, input_sentence_size=0,
    max_sentence_length=1 << 16,  # the default 4192 bytes would silently drop long paragraphs
    minloglevel=2,  # SentencePiece otherwise logs thousands of lines to stderr
)


# ------------------------------------------------------------------------------------------
# Default corpus: pydoc topics and stdlib docstrings, as (key, text) documents
# ------------------------------------------------------------------------------------------

def topic_documents() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics  # a plain dict of help pages; no import side effects
    return [(f"pydoc_topics:{name}", topics[name].strip()) for name in sorted(topics)]


def module_docstrings(source: str) -> str:
    """Module docstring, then class and function docstrings in source order, blank-line joined."""
    with warnings.catch_warnings():  # old modules trigger invalid-escape warnings; irrelevant here
        warnings.simplefilter("ignore")
        tree = ast.parse(source)
    nodes = sorted((n for n in ast.walk(tree) if isinstance(n, DOCSTRING_NODES)),
                   key=lambda n: (n.lineno, n.col_offset))
    docs = (ast.get_docstring(node) for node in [tree, *nodes])
    return "\n\n".join(d.strip() for d in docs if d and d.strip())


def stdlib_documents(stdlib: Path | None = None) -> list[tuple[str, str]]:
    """One document per stdlib source file, read as text and parsed, never imported."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    documents = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if STDLIB_SKIP_DIRS.intersection(rel.parts[:-1]):
            continue
        try:
            text = module_docstrings(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, SyntaxError, ValueError, OSError):
            continue  # undecodable or unparsable files (e.g. deliberately broken samples)
        if len(text) >= MIN_DOC_CHARS:
            documents.append((f"stdlib:{rel.as_posix()}", text))
    return documents


def sample_documents(max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES) -> list[tuple[str, str]]:
    """The default corpus in a fixed order, cut at a document boundary at max_text_bytes."""
    documents, total = [], 0
    for key, text in topic_documents() + stdlib_documents():
        total += len(text.encode("utf-8"))
        if total > max_text_bytes:
            break
        documents.append((key, text))
    return documents


def is_validation(key: str, val_fraction: float) -> bool:
    """Stable across runs and machines (unlike hash()), and a document's split never depends on
    which other documents are present."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < val_fraction * 2**64


def split_documents(documents, val_fraction: float = DEFAULT_VAL_FRACTION):
    """Split (key, text) documents into train and val text lists, keeping the corpus order."""
    train = [text for key, text in documents if not is_validation(key, val_fraction)]
    val = [text for key, text in documents if is_validation(key, val_fraction)]
    return train, val


# ------------------------------------------------------------------------------------------
# JSONL corpora
# ------------------------------------------------------------------------------------------

def read_jsonl(paths, max_docs: int | None = None) -> list[str]:
    """The "text" of each line of the files, in order; .xz files are decompressed on the fly."""
    texts = []
    for path in map(Path, paths):
        opener = lzma.open if path.suffix == ".xz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if max_docs is not None and len(texts) >= max_docs:
                    return texts
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SystemExit(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise SystemExit(f'{path}:{lineno}: expected a JSON object with a "text" string field')
                if record["text"].strip():
                    texts.append(record["text"])
    return texts


def check_inputs_exist(paths) -> None:
    for path in map(Path, paths):
        if not path.is_file():
            raise SystemExit(f"make_sample: input file not found: {path}")


# ------------------------------------------------------------------------------------------
# Tokenizer and shards
# ------------------------------------------------------------------------------------------

def tokenizer_sentences(texts):
    """SentencePiece trains on lines; nmt_nfkc turns newlines into spaces when encoding anyway."""
    for text in texts:
        for line in text.splitlines():
            if line.strip():
                yield line


def train_tokenizer(texts, vocab_size: int, reserved: tuple[str, ...] = ()) -> bytes:
    """Serialized SentencePiece model trained on texts in order.

    The model comes back through model_writer rather than model_prefix because SentencePiece
    records model_prefix inside the model: a path-dependent prefix would make builds into
    different folders differ."""
    def train(**extra) -> bytes:
        out = io.BytesIO()
        spm.SentencePieceTrainer.Train(sentence_iterator=tokenizer_sentences(texts), model_writer=out,
                                       vocab_size=vocab_size, **SPM_SETTINGS, **extra)
        return out.getvalue()

    model = train(user_defined_symbols=list(reserved)) if reserved else train()
    # The trainer's byte accounting needs the bare space piece. BPE keeps every frequent
    # character, so it is always there for real text; force it for space-free corpora.
    if not has_whitespace_piece(model):
        model = train(user_defined_symbols=[*reserved, WHITESPACE_PIECE])
    if not has_whitespace_piece(model):
        raise SystemExit(f"make_sample: trained tokenizer lacks the bare {WHITESPACE_PIECE!r} piece")
    return model


def has_whitespace_piece(model: bytes) -> bool:
    sp = spm.SentencePieceProcessor(model_proto=model)
    return sp.piece_to_id(WHITESPACE_PIECE) != sp.unk_id()


def vocab_text(sp: spm.SentencePieceProcessor) -> str:
    """The .vocab listing in SentencePiece's own format: piece<TAB>score per line."""
    return "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.vocab_size()))


def encode_documents(sp: spm.SentencePieceProcessor, texts, batch: int = 256) -> np.ndarray:
    """BOS + ids for each document, concatenated, as uint16 (arrays, not lists: a 70 MB corpus
    is ~20M ids, too many for Python ints)."""
    parts = []
    for start in range(0, len(texts), batch):
        for ids in sp.encode(texts[start:start + batch], out_type=int):
            parts.append(np.array([BOS_ID, *ids], dtype=np.uint16))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def encode_caseops_documents(sp: spm.SentencePieceProcessor, texts,
                             convention: str = "normalized") -> tuple[np.ndarray, np.ndarray]:
    """BOS + ids of each transformed document, concatenated, and the original bytes of each of those tokens by the
    byte convention (train_gpt.BYTE_CONVENTIONS)."""
    from train_gpt import byte_tables
    tables, ids, counts = byte_tables(sp), [], []
    for text in texts:
        if convention == "raw":
            doc_ids, doc_counts = caseops.token_raw_bytes(sp, caseops.transform(text))
        else:
            doc_ids = sp.encode(caseops.transform(text), out_type=int)
            doc_counts = caseops.token_original_bytes(sp, tables, doc_ids, BOS_ID)
        ids.append(np.array([BOS_ID, *doc_ids], dtype=np.uint16))
        counts.append(np.array([0, *doc_counts], dtype=np.uint16))
    empty = np.zeros(0, dtype=np.uint16)
    return (np.concatenate(ids) if ids else empty), (np.concatenate(counts) if counts else empty)


def write_split(tokens: np.ndarray, folder: Path, split: str, shard_tokens: int, kind: str = "",
                magic: int | None = None, convention: str | None = None) -> list[Path]:
    """Shards fineweb_{split}_{kind}NNNNNN.bin; kind "bytes_" with the sidecar magic and a byte convention writes a
    byte sidecar."""
    from train_gpt import SHARD_MAGIC, write_shard  # the trainer owns the shard format
    # Shards left by an earlier, larger build would be read as part of this one (a token split's pattern also
    # takes an earlier CaseOps build's sidecar, which this build may not replace).
    for stale in folder.glob(f"fineweb_{split}_{kind}*.bin"):
        stale.unlink()
    paths = []
    for index, start in enumerate(range(0, max(len(tokens), 1), shard_tokens)):
        path = folder / f"fineweb_{split}_{kind}{index:06d}.bin"
        write_shard(path, tokens[start:start + shard_tokens], SHARD_MAGIC if magic is None else magic, convention)
        paths.append(path)
    return paths


def cap_texts(texts, max_docs: int | None, max_bytes: int | None) -> list[str]:
    """Leading documents until max_docs, or until max_bytes of text has been taken."""
    kept, total = [], 0
    for text in texts[:max_docs]:
        if max_bytes is not None and total >= max_bytes:
            break
        kept.append(text)
        total += len(text.encode("utf-8"))
    return kept


def text_bytes(texts) -> int:
    return sum(len(t.encode("utf-8")) for t in texts)


# ------------------------------------------------------------------------------------------
# Build
# ------------------------------------------------------------------------------------------

def build(out=None, name: str = DEFAULT_NAME, tokenizer_name: str = DEFAULT_TOKENIZER_NAME,
          vocab_size: int = 1024, jsonl=None, val_jsonl=None, max_train_docs: int | None = None,
          max_val_docs: int | None = None, tokenizer_train_docs: int | None = None,
          tokenizer_train_bytes: int | None = 20_000_000, shard_tokens: int = 100_000_000,
          val_fraction: float = DEFAULT_VAL_FRACTION, max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES,
          caseops_transform: bool = False, byte_convention: str = "normalized", verbose: bool = True) -> dict:
    """Build the corpus; return its paths and per-split docs/bytes/tokens. Errors raise SystemExit."""
    t0 = time.time()
    if bool(jsonl) != bool(val_jsonl):
        raise SystemExit("make_sample: --jsonl and --val-jsonl must be given together")
    if not 0 < vocab_size <= 1 << 16:
        raise SystemExit(f"make_sample: vocab size {vocab_size} does not fit the uint16 shard format")
    if byte_convention != "normalized" and not caseops_transform:
        raise SystemExit(f"make_sample: --byte-convention {byte_convention} is for the byte sidecar of --caseops "
                         "data; without CaseOps the trainer counts bytes with the tokenizer")
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))

    if jsonl:
        check_inputs_exist([*jsonl, *val_jsonl])
        train, val = read_jsonl(jsonl, max_train_docs), read_jsonl(val_jsonl, max_val_docs)
    else:
        train, val = split_documents(sample_documents(max_text_bytes), val_fraction)
        train, val = train[:max_train_docs], val[:max_val_docs]
    if not train or not val:
        raise SystemExit(f"make_sample: no documents (train {len(train)}, val {len(val)})")

    out = Path(out) if out is not None else DEFAULT_OUT
    dataset_dir, tokenizer_dir = out / "datasets" / name, out / "tokenizers"
    dataset_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_dir.mkdir(parents=True, exist_ok=True)

    tok_texts = cap_texts(train, tokenizer_train_docs, tokenizer_train_bytes)
    if caseops_transform:
        model = train_tokenizer([caseops.transform(t) for t in tok_texts], vocab_size, caseops.CASEOPS_OPERATORS)
    else:
        model = train_tokenizer(tok_texts, vocab_size)
    sp = spm.SentencePieceProcessor(model_proto=model)
    model_path = tokenizer_dir / f"{tokenizer_name}.model"
    vocab_path = tokenizer_dir / f"{tokenizer_name}.vocab"
    model_path.write_bytes(model)
    vocab_path.write_text(vocab_text(sp), encoding="utf-8")

    summary = dict(dataset_dir=dataset_dir, tokenizer_model=model_path, tokenizer_vocab=vocab_path,
                   vocab_size=sp.vocab_size(), caseops=caseops_transform,
                   byte_convention=byte_convention if caseops_transform else None,
                   tokenizer_train=dict(docs=len(tok_texts), bytes=text_bytes(tok_texts)))
    from train_gpt import SIDECAR_MAGIC
    for split, texts in (("train", train), ("val", val)):
        if caseops_transform and split == "val":  # the sidecar is for validation only
            tokens, counts = encode_caseops_documents(sp, texts, byte_convention)
        elif caseops_transform:
            tokens = encode_documents(sp, [caseops.transform(t) for t in texts])
        else:
            tokens = encode_documents(sp, texts)
        shards = write_split(tokens, dataset_dir, split, shard_tokens)
        summary[split] = dict(docs=len(texts), bytes=text_bytes(texts), tokens=int(tokens.size), shards=shards)
        if caseops_transform and split == "val":
            summary[split]["sidecar"] = write_split(counts, dataset_dir, split, shard_tokens, "bytes_", SIDECAR_MAGIC,
                                                    byte_convention)
            summary[split]["sidecar_bytes"] = int(counts.sum(dtype=np.int64))
    summary["seconds"] = round(time.time() - t0, 2)
    if verbose:
        print_summary(summary)
    return summary


def print_summary(s: dict) -> None:
    for split in ("train", "val"):
        d = s[split]
        print(f"{split:5s}: {d['docs']:,} docs, {d['bytes']:,} bytes of text, {d['tokens']:,} tokens "
              f"({d['bytes'] / max(d['tokens'], 1):.2f} bytes/token) -> "
              + ", ".join(str(p) for p in d["shards"]))
        if "sidecar" in d:
            print(f"       byte sidecar: {d['sidecar_bytes']:,} bytes of {s['byte_convention']} original text -> "
                  + ", ".join(str(p) for p in d["sidecar"]))
    t = s["tokenizer_train"]
    print(f"tokenizer: vocab {s['vocab_size']}, trained on {t['docs']:,} train docs ({t['bytes']:,} bytes) "
          f"-> {s['tokenizer_model']}")
    print(f"built in {s['seconds']:.1f} s")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="output root holding datasets/ and tokenizers/ (default: <repo>/data)")
    p.add_argument("--name", default=DEFAULT_NAME, help="dataset folder name (default: %(default)s)")
    p.add_argument("--tokenizer-name", default=DEFAULT_TOKENIZER_NAME,
                   help="tokenizer file stem (default: %(default)s)")
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard at most")
    p.add_argument("--jsonl", nargs="+", metavar="FILE", help="training documents (.jsonl or .jsonl.xz)")
    p.add_argument("--val-jsonl", nargs="+", metavar="FILE", help="validation documents; required with --jsonl")
    p.add_argument("--max-train-docs", type=int, help="use only the first N training documents")
    p.add_argument("--max-val-docs", type=int, help="use only the first N validation documents")
    p.add_argument("--tokenizer-train-docs", type=int,
                   help="train the tokenizer on the first N training documents (default: all)")
    p.add_argument("--tokenizer-train-bytes", type=int, default=20_000_000,
                   help="and on at most about this many bytes of them (default: %(default)s)")
    p.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
                   help="default corpus: share of documents held out for validation (default: %(default)s)")
    p.add_argument("--max-text-bytes", type=int, default=DEFAULT_MAX_TEXT_BYTES,
                   help="default corpus: total text cap (default: %(default)s)")
    p.add_argument("--caseops", action="store_true",
                   help="CaseOps data: transformed text, reserved operators, a validation byte sidecar; the "
                        "default names gain a _caseops suffix")
    p.add_argument("--byte-convention", choices=("normalized", "raw"), default="normalized",
                   help="--caseops: the sidecar counts the bytes of the text as the tokenizer normalizes it "
                        "(normalized, the default) or of the raw text (raw: the public CaseOps export's convention)")
    args = p.parse_args(argv)
    if args.caseops:
        args.name += "_caseops" if args.name == DEFAULT_NAME else ""
        args.tokenizer_name += "_caseops" if args.tokenizer_name == DEFAULT_TOKENIZER_NAME else ""
    if bool(args.jsonl) != bool(args.val_jsonl):
        p.error("--jsonl and --val-jsonl must be given together")
    for path in [*(args.jsonl or []), *(args.val_jsonl or [])]:
        if not Path(path).is_file():
            p.error(f"input file not found: {path}")
    return args


def main(argv=None) -> dict:
    a = parse_args(argv)
    return build(out=a.out, name=a.name, tokenizer_name=a.tokenizer_name, vocab_size=a.vocab_size,
                 jsonl=a.jsonl, val_jsonl=a.val_jsonl, max_train_docs=a.max_train_docs,
                 max_val_docs=a.max_val_docs, tokenizer_train_docs=a.tokenizer_train_docs,
                 tokenizer_train_bytes=a.tokenizer_train_bytes, shard_tokens=a.shard_tokens,
                 val_fraction=a.val_fraction, max_text_bytes=a.max_text_bytes, caseops_transform=a.caseops,
                 byte_convention=a.byte_convention)


if __name__ == "__main__":
    main()
