"""Seconds of the n-gram tilt's hints at the record's scale, and the projection to its evaluation.

    python3 bench/ngram_speed.py DATA_PATH [--targets 47851520] [--ranks 8] [--doc-batch 64]

Builds a stand-in of the challenge's validation stream from the training shards in DATA_PATH: their tokens, repeated
until there are --targets targets (47,851,520 in the challenge's validation set), each repeat through its own
one-to-one map of the ids into 8192 (13-bit ids as the record's tokenizer has, and no context shared between
repeats, so repetition does not flatter the count). Documents are cut at BOS as the trainer cuts them. Then it times
train_gpt.ngram_hints in both scoring orders the trainer uses: stream order (the sliding and chunk TTT passes) and
LoRA TTT's batches of --doc-batch documents; on one rank, and as each of --ranks ranks would compute its share (one
after another here, in parallel there; the slowest share is what a rank waits for). It prints tokens per second, the
hint count, that the shares combine into the one-rank hints, and the projection.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt as tg  # noqa: E402

RECORD_TARGETS = 47_851_520
RECORD_VOCAB = 8192


def stand_in_stream(data_path: Path, targets: int, bos_id: int) -> np.ndarray:
    """`targets` + 1 tokens of the training shards, repeated through a fresh one-to-one id map each time; the BOS id
    keeps its value, so the documents stay where they were."""
    source = np.concatenate([tg.read_shard(f) for f in tg.find_shards(data_path, "train")]).astype(np.int64)
    rng = np.random.default_rng(0)
    vocab = int(source.max()) + 1
    if vocab > RECORD_VOCAB:
        raise SystemExit(f"error: ids up to {vocab - 1} in {data_path}; the stand-in maps ids into {RECORD_VOCAB}")
    pieces, have = [], 0
    while have < targets + 1:
        mapping = rng.permutation(RECORD_VOCAB)[:vocab]
        mapping[mapping == bos_id] = mapping[bos_id]  # the id that would take BOS's value swaps with it
        mapping[bos_id] = bos_id
        pieces.append(mapping[source])
        have += source.size
    return np.concatenate(pieces)[:targets + 1].astype(np.uint16)


def scoring_orders(tokens: np.ndarray, bos_id: int, doc_batch: int) -> dict:
    """(documents in scoring order, units) of the stream order and of LoRA TTT's batches, as the evaluator plans them."""
    spans = tg.document_spans(torch.from_numpy(tokens.astype(np.int64)), bos_id)
    return {name: tg.scoring_order(spans, name, doc_batch) for name in ("stream", "lora")}


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_path", type=Path)
    parser.add_argument("--targets", type=int, default=RECORD_TARGETS)
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--doc-batch", type=int, default=64)
    parser.add_argument("--order", type=int, default=tg.knob_fields()["NGRAM_ORDER"].default)
    parser.add_argument("--threshold", type=float, default=tg.knob_fields()["NGRAM_THRESHOLD"].default)
    args = parser.parse_args(argv)
    bos_id = tg.knob_fields()["BOS_ID"].default
    tokens = stand_in_stream(args.data_path, args.targets, bos_id)
    print(f"stand-in: {args.targets:,} targets from {args.data_path}, ids mapped into {RECORD_VOCAB}", flush=True)
    for name, (docs, units) in scoring_orders(tokens, bos_id, args.doc_batch).items():
        hints, one = timed(tg.ngram_hints, tokens, docs, units, args.order, args.threshold)
        shares = [timed(tg.ngram_hints, tokens, docs, units, args.order, args.threshold, args.ranks, r)
                  for r in range(args.ranks)]
        combined = np.array_equal(np.maximum.reduce([h for h, _ in shares]), hints)
        slowest = max(s for _, s in shares)
        count = int((hints >= 0).sum())
        print(f"{name} order ({len(docs):,} documents, {units[-1] + 1:,} units): {count:,} hints "
              f"({100 * count / args.targets:.3f}%); one rank {one:.2f}s ({args.targets / one / 1e6:.1f}M targets/s); "
              f"{args.ranks} ranks: slowest share {slowest:.2f}s, mean {np.mean([s for _, s in shares]):.2f}s; "
              f"shares combine into the one-rank hints: {combined}", flush=True)
        if not combined:
            return 1
        scale = RECORD_TARGETS / args.targets
        print(f"  projection for {RECORD_TARGETS:,} targets on {args.ranks} ranks at this core's speed: "
              f"{slowest * scale:.1f}s plus one all-reduce of {4 * RECORD_TARGETS / 1e6:.0f} MB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
