"""Is validation text in the training shards? Find out before a run trains on it.

    python3 tools/check_overlap.py data/datasets/fineweb10B_sp8192
    python3 tools/check_overlap.py DATA_PATH --tokenizer data/tokenizers/fineweb_8192_bpe.model --workers 8

Splits the validation shards into documents at the BOS token and looks for them in the training shards in two
ways: an exact copy (the same tokens between two BOS), and any shared span of --window tokens (default 64: every
window of every validation document is looked up at every position of the training stream). Prints how many
validation documents and tokens are affected, the first few examples (decoded with --tokenizer), and the scan's
throughput. Saves the result beside the data as overlap_check.json, keyed by the shards' names, sizes and
modification times, so a changed shard makes it stale: the trainer logs it and tools/make_record.py refuses a
record whose data overlaps. Exits 1 if it found any overlap, 0 if none, 2 on an error.

How: every window of the validation documents is hashed (a polynomial hash mod 2**64, computed for a whole chunk
with one cumulative sum) into a sorted array behind a Bloom filter; the training shards are streamed in chunks of
4M tokens, every window's hash is looked up, and every hit is confirmed by comparing tokens, so no count comes
from a hash collision. Whole documents are hashed the same way, across chunk and shard boundaries. Memory grows
with the validation set (about 3 GB at peak for the challenge's 47.85M validation tokens), not with the training
set; one worker scans 23-30M training tokens/s (measured on a shared 2-core machine: 128 shards of 100M tokens
in 7-9 minutes), and --workers scans shards in parallel.
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt  # noqa: E402

VERSION = 1
RESULT_NAME = train_gpt.OVERLAP_RESULT
DEFAULT_WINDOW = 64
DEFAULT_BOS_ID = train_gpt.knob_fields()["BOS_ID"].default  # the challenge tokenizers start documents with <s>
CHUNK_TOKENS = 1 << 22  # tokens hashed at once: ~200 MB of temporaries, and few enough Python steps
PREFILTER_BITS_PER_WINDOW = 16  # Bloom filter bits per window, at least: 128 MB for the challenge's 47.85M
VERIFY_BATCH = 1 << 15  # rows of tokens compared at once when confirming hash hits
MASK64 = (1 << 64) - 1
PROJECTION_TOKENS = 128 * 100_000_000  # the largest public export: 128 training shards of 100M tokens


# ----------------------------------------------------------------------------------------------------------------
# The saved result (train_gpt.py reads it: overlap_check, keyed by shard_fingerprints)
# ----------------------------------------------------------------------------------------------------------------

shard_fingerprints, read_overlap_result = train_gpt.shard_fingerprints, train_gpt.overlap_check


def save_result(data_path: Path, result: dict) -> Path:
    """Write overlap_check.json atomically (a reader never sees half a file)."""
    path = Path(data_path) / RESULT_NAME
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Shards
# ----------------------------------------------------------------------------------------------------------------

class CheckError(Exception):
    """A problem with the inputs: the message names the file or option and the fix."""


class TrainingStream:
    """The training shards as the trainer reads them: one stream, documents running on across shard boundaries."""

    def __init__(self, files: list[Path]):
        self.names = [f.name for f in files]
        self.shards = [train_gpt.read_shard(f) for f in files]
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])  # stream position of each shard's start

    def read(self, start: int, count: int) -> np.ndarray:
        """Tokens [start, start + count) of the stream, clipped to it."""
        start, end = max(start, 0), min(start + count, int(self.offsets[-1]))
        parts = []
        for i in range(int(np.searchsorted(self.offsets, start, side="right")) - 1, len(self.shards)):
            if start >= end:
                break
            local = start - int(self.offsets[i])
            parts.append(np.asarray(self.shards[i][local:local + end - start]))
            start += len(parts[-1])
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)

    def locate(self, position: int) -> tuple[str, int]:
        """(shard name, position inside it) of a stream position."""
        i = min(max(int(np.searchsorted(self.offsets, position, side="right")) - 1, 0), len(self.shards) - 1)
        return self.names[i], position - int(self.offsets[i])


# ----------------------------------------------------------------------------------------------------------------
# Hashing: polynomial hashes mod 2**64, position-independent, computed for a whole chunk with a cumulative sum
# ----------------------------------------------------------------------------------------------------------------

class SpanHasher:
    """hash(x[s:e]) = sum_k TABLE[x[s + k]] * BASE**k mod 2**64. The random table spreads token ids over all 64
    bits; with C = cumsum(TABLE[x] * BASE**i), any span's hash is (C[e] - C[s]) * BASE**-s (BASE is odd, so it has
    an inverse mod 2**64), and two halves join as hash(a) + BASE**len(a) * hash(b)."""

    def __init__(self, seed: int = 0, max_tokens: int = CHUNK_TOKENS + DEFAULT_WINDOW - 1):
        rng = np.random.default_rng(seed)
        self.table = np.frombuffer(rng.bytes(8 * 65536), dtype=np.uint64).copy()
        self.base = int.from_bytes(rng.bytes(8), "little") | 1
        self.powers = self._running_powers(self.base, max_tokens + 1)
        self.inverse_powers = self._running_powers(pow(self.base, -1, 1 << 64), max_tokens + 1)

    @staticmethod
    def _running_powers(base: int, count: int) -> np.ndarray:
        factors = np.full(count, base, dtype=np.uint64)
        factors[0] = 1
        return np.cumprod(factors)  # wraps mod 2**64, as intended

    def prefix_sums(self, tokens: np.ndarray) -> np.ndarray:
        """C[k] = sum_{i<k} TABLE[tokens[i]] * BASE**i (len(tokens) + 1 values)."""
        n = len(tokens)
        if n >= len(self.powers):
            raise ValueError(f"{n} tokens exceed the hasher's {len(self.powers) - 1}")
        terms = self.table[tokens]
        np.multiply(terms, self.powers[:n], out=terms)
        sums = np.empty(n + 1, dtype=np.uint64)
        sums[0] = 0
        np.cumsum(terms, out=sums[1:])
        return sums

    def windows(self, sums: np.ndarray, window: int) -> np.ndarray:
        """Hash of every `window`-token span, by start position."""
        count = len(sums) - window
        if count <= 0:
            return np.zeros(0, dtype=np.uint64)
        hashes = sums[window:] - sums[:count]
        hashes *= self.inverse_powers[:count]
        return hashes

    def spans(self, sums: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        return (sums[ends] - sums[starts]) * self.inverse_powers[starts]

    def join(self, first: int, first_length: int, second: int) -> int:
        return (first + pow(self.base, first_length, 1 << 64) * second) & MASK64


@dataclass
class Chunk:
    tokens: np.ndarray  # the window-1 tokens carried over from before, then the chunk
    offset: int  # stream position of tokens[0]
    window_hashes: np.ndarray  # hash of tokens[i:i + window] for every i that has a whole window
    doc_hashes: np.ndarray  # documents that ended in this chunk (content after their BOS): hashes,
    doc_starts: np.ndarray  # stream positions of their first tokens,
    doc_lengths: np.ndarray  # and lengths


class StreamScan:
    """Hashes one token stream chunk by chunk: every window, and every document between two BOS (documents cross
    chunks). The tokens before the first BOS become `head` (hash, length), those after the last `tail` (hash,
    length, start): a caller joins them across shards, or counts them as documents of their own."""

    def __init__(self, hasher: SpanHasher, window: int, bos_id: int):
        self.hasher, self.window, self.bos_id = hasher, window, bos_id
        self.chunk_tokens = len(hasher.powers) - window  # the longest span the hasher takes, less the carried tokens
        self.head: tuple[int, int] | None = None
        self.tail: tuple[int, int, int] | None = None
        self._open = (0, 0, 0)  # the document being read: hash, length, start
        self._bos_seen = False

    def chunks(self, tokens: np.ndarray, prefix: np.ndarray | None = None):
        """Yield a Chunk per chunk_tokens of `tokens` (a memmap is read chunk by chunk). `prefix`, the tokens just
        before the stream, only adds the windows that start in it and end in the stream."""
        keep = self.window - 1  # tokens carried into the next chunk, so windows across the seam are hashed once
        carry = np.zeros(0, dtype=np.uint16) if prefix is None or keep == 0 else np.asarray(prefix[len(prefix) - keep:])
        for pos in range(0, max(len(tokens), 1), self.chunk_tokens):
            fresh = np.asarray(tokens[pos:pos + self.chunk_tokens])
            chunk_tokens = np.concatenate([carry, fresh])
            offset = pos - len(carry)
            sums = self.hasher.prefix_sums(chunk_tokens)
            docs = self._documents(chunk_tokens, sums, len(carry), offset)
            yield Chunk(chunk_tokens, offset, self.hasher.windows(sums, self.window), *docs)
            carry = chunk_tokens[max(0, len(chunk_tokens) - keep):] if keep else chunk_tokens[:0]
        if self._bos_seen:
            self.tail = self._open
        else:
            self.head = self._open[:2]

    def _documents(self, tokens: np.ndarray, sums: np.ndarray, fresh_from: int, offset: int):
        """Hash the content (BOS left out) of every document that ends in tokens[fresh_from:]."""
        bos = np.flatnonzero(tokens[fresh_from:] == self.bos_id) + fresh_from
        starts = np.concatenate([[fresh_from], bos + 1])
        ends = np.concatenate([bos, [len(tokens)]])
        hashes = self.hasher.spans(sums, starts, ends)
        lengths = ends - starts
        open_hash, open_length, open_start = self._open
        open_hash = self.hasher.join(open_hash, open_length, int(hashes[0]))
        open_length += int(lengths[0])
        if bos.size == 0:
            self._open = (open_hash, open_length, open_start)
            return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        done_hashes = np.concatenate([np.array([open_hash], dtype=np.uint64), hashes[1:-1]])
        done_starts = np.concatenate([[open_start], offset + starts[1:-1]]).astype(np.int64)
        done_lengths = np.concatenate([[open_length], lengths[1:-1]]).astype(np.int64)
        if not self._bos_seen:  # what came before the first BOS is the head, not a document of this stream
            self.head, self._bos_seen = (open_hash, open_length), True
            done_hashes, done_starts, done_lengths = done_hashes[1:], done_starts[1:], done_lengths[1:]
        self._open = (int(hashes[-1]), int(lengths[-1]), offset + int(starts[-1]))
        return done_hashes, done_starts, done_lengths


# ----------------------------------------------------------------------------------------------------------------
# The validation set, indexed
# ----------------------------------------------------------------------------------------------------------------

class HashCollision(Exception):
    """Two different validation spans share a hash (about one chance in 16,000 on the full set): rehash."""


def argsort_hashes(hashes: np.ndarray) -> np.ndarray:
    """np.argsort(hashes, kind="stable"), ten times faster: one plain sort of keys that carry each entry's index in
    their low bits, then a stable argsort of only the entries those bits displaced (ties on the rest of the hash)."""
    count = len(hashes)
    bits = max(1, (count - 1).bit_length())
    low = np.uint64((1 << bits) - 1)
    keys = hashes & ~low
    keys |= np.arange(count, dtype=np.uint64)
    keys.sort()
    order = (keys & low).astype(np.int64)
    keys >>= np.uint64(bits)
    tied = np.flatnonzero(keys[1:] == keys[:-1])
    del keys
    if tied.size:
        members = np.union1d(tied, tied + 1)  # whole runs of equal truncated hash, in place
        subset = order[members]
        order[members] = subset[np.argsort(hashes[subset], kind="stable")]
    return order


def first_occurrences(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.unique(values, return_index=True) for small non-negative integers, by one plain sort of keys that carry
    each entry's index in their low bits."""
    if not len(values):
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    bits = np.uint64(max(1, (len(values) - 1).bit_length()))
    keys = values.astype(np.uint64) << bits
    keys |= np.arange(len(values), dtype=np.uint64)
    keys.sort()
    distinct = keys >> bits
    first = np.ones(len(keys), dtype=bool)
    first[1:] = distinct[1:] != distinct[:-1]
    return distinct[first].astype(np.int64), (keys[first] & ((np.uint64(1) << bits) - np.uint64(1))).astype(np.int64)


