"""Print the knob table of docs/knobs.md from train_gpt.Config, so the documentation cannot drift.

    python3 tools/knob_table.py            # print the table
    python3 tools/knob_table.py --check    # exit 1 if docs/knobs.md's table differs
    python3 tools/knob_table.py --write    # replace docs/knobs.md's table with the current one

The table sits between the knob-table:begin and knob-table:end markers of docs/knobs.md.
"""
import argparse
import dataclasses
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
import train_gpt  # noqa: E402

KNOBS_DOC = REPO_ROOT / "docs" / "knobs.md"
BEGIN, END = "<!-- knob-table:begin -->", "<!-- knob-table:end -->"


def number(value) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def accepted(meta) -> str:
    if meta["choices"]:
        return " / ".join(c or "(empty)" for c in meta["choices"])
    if meta["lo"] is None:
        return "text"
    return f"{number(meta['lo'])} .. {number(meta['hi'])}"


def cell(text: str) -> str:
    """A table cell: a bare '|' would end it early."""
    return text.replace("|", "\\|")


def knob_table() -> str:
    presets = (train_gpt.R1061_PRESET, train_gpt.R1081_PRESET, train_gpt.SAMPLE_PRESET)
    rows = ["| knob | default (PRESET=record) | PRESET=r1061 | PRESET=r1081 | PRESET=sample | accepted | meaning |",
            "|---|---|---|---|---|---|---|"]
    for f in dataclasses.fields(train_gpt.Config):
        swapped = " | ".join(f"`{p[f.name]!r}`" if f.name in p else "" for p in presets)
        rows.append(f"| `{f.name}` | `{f.default!r}` | {swapped} | {accepted(f.metadata)} | {cell(f.metadata['doc'])} |")
    return "\n".join(rows)


def documented_table(doc: str) -> str:
    return doc.split(BEGIN, 1)[1].split(END, 1)[0].strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with docs/knobs.md instead of printing")
    parser.add_argument("--write", action="store_true", help="replace docs/knobs.md's table instead of printing")
    args = parser.parse_args()
    if not args.check and not args.write:
        print(knob_table())
        return 0
    doc = KNOBS_DOC.read_text(encoding="utf-8")
    if BEGIN not in doc or END not in doc:
        print(f"docs/knobs.md lacks the {BEGIN} and {END} markers", file=sys.stderr)
        return 1
    if args.write:
        head, rest = doc.split(BEGIN, 1)
        KNOBS_DOC.write_text(f"{head}{BEGIN}\n{knob_table()}\n{END}{rest.split(END, 1)[1]}", encoding="utf-8")
        return 0
    if documented_table(doc) != knob_table():
        print("docs/knobs.md's knob table is out of date: run `python3 tools/knob_table.py --write`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
