"""Bytes per tensor group of an artifact under each coder, beside each group's order-0 entropy.

    python3 tools/compress_report.py logs/RUN.ptz
    python3 tools/compress_report.py logs/RUN.ptz --json report.json

The artifact is decoded (CRCs checked) and its streams rebuilt as train_gpt.py writes them: one byte per
quantized value, the fp16 scales and the fp16 pass-through tensors byte-shuffled. Each group (embedding,
attention, mlp, gate, lqer, scales, passthrough) is concatenated into one stream and coded by brotli
(quality 11), LZMA (train_gpt.py's raw preset 9|extreme), rans (train_gpt.py's context-modelled coder, given the
group's tensors; its side information included; LZMA for the fp16 groups, as in the artifact) and, when the
`lrzip` binary is on PATH, `lrzip -z -L 9` (ZPAQ, what the 1.0611 record used per group). Every coded stream is
decoded again and must equal the input.
The table gives bytes and bits per value for each coder against the order-0 entropy of the group's bytes, and
each coder's encode and decode seconds over all groups; the artifact's own bytes per group, as train_gpt.py
reports them, are in the last column (under rans, its one stream and side information split in proportion to
each group's code length).
"""
import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
import train_gpt as tg  # noqa: E402

GROUPS = ("embedding", "attention", "mlp", "gate", "lqer", "scales", "passthrough")


def group_streams(qm: tg.QuantizedModel) -> dict[str, tuple[bytes, int, list[str]]]:
    """(bytes, values, quantized tensor names) per group: the container's raw streams, each quantized tensor's
    joined to its group's; a group with no tensor is left out."""
    qnames, _, raw = tg.artifact_streams(qm)
    streams: dict[str, tuple[bytes, int, list[str]]] = {}
    for name, data in zip(qnames, raw):
        joined, count, names = streams.get(qm.quantized[name]["group"], (b"", 0, []))
        streams[qm.quantized[name]["group"]] = (joined + data, count + len(data), names + [name])
    for group, data in (("scales", raw[-2]), ("passthrough", raw[-1])):
        if data:
            streams[group] = (data, len(data) // 2, [])  # fp16 values
    return {g: streams[g] for g in GROUPS if g in streams}


def rans_coder(qm: tg.QuantizedModel) -> tuple:
    """(encode, decode) of a group as COMPRESSOR=rans stores it: its tensors' side information (LZMA) and rANS
    stream, or LZMA alone for a stream of fp16 values."""
    def encode(data: bytes, names: list[str]) -> bytes:
        if not names:
            return tg.compress(data, "rans")
        side, stream, _ = tg.rans_encode_quantized(qm, names)
        side = tg.compress(side, "rans")
        return len(side).to_bytes(4, "little") + side + stream

    def decode(coded: bytes, names: list[str]) -> bytes:
        if not names:
            return tg.decompress(coded, "rans")
        cut = 4 + int.from_bytes(coded[:4], "little")
        tensors = [tg.header_entry(qm, n) for n in names]
        return tg.rans_decode_quantized(tensors, tg.decompress(coded[4:cut], "rans"), coded[cut:])

    return encode, decode


def order0_entropy_bytes(data: bytes) -> float:
    """Shannon entropy of the stream's bytes (the int8 values; for fp16 streams, their shuffled bytes), in bytes:
    what a coder that sees each byte alone, with the stream's own histogram, needs at least."""
    if not data:
        return 0.0
    counts = np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256).astype(np.float64)
    p = counts[counts > 0] / len(data)
    return float(-(p * np.log2(p)).sum()) * len(data) / 8


def lrzip_coder() -> tuple | None:
    """(encode, decode) through the lrzip binary, or None where it is not installed."""
    binary = shutil.which("lrzip")
    if binary is None:
        return None

    def run(data: bytes, args: list[str], suffix: str) -> bytes:
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = Path(tmp) / f"in{suffix}", Path(tmp) / "out"
            src.write_bytes(data)
            subprocess.run([binary, *args, "-q", "-f", "-o", str(dst), str(src)], check=True, capture_output=True)
            return dst.read_bytes()

    return (lambda data, _: run(data, ["-z", "-L", "9"], ".bin"), lambda data, _: run(data, ["-d"], ".lrz"))