def group_by_hash(hashes: np.ndarray):
    """(sorted distinct hashes, index of each one's first occurrence, each entry's group)."""
    order = argsort_hashes(hashes)
    ordered = hashes[order]
    first = np.ones(len(ordered), dtype=bool)
    first[1:] = ordered[1:] != ordered[:-1]
    distinct = ordered[first]
    del ordered
    index_type = np.int32 if len(hashes) < 2 ** 31 else np.int64
    groups = np.cumsum(first, dtype=index_type)
    groups -= 1
    inverse = np.empty(len(hashes), dtype=index_type)
    inverse[order] = groups
    return distinct, order[first], inverse


class Prefilter:
    """A blocked Bloom filter in front of the sorted hashes: each validation window sets three bits in the one 64-bit
    word its hash's top bits pick, so a lookup costs one memory access, and fewer than one in 150 lookups of a
    window that is not there go on to the binary search. Which three bits: a table of 65,536 three-bit masks, indexed by
    hash bits 14-29 (the word index uses bits 32 and up)."""

    def __init__(self, sorted_hashes: np.ndarray, bits_per_entry: int = PREFILTER_BITS_PER_WINDOW, seed: int = 0):
        word_bits = max(1, int(np.ceil(np.log2(max(len(sorted_hashes) * bits_per_entry / 64, 2)))))
        self.shift = np.uint64(64 - word_bits)
        self.words = np.zeros(1 << word_bits, dtype=np.uint64)
        rng = np.random.default_rng(seed)
        bits = np.argsort(rng.random((65536, 64)), axis=1)[:, :3].astype(np.uint64)  # three distinct bits per mask
        self.masks = np.bitwise_or.reduce(np.left_shift(np.uint64(1), bits), axis=1)
        for lo in range(0, len(sorted_hashes), CHUNK_TOKENS):  # in slices, to bound the temporaries
            part = sorted_hashes[lo:lo + CHUNK_TOKENS]
            word = part >> self.shift  # sorted, so each word's entries are neighbours
            firsts = np.flatnonzero(np.concatenate([[True], word[1:] != word[:-1]]))
            self.words[word[firsts]] |= np.bitwise_or.reduceat(self._flags(part), firsts)

    def _flags(self, hashes: np.ndarray, scratch: np.ndarray | None = None) -> np.ndarray:
        scratch = np.empty(len(hashes), dtype=np.int64) if scratch is None else scratch
        np.right_shift(hashes, np.uint64(14), out=scratch, casting="unsafe")
        scratch &= 0xFFFF
        return self.masks.take(scratch)

    def candidates(self, hashes: np.ndarray) -> np.ndarray:
        """Indices of the hashes that may be in the set."""
        scratch = np.empty(len(hashes), dtype=np.int64)
        np.right_shift(hashes, self.shift, out=scratch, casting="unsafe")
        words = self.words.take(scratch)
        flags = self._flags(hashes, scratch)
        words &= flags
        return np.flatnonzero(words == flags)


