"""Print the README's knob table from train_gpt.Config, so the documentation cannot drift.

    python3 tools/knob_table.py            # print the table
    python3 tools/knob_table.py --check    # exit 1 if README.md's table differs
    python3 tools/knob_table.py --write    # replace README.md's table with the current one
"""
import argparse
import dataclasses
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
import train_gpt  # noqa: E402

BEGIN, END = "<!-- knob-table:begin -->", "<!-- knob-table:end -->"


def number(value) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def accepted(meta) -> str:
    if meta["choices"]:
        return " / ".join(meta["choices"])
    if meta["lo"] is None:
        return "text"
    return f"{number(meta['lo'])} .. {number(meta['hi'])}"


def knob_table() -> str:
    sample = train_gpt.SAMPLE_PRESET
    rows = ["| knob | default | PRESET=sample | accepted | meaning |", "|---|---|---|---|---|"]
    for f in dataclasses.fields(train_gpt.Config):
        preset = sample.get(f.name, "")
        rows.append(f"| `{f.name}` | `{f.default!r}` | {f'`{preset!r}`' if preset != '' else ''} | "
                    f"{accepted(f.metadata)} | {f.metadata['doc']} |")
    return "\n".join(rows)


def readme_table(readme: str) -> str:
    return readme.split(BEGIN, 1)[1].split(END, 1)[0].strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with README.md instead of printing")
    parser.add_argument("--write", action="store_true", help="replace README.md's table instead of printing")
    args = parser.parse_args()
    readme = (REPO_ROOT / "README.md").read_text()
    if args.write:
        head, rest = readme.split(BEGIN, 1)
        (REPO_ROOT / "README.md").write_text(f"{head}{BEGIN}\n{knob_table()}\n{END}{rest.split(END, 1)[1]}")
        return 0
    if not args.check:
        print(knob_table())
        return 0
    if readme_table(readme) != knob_table():
        print("README.md's knob table is out of date: paste the output of `python3 tools/knob_table.py`",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
