"""Write the self-extracting train_gpt.py that a record folder ships.

The packed file is two lines: import lzma and base64, then exec the raw-LZMA2 decompression of
a base85 string holding the minified source (docstrings, comments and the knobs' doc= text dropped,
layout normalized by the syntax tree, names kept). Its length is what the trainer counts as code bytes.

    python3 tools/pack_code.py                          # train_gpt.py -> build/train_gpt.py
    python3 tools/pack_code.py --src X.py --out Y.py

Before writing, it proves the packed file is the same program: the payload decodes to the
minified source, and that source parses back to exactly the syntax tree of the original with its
docstrings and knob docs removed (ast.unparse is checked, not trusted).
"""
import argparse
import ast
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
import train_gpt  # noqa: E402


def unpack(packed: str) -> str:
    """The source a packed file executes."""
    if not packed.startswith(train_gpt.PACKED_PREFIX):
        raise ValueError("not a packed train_gpt.py")
    return train_gpt.unpack_source(packed)


def pack_file(src: Path, out: Path) -> dict:
    source = src.read_text(encoding="utf-8")
    packed = train_gpt.pack_source(source)
    inner = unpack(packed)
    if inner != train_gpt.minify_source(source):
        raise SystemExit(f"error: the packed payload of {src} does not decode to its minified source")
    intended = train_gpt.strip_knob_docs(train_gpt.strip_docstrings(ast.parse(source)))  # what minifying drops
    if ast.dump(ast.parse(inner)) != ast.dump(intended):
        raise SystemExit(f"error: minifying {src} changed its syntax tree; ship the raw source instead")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(packed, encoding="utf-8")
    return dict(raw=len(source.encode()), minified=len(inner.encode()), packed=len(packed.encode()))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, default=REPO_ROOT / "train_gpt.py")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "build" / "train_gpt.py")
    args = parser.parse_args(argv)
    sizes = pack_file(args.src, args.out)
    print(f"{args.src}: {sizes['raw']} bytes raw, {sizes['minified']} minified -> {args.out}: {sizes['packed']} bytes packed")


if __name__ == "__main__":
    main()