def same_windows(tokens: np.ndarray, starts: np.ndarray, other: np.ndarray, other_starts: np.ndarray,
                 width: int) -> np.ndarray:
    """For each i, whether tokens[starts[i]:+width] == other[other_starts[i]:+width]. Pairs that advance in step
    (both starts one past the previous pair's, as the windows of a copied passage do) share one comparison of their
    union, so confirming a copied document costs about one comparison per token, not `width`."""
    same = np.zeros(len(starts), dtype=bool)
    for lo in range(0, len(starts), VERIFY_BATCH):
        a, b = starts[lo:lo + VERIFY_BATCH].astype(np.int64), other_starts[lo:lo + VERIFY_BATCH].astype(np.int64)
        new_run = np.ones(len(a), dtype=bool)
        new_run[1:] = (a[1:] != a[:-1] + 1) | (b[1:] != b[:-1] + 1)
        first = np.flatnonzero(new_run)
        compared = np.diff(np.append(first, len(a))) + width - 1  # tokens compared per run
        run_offsets = np.concatenate([[0], np.cumsum(compared)[:-1]])
        step = np.arange(compared.sum()) - np.repeat(run_offsets, compared)
        differs = tokens[np.repeat(a[first], compared) + step] != other[np.repeat(b[first], compared) + step]
        differing = np.concatenate([[0], np.cumsum(differs)])
        run = np.cumsum(new_run) - 1
        window_starts = run_offsets[run] + np.arange(len(a)) - first[run]
        same[lo:lo + VERIFY_BATCH] = differing[window_starts + width] == differing[window_starts]
    return same


