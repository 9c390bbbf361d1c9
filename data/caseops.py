"""CaseOps: the lossless case transform of the CaseOps records (PR #1729, `lossless_caps_caseops_v1`), its
inverse, and the per-token original byte counts that go into the validation byte sidecar.

The transform works on maximal runs of ASCII letters, so the tokenizer can share one lowercase spelling of a word
across its case variants:
  - a lowercase word stays as it is;
  - an ALLCAPS word (two letters or more) becomes ALLCAPS + the word in lowercase;
  - a TitleCase word becomes TITLE + the word in lowercase;
  - any other word with a capital: TITLE before it if its first letter is a capital, then the word in
    lowercase with CAPNEXT before each later capital;
  - an operator character already in the text is escaped as ESC + that character.
  - except a word whose last letter is a capital followed by a combining mark: it keeps its case. NFKC (the
    tokenizer's normalization) composes a letter with the mark after it, and whether it does depends on the
    letter's case (I+U+0307 composes to U+0130 but i+U+0307 to nothing; j+U+030C to U+01F0 but J+U+030C to
    nothing), so lowercasing that letter would change the normalized text's bytes, or leave an operator before
    a letter that is no longer ASCII.
Every other character is left alone, so inverse(transform(text)) == text for any Unicode text, and the tokenizer
normalizes the transformed text to the transform of the normalized text.

The operators are private-use characters (train_gpt.CASEOPS_OPERATORS) that the tokenizer reserves as
user-defined pieces. They stand for no text of their own: in the byte sidecar an operator (and ESC) counts 0
bytes. Every other token counts, by the sidecar's byte convention (train_gpt.BYTE_CONVENTIONS):
  - normalized (token_original_bytes): what the trainer's byte tables count for it, so a document's sidecar sums to
    the UTF-8 bytes of the document as the tokenizer's normalization leaves it (nmt_nfkc: NFKC, whitespace runs
    folded to one space, none at the ends), the same count a tokenizer without CaseOps gets for it;
  - raw (token_raw_bytes): the UTF-8 bytes of the text it was cut from before normalization (SentencePiece's
    surface), so a document's sidecar sums to its original bytes less the whitespace at its ends: the public
    CaseOps export's convention.
"""
from __future__ import annotations

import sys
import unicodedata
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from train_gpt import CASEOPS_OPERATORS, target_bytes  # noqa: E402  (the trainer owns these)

TITLE, ALLCAPS, CAPNEXT, ESC = CASEOPS_OPERATORS


class CaseOpsError(ValueError):
    """Text that no transform output can be: an operator with nothing it applies to."""


def is_ascii_letter(ch: str) -> bool:
    return "a" <= ch <= "z" or "A" <= ch <= "Z"


def transform_word(word: str) -> str:
    lower = word.lower()
    if word == lower:
        return word
    if len(word) >= 2 and word.isupper():
        return ALLCAPS + lower
    if word[0].isupper() and word[1:] == lower[1:]:
        return TITLE + lower
    head = (TITLE if word[0].isupper() else "") + lower[0]
    return head + "".join(CAPNEXT + c.lower() if c.isupper() else c for c in word[1:])


def transform(text: str) -> str:
    out, i, n = [], 0, len(text)
    while i < n:
        ch = text[i]
        if ch in CASEOPS_OPERATORS:
            out.append(ESC + ch)
            i += 1
        elif is_ascii_letter(ch):
            j = i + 1
            while j < n and is_ascii_letter(text[j]):
                j += 1
            word = text[i:j]
            composes = word[-1].isupper() and j < n and unicodedata.combining(text[j])
            out.append(word if composes else transform_word(word))
            i = j
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def inverse(text: str) -> str:
    """The original text of a transform output; CaseOpsError where `text` cannot be one."""
    out, i, n = [], 0, len(text)

    def next_letter(at: int, what: str) -> str:
        if at >= n or not "a" <= text[at] <= "z":
            raise CaseOpsError(f"{what} at character {at - 1} is not followed by a lowercase ASCII letter")
        return text[at]

    while i < n:
        ch = text[i]
        if ch == ESC:
            if i + 1 >= n:
                raise CaseOpsError(f"ESC at character {i} ends the text")
            out.append(text[i + 1])
            i += 2
        elif ch == ALLCAPS:
            j = i + 1
            next_letter(j, "ALLCAPS")
            while j < n and is_ascii_letter(text[j]):
                j += 1
            out.append(text[i + 1:j].upper())
            i = j
        elif ch in (TITLE, CAPNEXT):
            out.append(next_letter(i + 1, "TITLE" if ch == TITLE else "CAPNEXT").upper())
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def token_original_bytes(sp, tables, ids: list[int], bos_id: int) -> list[int]:
    """The bytes each token of one document (ids of transformed text, without its BOS) stands for in the
    original text: what the trainer's byte tables count for it, except that an operator acting as one counts 0.
    An escaped operator keeps its 3 bytes, as the character it is. So the counts are exactly the byte tables'
    count of the same document tokenized without CaseOps under the same normalization. `tables` is
    train_gpt.byte_tables(sp), built once by the caller."""
    previous = torch.tensor([bos_id, *ids[:-1]], dtype=torch.long)
    counts = target_bytes(tables, previous, torch.tensor(ids, dtype=torch.long)).tolist()
    escaped = False
    for k, token in enumerate(ids):
        piece = sp.id_to_piece(token)
        if escaped:
            escaped = False
        elif piece in CASEOPS_OPERATORS:
            counts[k], escaped = 0, piece == ESC
    return counts


def token_raw_bytes(sp, transformed: str) -> tuple[list[int], list[int]]:
    """The ids of one transformed document (without its BOS) and the raw convention's count for each: the UTF-8
    bytes of the input span it covers (SentencePiece's surface, which needs the protobuf package), operators acting
    as such 0, an escaped operator its 3 bytes."""
    try:
        pieces = sp.encode(transformed, out_type="proto").pieces
    except ImportError as e:
        raise SystemExit(f"the raw byte convention reads SentencePiece's piece surfaces, which need protobuf ({e}): "
                         "pip install protobuf") from None
    ids, counts, escaped = [], [], False
    for piece in pieces:
        count = 0
        for ch in piece.surface:
            if escaped or ch not in CASEOPS_OPERATORS:
                count += len(ch.encode("utf-8"))
                escaped = False
            else:
                escaped = ch == ESC
        ids.append(piece.id)
        counts.append(count)
    return ids, counts