def coders(qm: tg.QuantizedModel, with_lrzip: bool = True) -> dict[str, tuple]:
    """name -> (encode(data, tensor names), decode(coded, tensor names))."""
    found = {"brotli": (lambda d, _: tg.compress(d, "brotli"), lambda d, _: tg.decompress(d, "brotli")),
             "lzma": (lambda d, _: tg.compress(d, "lzma"), lambda d, _: tg.decompress(d, "lzma")),
             "rans": rans_coder(qm)}
    try:
        tg.check_compressor("brotli")
    except tg.ConfigError:  # optional since rans is the default
        del found["brotli"]
    lrzip = lrzip_coder() if with_lrzip else None
    if lrzip is not None:
        found["lrzip"] = lrzip
    return found


def report(qm: tg.QuantizedModel, artifact_by_group: dict[str, int], with_lrzip: bool = True) -> dict:
    streams, used = group_streams(qm), coders(qm, with_lrzip)
    groups = {}
    seconds = {name: [0.0, 0.0] for name in used}
    for group, (data, values, names) in streams.items():
        row = dict(values=values, raw_bytes=len(data), entropy_bytes=order0_entropy_bytes(data),
                   artifact_bytes=artifact_by_group.get(group, 0), coded={})
        for name, (encode, decode) in used.items():
            t0 = time.perf_counter()
            coded = encode(data, names)
            t1 = time.perf_counter()
            if decode(coded, names) != data:
                raise RuntimeError(f"{name} does not give back the {group} stream it coded")
            seconds[name][0] += t1 - t0
            seconds[name][1] += time.perf_counter() - t1
            row["coded"][name] = len(coded)
        groups[group] = row
    return dict(groups=groups, coders=list(used), lrzip=("lrzip" in used),
                seconds={name: dict(encode=e, decode=d) for name, (e, d) in seconds.items()})


def table(r: dict) -> str:
    names = r["coders"]
    head = ["group", "values", "order-0 entropy B (bits/value)"] + [f"{n} B (bits/value, vs entropy)" for n in names]
    lines = ["| " + " | ".join(head + ["artifact B"]) + " |", "|" + "---|" * (len(head) + 1)]
    totals = dict(values=0, entropy=0.0, artifact=0, **{n: 0 for n in names})
    for group, row in r["groups"].items():
        bits = lambda b: 8 * b / row["values"]  # noqa: E731
        cells = [group, f"{row['values']:,}", f"{row['entropy_bytes']:,.0f} ({bits(row['entropy_bytes']):.3f})"]
        for n in names:
            coded = row["coded"][n]
            over = 100 * (coded / row["entropy_bytes"] - 1) if row["entropy_bytes"] else math.inf
            cells.append(f"{coded:,} ({bits(coded):.3f}, {over:+.1f} %)")
            totals[n] += coded
        lines.append("| " + " | ".join(cells + [f"{row['artifact_bytes']:,}"]) + " |")
        totals["values"] += row["values"]
        totals["entropy"] += row["entropy_bytes"]
        totals["artifact"] += row["artifact_bytes"]
    lines.append("| all | " + " | ".join([f"{totals['values']:,}", f"{totals['entropy']:,.0f}"]
                                         + [f"{totals[n]:,}" for n in names] + [f"{totals['artifact']:,}"]) + " |")
    lines.append("")
    lines += [f"{n}: encode {s['encode']:.2f} s, decode {s['decode']:.2f} s" for n, s in r["seconds"].items()]
    if "brotli" not in names:
        lines.append("brotli: not installed, left out (pip install brotli to compare it)")
    if not r["lrzip"]:
        lines.append("lrzip: not on PATH, left out (apt install lrzip to compare it)")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    try:
        blob = args.artifact.read_bytes()
        qm = tg.decode_artifact(blob, str(args.artifact))
    except (OSError, tg.ArtifactError) as e:
        raise SystemExit(f"error: {e}")
    compressor = tg.COMPRESSORS[tg.ARTIFACT_PREFIX.unpack_from(blob)[1]]
    rewritten, by_group = tg.encode_artifact(qm, compressor)
    if rewritten != blob:
        print("note: re-encoding gives other bytes than the file (written by another version?); the artifact "
              "column is this version's encoding")
    r = report(qm, by_group)
    print(f"{args.artifact}: {len(blob):,} bytes, written with {compressor}")
    print(table(r))
    if args.json:
        args.json.write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