class ValidationIndex:
    """Every validation document (content after its BOS) and every window inside one, grouped by hash, with a
    found flag per distinct window and per distinct document."""

    def __init__(self, tokens: np.ndarray, window: int, bos_id: int, hasher: SpanHasher):
        self.tokens, self.window, self.bos_id, self.hasher = tokens, window, bos_id, hasher
        index_type = np.int32 if len(tokens) < 2 ** 31 else np.int64
        scan = StreamScan(hasher, window, bos_id)
        window_hashes, window_starts, doc_hashes, doc_starts, doc_lengths = [], [], [], [], []
        for chunk in scan.chunks(tokens):
            has_bos = np.concatenate([[0], np.cumsum(chunk.tokens == bos_id)])
            inside = has_bos[window:] == has_bos[:len(has_bos) - window]  # windows within one document
            window_hashes.append(chunk.window_hashes[inside])
            window_starts.append((chunk.offset + np.flatnonzero(inside)).astype(index_type))
            doc_hashes.append(chunk.doc_hashes)
            doc_starts.append(chunk.doc_starts)
            doc_lengths.append(chunk.doc_lengths)
        head_hash, head_length = scan.head
        doc_hashes.insert(0, np.array([head_hash], dtype=np.uint64))
        doc_starts.insert(0, np.array([0]))
        doc_lengths.insert(0, np.array([head_length]))
        if scan.tail is not None:
            doc_hashes.append(np.array([scan.tail[0]], dtype=np.uint64))
            doc_starts.append(np.array([scan.tail[2]]))
            doc_lengths.append(np.array([scan.tail[1]]))
        lengths = np.concatenate(doc_lengths).astype(np.int64)
        keep = lengths > 0  # BOS followed by BOS holds no text
        self.doc_starts = np.concatenate(doc_starts).astype(np.int64)[keep]
        self.doc_lengths = lengths[keep]
        self.doc_unique, self.doc_rep, self.doc_group = group_by_hash(np.concatenate(doc_hashes)[keep])
        self._check_documents()
        self.window_starts = np.concatenate(window_starts)
        del window_starts
        hashes = np.concatenate(window_hashes)
        del window_hashes
        self.window_unique, rep, self.window_group = group_by_hash(hashes)
        del hashes
        self.window_rep = self.window_starts[rep]
        self._check_windows()
        self.prefilter = Prefilter(self.window_unique)
        self.window_found = np.zeros(len(self.window_unique), dtype=bool)
        self.doc_found = np.zeros(len(self.doc_unique), dtype=bool)

    def _check_windows(self) -> None:
        """Every window whose hash another one has first must have its tokens too."""
        members = np.flatnonzero(self.window_starts != self.window_rep[self.window_group])
        if not same_windows(self.tokens, self.window_starts[members], self.tokens,
                            self.window_rep[self.window_group[members]], self.window).all():
            raise HashCollision

    def _check_documents(self) -> None:
        reps = self.doc_rep[self.doc_group]
        for doc in np.flatnonzero(reps != np.arange(len(reps))):
            if not self.same_document(self.tokens, int(self.doc_starts[doc]), int(self.doc_lengths[doc]),
                                      int(reps[doc])):
                raise HashCollision

    def same_document(self, tokens: np.ndarray, start: int, length: int, doc: int) -> bool:
        other = int(self.doc_starts[doc])
        return length == self.doc_lengths[doc] and np.array_equal(tokens[start:start + length],
                                                                  self.tokens[other:other + length])

    def match_windows(self, chunk: Chunk) -> tuple[np.ndarray, np.ndarray]:
        """(distinct validation windows first confirmed in this chunk, the first chunk position where each occurs)."""
        positions = self.prefilter.candidates(chunk.window_hashes)
        hashes = chunk.window_hashes[positions]
        by_hash = argsort_hashes(hashes)  # sorted lookups walk the table once
        found = np.minimum(np.searchsorted(self.window_unique, hashes[by_hash]), len(self.window_unique) - 1)
        groups = np.empty_like(found)
        groups[by_hash] = found  # back in position order: a copied passage's windows advance in step
        hit = self.window_unique[groups] == hashes
        hit &= ~self.window_found[groups]  # confirmed once is enough
        positions, groups = positions[hit], groups[hit]
        same = same_windows(chunk.tokens, positions, self.tokens, self.window_rep[groups], self.window)
        groups, first = first_occurrences(groups[same])
        self.window_found[groups] = True
        return groups, positions[same][first]

    def match_documents(self, hashes: np.ndarray, lengths: np.ndarray, read_tokens) -> list[tuple[int, int]]:
        """(distinct validation document, k) for each training document k (by hash and length) first confirmed
        equal to a validation document: read_tokens(k) gives its tokens."""
        if not len(self.doc_unique) or not len(hashes):
            return []
        groups = np.minimum(np.searchsorted(self.doc_unique, hashes), len(self.doc_unique) - 1)
        maybe = np.flatnonzero((self.doc_unique[groups] == hashes) & (lengths > 0))
        found = []
        for k in maybe.tolist():
            group = int(groups[k])
            rep = int(self.doc_rep[group])
            if self.doc_found[group] or lengths[k] != self.doc_lengths[rep]:
                continue
            start = int(self.doc_starts[rep])
            if np.array_equal(read_tokens(k), self.tokens[start:start + int(lengths[k])]):
                self.doc_found[group] = True
                found.append((group, k))
        return found

    def figures(self) -> dict:
        """The overlap counts, from the found flags."""
        docs, tokens = len(self.doc_starts), int(self.doc_lengths.sum())
        exact_docs = self.doc_found[self.doc_group]
        window_hit = self.window_found[self.window_group]
        hit_starts = self.window_starts[window_hit].astype(np.int64)
        covered_by_windows = coverage(len(self.tokens), hit_starts, hit_starts + self.window)
        doc_ends = self.doc_starts + self.doc_lengths
        exact_coverage = coverage(len(self.tokens), self.doc_starts[exact_docs], doc_ends[exact_docs])
        window_docs = np.zeros(docs, dtype=bool)
        window_docs[np.searchsorted(self.doc_starts, hit_starts, side="right") - 1] = True
        overlapping_docs = int((exact_docs | window_docs).sum())
        overlapping_tokens = int((covered_by_windows | exact_coverage).sum())
        return dict(val_documents=docs, val_tokens=tokens,
                    exact_documents=int(exact_docs.sum()), window_documents=int(window_docs.sum()),
                    window_tokens=int(covered_by_windows.sum()),
                    overlapping_documents=overlapping_docs, overlapping_tokens=overlapping_tokens,
                    overlapping_document_share=overlapping_docs / docs if docs else 0.0,
                    overlapping_token_share=overlapping_tokens / tokens if tokens else 0.0,
                    overlap=overlapping_docs > 0)


def coverage(size: int, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Boolean mask of the positions inside any [start, end)."""
    edges = np.bincount(starts, minlength=size + 1)[:size + 1] - np.bincount(ends, minlength=size + 1)[:size + 1]
    return np.cumsum(edges[:-1]) > 0


# ----------------------------------------------------------------------------------------------------------------
# Scanning the training shards
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class ShardResult:
    index: int
    tokens: int
    seconds: float
    windows: np.ndarray  # distinct validation windows first found in this shard
    window_positions: np.ndarray  # a stream position where each occurs
    documents: list = field(default_factory=list)  # (distinct validation document, stream position) found whole
    head: tuple = (0, 0)  # hash and length of the tokens before the shard's first BOS
    tail: tuple | None = None  # hash, length and stream position of those after its last BOS (None: no BOS)


@dataclass
class ScanContext:
    index: ValidationIndex
    stream: TrainingStream
    window: int
    bos_id: int


_CONTEXT: ScanContext | None = None  # what forked workers inherit


def scan_shard(shard_index: int, context: ScanContext | None = None) -> ShardResult:
    """Look up every window and every whole document of one training shard (and the windows that start in the
    window-1 tokens before it) in the validation index."""
    context = context or _CONTEXT
    started = time.perf_counter()
    stream, index = context.stream, context.index
    tokens, shard_start = stream.shards[shard_index], int(stream.offsets[shard_index])
    scan = StreamScan(index.hasher, context.window, context.bos_id)
    found_windows, found_positions, documents = [], [], []
    for chunk in scan.chunks(tokens, stream.read(shard_start - (context.window - 1), context.window - 1)):
        groups, positions = index.match_windows(chunk)
        found_windows.append(groups)
        found_positions.append(positions + chunk.offset + shard_start)
        starts, lengths = chunk.doc_starts, chunk.doc_lengths
        for group, k in index.match_documents(chunk.doc_hashes, lengths,
                                              lambda k: tokens[starts[k]:starts[k] + lengths[k]]):
            documents.append((group, shard_start + int(starts[k])))
    tail = None if scan.tail is None else (scan.tail[0], scan.tail[1], shard_start + scan.tail[2])
    return ShardResult(shard_index, len(tokens), time.perf_counter() - started, np.concatenate(found_windows),
                       np.concatenate(found_positions), documents, scan.head, tail)


def scan_all(context: ScanContext, workers: int, progress) -> list[ShardResult]:
    """Every shard, in a pool of forked workers (they share the index) or in this process."""
    global _CONTEXT
    count = len(context.stream.shards)
    workers = max(1, min(workers, count))
    if workers > 1 and "fork" not in multiprocessing.get_all_start_methods():
        workers = 1  # the index is shared by forking; without fork, one process
    results = []
    if workers == 1:
        for i in range(count):
            results.append(scan_shard(i, context))
            progress(results[-1], len(results), count)
        return results
    _CONTEXT = context
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for result in pool.imap_unordered(scan_shard, range(count)):
                context.index.window_found[result.windows] = True  # each worker flagged only its own finds
                context.index.doc_found[[group for group, _ in result.documents]] = True
                results.append(result)
                progress(result, len(results), count)
    finally:
        _CONTEXT = None
    return sorted(results, key=lambda r: r.index)


def documents_across_shards(context: ScanContext, results: list[ShardResult]) -> list[tuple[int, int]]:
    """Join the documents that cross shard boundaries (a shard's head continues the document open before it) and
    look them up too; the stream's first document starts at its first token. Returns (distinct validation
    document, stream position) for each one found."""
    hashes, lengths, starts = [], [], []
    open_hash, open_length, open_start = 0, 0, 0
    for result in results:
        open_hash = context.index.hasher.join(open_hash, open_length, result.head[0])
        open_length += result.head[1]
        if result.tail is not None:  # the shard has a BOS: the open document ended there
            hashes.append(open_hash), lengths.append(open_length), starts.append(open_start)
            open_hash, open_length, open_start = result.tail
    hashes.append(open_hash), lengths.append(open_length), starts.append(open_start)
    found = context.index.match_documents(np.array(hashes, dtype=np.uint64), np.array(lengths),
                                          lambda k: context.stream.read(starts[k], lengths[k]))
    return [(group, starts[k]) for group, k in found]


# ----------------------------------------------------------------------------------------------------------------
# Examples and the report
# ----------------------------------------------------------------------------------------------------------------

def shared_span(context: ScanContext, val_start: int, train_start: int) -> tuple[int, int, int]:
    """The longest run of validation tokens around val_start, inside its document, that the training stream repeats
    at the same alignment (val_start matched train_start): (validation start, end, training start)."""
    index = context.index
    doc = int(np.searchsorted(index.doc_starts, val_start, side="right") - 1)
    doc_start, doc_end = int(index.doc_starts[doc]), int(index.doc_starts[doc] + index.doc_lengths[doc])
    before = min(val_start - doc_start, train_start)  # the training stream may start inside the document
    train = context.stream.read(train_start - before, before + doc_end - val_start)
    val = index.tokens[val_start - before:val_start - before + len(train)]
    equal = val == train
    left = right = before
    while left > 0 and equal[left - 1]:
        left -= 1
    while right < len(equal) and equal[right]:
        right += 1
    return val_start - before + left, val_start - before + right, train_start - before + left


def collect_examples(context: ScanContext, results: list[ShardResult], crossing: list, limit: int) -> list[dict]:
    """Up to `limit` overlapping validation documents, in the order training reaches them, with the span shared."""
    index = context.index
    hits = [(position, int(index.doc_starts[index.doc_rep[group]]), "exact copy")
            for group, position in crossing + [d for r in results for d in r.documents]]
    for result in results:  # each document's first shared window in the shard
        order = np.argsort(result.window_positions, kind="stable")
        val_starts = index.window_rep[result.windows[order]]
        docs = np.searchsorted(index.doc_starts, val_starts, side="right")
        _, first = np.unique(docs, return_index=True)
        for k in np.sort(first)[:limit]:
            hits.append((int(result.window_positions[order[k]]), int(val_starts[k]), "shared span"))
    examples, docs_seen = [], set()
    for train_position, val_start, kind in sorted(hits):
        doc = int(np.searchsorted(index.doc_starts, val_start, side="right") - 1)
        if doc in docs_seen:
            continue
        docs_seen.add(doc)
        start, end, train_start = shared_span(context, val_start, train_position)
        shard, position = context.stream.locate(train_start)
        doc_start = int(index.doc_starts[doc])
        examples.append(dict(kind=kind, val_document=doc, val_document_tokens=int(index.doc_lengths[doc]),
                             val_span=[start - doc_start, end - doc_start], train_shard=shard,
                             train_position=position))
        if len(examples) == limit:
            break
    return examples


def decode(tokenizer, tokens: np.ndarray, width: int = 160) -> str:
    text = tokenizer.decode([int(t) for t in tokens])
    return text if len(text) <= width else text[:width - 3] + "..."


def describe(result: dict, data_path: Path) -> str:
    s = result["summary"]
    rate = result["tokens_per_second"]

    def share(count, total):
        return f"{count:,} ({100 * count / total:.2f} %)" if total else f"{count:,}"

    scanned = f"training:   {s['train_shards']} shard(s), {s['train_tokens']:,} tokens"
    if rate:
        scanned += (f" scanned in {result['scan_seconds']:.1f} s with {result['workers']} worker(s): "
                    f"{rate / 1e6:.1f} M tokens/s (128 shards of 100M tokens: about "
                    f"{PROJECTION_TOKENS / rate / 60:.0f} min)")
    lines = [f"validation: {s['val_shards']} shard(s), {s['val_documents']:,} documents, {s['val_tokens']:,} tokens "
             f"(BOS not counted); indexed in {result['index_seconds']:.1f} s", scanned,
             f"copied whole into training:            {share(s['exact_documents'], s['val_documents'])} documents",
             f"sharing a {s['window']}-token span with training:  {share(s['window_documents'], s['val_documents'])} "
             f"documents, {share(s['window_tokens'], s['val_tokens'])} tokens",
             f"overlapping either way:                {share(s['overlapping_documents'], s['val_documents'])} "
             f"documents, {share(s['overlapping_tokens'], s['val_tokens'])} tokens"]
    if result["examples"]:
        lines.append("examples (validation document, the span training repeats, where):")
    for e in result["examples"]:
        lines.append(f"  document {e['val_document']} ({e['val_document_tokens']:,} tokens): {e['kind']}, tokens "
                     f"{e['val_span'][0]:,}-{e['val_span'][1]:,} at {e['train_shard']} position "
                     f"{e['train_position']:,}")
        if "text" in e:
            lines.append("    " + json.dumps(e["text"], ensure_ascii=False))
    if s["overlap"]:
        lines.append(f"OVERLAP: the training shards in {data_path} hold validation text, so a model trained on them "
                     "is scored on text it has seen. Rebuild the training data without the validation documents.")
    else:
        lines.append("clean: no validation document, and no span of it, occurs in training")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# The check
# ----------------------------------------------------------------------------------------------------------------

def build_index(tokens: np.ndarray, window: int, bos_id: int) -> ValidationIndex:
    for seed in range(4):  # a collision inside the validation set is rare; another hash seed removes it
        try:
            return ValidationIndex(tokens, window, bos_id, SpanHasher(seed, CHUNK_TOKENS + window - 1))
        except HashCollision:
            continue
    raise CheckError("four hash seeds all collided inside the validation set; this should not happen: report it")


def check_overlap(data_path, window: int = DEFAULT_WINDOW, bos_id: int = DEFAULT_BOS_ID, workers: int = 1,
                  examples: int = 5, tokenizer=None, progress=None) -> dict:
    """Scan data_path; return the result save_result writes: summary (what the trainer reads), shards (the key),
    examples (decoded into "text" with a SentencePiece tokenizer), timings."""
    data_path = Path(data_path)
    if window < 1:
        raise CheckError(f"--window {window}: must be at least 1 token")
    if not 0 <= bos_id < 65536:
        raise CheckError(f"--bos-id {bos_id}: must be a token id, 0-65535")
    if not data_path.is_dir():
        raise CheckError(f"{data_path}: no such folder; give the DATA_PATH that holds the fineweb_*.bin shards")
    fingerprints = shard_fingerprints(data_path)
    train_files, val_files = train_gpt.find_shards(data_path, "train"), train_gpt.find_shards(data_path, "val")
    started = time.perf_counter()
    index = build_index(np.concatenate([np.asarray(train_gpt.read_shard(f)) for f in val_files]), window, bos_id)
    index_seconds = time.perf_counter() - started
    context = ScanContext(index, TrainingStream(train_files), window, bos_id)
    started = time.perf_counter()
    results = scan_all(context, workers, progress or (lambda *_: None))
    crossing = documents_across_shards(context, results)
    scan_seconds = time.perf_counter() - started
    train_tokens = sum(r.tokens for r in results)
    summary = dict(version=VERSION, window=window, bos_id=bos_id, train_shards=len(train_files),
                   val_shards=len(val_files), train_tokens=train_tokens, **index.figures(),
                   checked_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    found = collect_examples(context, results, crossing, examples)
    if tokenizer is not None:
        for e in found:
            start = int(index.doc_starts[e["val_document"]])
            e["text"] = decode(tokenizer, index.tokens[start + e["val_span"][0]:start + e["val_span"][1]])
    return dict(tool="tools/check_overlap.py", summary=summary, shards=fingerprints, examples=found,
                index_seconds=round(index_seconds, 3), scan_seconds=round(scan_seconds, 3), workers=workers,
                tokens_per_second=round(train_tokens / scan_seconds) if scan_seconds > 0 else None)


def print_progress(result: ShardResult, done: int, total: int) -> None:
    rate = f"{result.tokens / result.seconds / 1e6:.1f}" if result.seconds else "-"
    print(f"[{done}/{total}] training shard {result.index}: {result.tokens:,} tokens in {result.seconds:.1f} s "
          f"({rate} M tokens/s)", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_path", type=Path, help="the folder of fineweb_train_*.bin and fineweb_val_*.bin shards")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                        help="length of the shared spans looked for, in tokens (default %(default)s)")
    parser.add_argument("--bos-id", type=int, default=DEFAULT_BOS_ID,
                        help="the token that starts every document (default %(default)s, the trainer's BOS_ID)")
    parser.add_argument("--tokenizer", type=Path, help="a SentencePiece model, to print the examples as text")
    parser.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8),
                        help="processes scanning shards at once (default %(default)s)")
    parser.add_argument("--examples", type=int, default=5, help="overlapping documents to show (default %(default)s)")
    parser.add_argument("--no-save", action="store_true", help=f"do not write {RESULT_NAME} beside the data")
    parser.add_argument("--quiet", action="store_true", help="no per-shard progress lines")
    args = parser.parse_args(argv)
    try:
        tokenizer = None
        if args.tokenizer is not None:
            if not args.tokenizer.is_file():
                raise CheckError(f"--tokenizer {args.tokenizer}: no such file")
            import sentencepiece
            tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(args.tokenizer))
        result = check_overlap(args.data_path, args.window, args.bos_id, args.workers, args.examples, tokenizer,
                               None if args.quiet else print_progress)
    except (CheckError, train_gpt.ConfigError, OSError) as e:  # the trainer's shard checks raise ConfigError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(describe(result, args.data_path))
    if not args.no_save:
        try:
            print(f"saved {save_result(args.data_path, result)}")
        except OSError as e:
            print(f"warning: could not save {args.data_path / RESULT_NAME} ({e}); the trainer and "
                  "tools/make_record.py will not see this check", file=sys.stderr)
    return 1 if result["summary"]["overlap"] else 0


if __name__ == "__main__":
    sys.exit(main())
