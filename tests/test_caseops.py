"""CaseOps: the transform and its inverse, the byte sidecar's exact accounting, and the trainer's use of it.

The sidecar charges every token the UTF-8 bytes of the original text it stands for after the tokenizer's
normalization (nmt_nfkc: NFKC, whitespace runs folded to one space, none at a document's ends), the bytes the
challenge's byte tables count for a tokenizer without CaseOps: a validation set's sidecar sums exactly to that
count, and to the UTF-8 bytes of the inverse of what its tokens decode to. Operators and BOS count 0 bytes."""
import importlib.util
import json
import lzma
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_training import tiny_env

import train_gpt as tg

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
_spec = importlib.util.spec_from_file_location("caseops", REPO_ROOT / "data" / "caseops.py")
caseops = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(caseops)
TITLE, ALLCAPS, CAPNEXT, ESC = tg.CASEOPS_OPERATORS
BOS_ID = 1  # what make_sample writes at every document start

ADVERSARIAL = [
    "", " ", "  \n\t  ", "a", "A", "Ab", "AB", "aB", "ABc", "iPhone", "McDonald's NASA-led", "The NASA Launch",
    "ABC123def x9Y Q4 4Q", "MiXeD CaSe WoRdS", "Ärger ÉCOLE straße İstanbul ǅemal", "naïve CAFÉ Café",
    "emoji 😀 between WORDS 👍🏽 and Flags 🇫🇷", "tab\tand\r\nCRLF", "ｆｕｌｌｗｉｄｔｈ ＡＢＣ ﬁ ligature",
    "".join(tg.CASEOPS_OPERATORS), f"{ESC}{ESC}", f"a{TITLE}b", f"{ALLCAPS}ABC{CAPNEXT}", f"X{ESC}", f"{TITLE}",
]
# Capitals whose NFKC composition with the next combining mark depends on their case: I+U+0307 composes, i+U+0307
# does not; J+U+030C does not, j+U+030C does (U+01F0).
COMPOSING = ["I\u0307stanbul", "J\u030cx", "AJ\u030c BI\u0307 xY\u0307z", "e\u0301E\u0301 A\u0300B\u0300"]


@pytest.mark.parametrize("text", ADVERSARIAL + COMPOSING)
def test_the_inverse_restores_any_text(text):
    assert caseops.inverse(caseops.transform(text)) == text


def test_the_transform_spells_case_with_the_records_operators():
    """The layout of lossless_caps_caseops_v1, so our data matches the public CaseOps shards' convention."""
    assert caseops.transform("The NASA iPhone McDonald a A x") == \
        f"{TITLE}the {ALLCAPS}nasa i{CAPNEXT}phone {TITLE}mc{CAPNEXT}donald a {TITLE}a x"
    assert caseops.transform(f"x{TITLE}y{ESC}") == f"x{ESC}{TITLE}y{ESC}{ESC}"
    # Runs of ASCII letters only: a non-ASCII letter is left as it is and ends a run.
    assert caseops.transform("ÉCOLE Über") == f"É{ALLCAPS}cole Über"


@pytest.mark.parametrize("bad", [ESC, f"{TITLE}1", f"{ALLCAPS} x", f"a{CAPNEXT}", f"{CAPNEXT}A"])
def test_text_no_transform_can_produce_is_refused(bad):
    with pytest.raises(caseops.CaseOpsError):
        caseops.inverse(bad)


@pytest.fixture(scope="module")
def caseops_sample(tmp_path_factory):
    from conftest import make_sample
    return make_sample.build(out=tmp_path_factory.mktemp("caseops"), name="small_caseops",
                             tokenizer_name="small_caseops", max_text_bytes=400_000, caseops_transform=True,
                             verbose=False)


def sidecar_and_tokens(sample) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.concatenate([np.asarray(tg.read_shard(p)) for p in sample["val"]["shards"]])
    counts = np.concatenate([np.asarray(tg.read_shard(p, (tg.SIDECAR_MAGIC,))) for p in sample["val"]["sidecar"]])
    return tokens, counts


def check_documents(sp, texts) -> int:
    """Round trips of every document and the sidecar's count of each; returns the sidecar's bytes in all."""
    charged, tables = 0, tg.byte_tables(sp)
    for text in texts:
        transformed = caseops.transform(text)
        assert caseops.inverse(transformed) == text
        ids = sp.encode(transformed, out_type=int)
        decoded = sp.decode(ids)
        # SentencePiece's nmt_nfkc: NFKC, whitespace runs folded to one space, none at the ends; '▁' is a space.
        assert decoded == sp.normalize(transformed).replace("\u2581", " ")
        counts = caseops.token_original_bytes(sp, tables, ids, BOS_ID)
        assert all(c == 0 for i, c in zip(ids, counts) if sp.id_to_piece(i) in (TITLE, ALLCAPS, CAPNEXT))
        assert sum(counts) == len(caseops.inverse(decoded).encode("utf-8"))
        charged += sum(counts)
    return charged


def test_the_sidecar_counts_what_the_byte_tables_count_without_caseops(caseops_sample, small_sample):
    """The same documents (the small sample's), tokenized with and without CaseOps: the CaseOps tokens differ
    and are more, the bytes they are charged are the same to the byte."""
    plain = tg.load_validation_data(tg.config_from_env(tiny_env(small_sample, Path("."))))
    cased = tg.load_validation_data(tg.config_from_env(tiny_env(caseops_sample, Path("."))))
    assert plain.byte_source == "tokenizer" and cased.byte_source == "sidecar"
    assert cased.tokens.numel() != plain.tokens.numel()
    cpu = torch.device("cpu")
    assert float(cased.byte_counts(cpu).sum()) == float(plain.byte_counts(cpu).sum())


def test_the_sample_sidecar_gives_operators_and_bos_no_bytes(caseops_sample):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(caseops_sample["tokenizer_model"]))
    assert all(sp.piece_to_id(op) != sp.unk_id() for op in tg.CASEOPS_OPERATORS)
    tokens, counts = sidecar_and_tokens(caseops_sample)
    assert counts.size == tokens.size and int(counts.sum()) == caseops_sample["val"]["sidecar_bytes"]
    assert not counts[tokens == BOS_ID].any()
    operator_ids = [sp.piece_to_id(op) for op in tg.CASEOPS_OPERATORS]
    assert np.isin(tokens, operator_ids).any() and not counts[np.isin(tokens, operator_ids[:3])].any()


def test_dividing_by_the_transformed_pieces_bytes_would_score_lower(caseops_sample, tmp_path):
    """The tokenizer's byte tables count each operator's 3 UTF-8 bytes: the denominator grows and the bpb of
    the same losses drops, which is the inflation the sidecar prevents."""
    cfg = tg.config_from_env(tiny_env(caseops_sample, tmp_path))
    val = tg.load_validation_data(cfg)
    assert val.byte_source == "sidecar"
    sidecar_bytes = float(val.byte_counts(torch.device("cpu")).sum())
    piece_bytes = float(tg.ValidationData(val.tokens, val.tables).byte_counts(torch.device("cpu")).sum())
    assert sidecar_bytes == caseops_sample["val"]["sidecar_bytes"]
    assert piece_bytes > sidecar_bytes * 1.01
    nll_sum = 1000.0
    assert nll_sum / piece_bytes < nll_sum / sidecar_bytes


def test_a_caseops_tokenizer_without_a_sidecar_stops_before_training(caseops_sample, tmp_path):
    for sidecar in caseops_sample["val"]["sidecar"]:
        sidecar.rename(tmp_path / sidecar.name)
    try:
        with pytest.raises(tg.ConfigError, match="reserves the CaseOps operators U\\+E001, U\\+E002, U\\+E003, "
                                                 "U\\+E004, but .* has no byte sidecar .*--caseops"):
            tg.main(tiny_env(caseops_sample, tmp_path))
    finally:
        for sidecar in caseops_sample["val"]["sidecar"]:
            (tmp_path / sidecar.name).rename(sidecar)


@pytest.mark.parametrize("damage, message", [
    (lambda c: c[:-1], "holds 106 counts for 107 validation tokens"),
    (lambda c: np.where(np.arange(c.size) == 0, 5, c), "charges bytes to a BOS"),
])
def test_a_sidecar_that_disagrees_with_the_tokens_is_refused(tmp_path, damage, message):
    tokens = np.array([BOS_ID] + [5] * 106, dtype=np.uint16)
    tg.write_shard(tmp_path / "fineweb_val_000000.bin", tokens)
    tg.write_shard(tmp_path / "fineweb_val_bytes_000000.bin", damage(np.ones(107, dtype=np.uint16)), tg.SIDECAR_MAGIC)
    assert tg.find_shards(tmp_path, "val") == [tmp_path / "fineweb_val_000000.bin"]
    with pytest.raises(tg.ConfigError, match=message):
        tg.load_byte_sidecar(tmp_path, torch.from_numpy(tokens.astype(np.int32)), BOS_ID)


def test_a_sidecar_beside_a_tokenizer_without_caseops_must_count_what_the_tokenizer_counts(small_sample, tmp_path):
    """A stray sidecar would otherwise replace the tokenizer's counts and change the score (it gave 9.90 bpb
    instead of 3.74 for the same losses): it may only agree with them, and the first token it disagrees on is named."""
    data = tmp_path / "data"
    shutil.copytree(small_sample["dataset_dir"], data)
    cfg = tg.config_from_env(tiny_env(small_sample, tmp_path, DATA_PATH=data))
    plain = tg.load_validation_data(cfg)
    exact = plain.byte_counts(torch.device("cpu")).numpy().astype(np.uint16)
    sidecar = data / "fineweb_val_bytes_000000.bin"
    tg.write_shard(sidecar, np.concatenate([[0], exact]), tg.SIDECAR_MAGIC)
    agreeing = tg.load_validation_data(cfg)
    assert torch.equal(agreeing.byte_counts(torch.device("cpu")), plain.byte_counts(torch.device("cpu")))
    wrong = np.concatenate([[0], exact])
    wrong[7] += 3
    tg.write_shard(sidecar, wrong, tg.SIDECAR_MAGIC)
    piece = tg.load_tokenizer(Path(cfg.TOKENIZER_PATH), 1024).id_to_piece(int(plain.tokens[7]))
    with pytest.raises(tg.ConfigError, match=f"charges validation token 7 \\(id {int(plain.tokens[7])}, "
                                             f"{re.escape(repr(piece))}\\) {wrong[7]} bytes where tokenizer .* counts "
                                             f"{exact[6]} \\(1 tokens differ\\); only a CaseOps tokenizer"):
        tg.main(tiny_env(small_sample, tmp_path, DATA_PATH=data))
    assert "steps" not in json.loads((tmp_path / "logs" / "run.json").read_text())  # stopped before training


def test_a_sidecar_with_the_token_magic_is_read_as_the_public_files_have_it(tmp_path):
    tokens = np.array([BOS_ID, 7, 8], dtype=np.uint16)
    tg.write_shard(tmp_path / "fineweb_val_000000.bin", tokens)
    tg.write_shard(tmp_path / "fineweb_val_bytes_000000.bin", np.array([0, 3, 1], dtype=np.uint16), tg.SHARD_MAGIC)
    counts, convention = tg.load_byte_sidecar(tmp_path, torch.from_numpy(tokens.astype(np.int32)), BOS_ID)
    assert counts.tolist() == [0, 3, 1] and convention == "raw"  # the public export counts the raw text


@pytest.mark.parametrize("magic, convention, read_as", [
    (tg.SIDECAR_MAGIC, None, "normalized"),  # written by make_sample before conventions were recorded
    (tg.SIDECAR_MAGIC, "normalized", "normalized"), (tg.SIDECAR_MAGIC, "raw", "raw"), (tg.SHARD_MAGIC, "raw", "raw"),
])
def test_a_sidecar_says_which_bytes_it_counts(tmp_path, magic, convention, read_as):
    tg.write_shard(tmp_path / "fineweb_val_bytes_000000.bin", np.array([0, 3], dtype=np.uint16), magic, convention)
    assert tg.sidecar_convention(tmp_path / "fineweb_val_bytes_000000.bin") == read_as
    tg.write_shard(tmp_path / "fineweb_val_bytes_000001.bin", np.array([0, 3], dtype=np.uint16), tg.SIDECAR_MAGIC,
                   "raw" if read_as == "normalized" else "normalized")
    with pytest.raises(tg.ConfigError, match="count bytes by different conventions"):
        tg.load_byte_sidecar(tmp_path, torch.tensor([BOS_ID, 7, BOS_ID, 8], dtype=torch.int32), BOS_ID)


def test_a_run_on_caseops_data_scores_every_pass_against_the_original_bytes(caseops_sample, tmp_path):
    summary = tg.main(tiny_env(caseops_sample, tmp_path, ITERATIONS=4, VAL_LOSS_EVERY=0))
    assert summary["status"] == "ok" and summary["byte_source"] == "sidecar"
    assert summary["val_bytes"] == caseops_sample["val"]["sidecar_bytes"]
    log = (tmp_path / "logs" / "run.txt").read_text()
    assert "byte_source:sidecar byte_convention:normalized" in log
    written = json.loads((tmp_path / "logs" / "run.json").read_text())
    assert written["byte_source"] == "sidecar" and written["byte_convention"] == "normalized"


@pytest.fixture(scope="module")
def caseops_tokenizer(caseops_sample):
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_file=str(caseops_sample["tokenizer_model"]))


@pytest.mark.parametrize("text", ADVERSARIAL + COMPOSING)
def test_the_normalized_convention_counts_the_normalized_original_and_its_tokens_decode_to_it(caseops_tokenizer, text):
    sp = caseops_tokenizer
    ids = sp.encode(caseops.transform(text), out_type=int)
    normalized = sp.normalize(text).replace("\u2581", " ")  # what a tokenizer without CaseOps reads of the text
    assert caseops.inverse(sp.decode(ids)) == normalized
    assert sum(caseops.token_original_bytes(sp, tg.byte_tables(sp), ids, BOS_ID)) == len(normalized.encode("utf-8"))


@pytest.mark.parametrize("text", ADVERSARIAL + COMPOSING)
def test_the_raw_convention_counts_the_original_bytes_as_the_public_export_does(caseops_tokenizer, text):
    """Every token is charged the bytes of the text it was cut from; whitespace inside the document counts as it
    was written (the normalization folds it), whitespace at its ends is dropped with the tokenizer's."""
    pytest.importorskip("google.protobuf", reason="the raw convention reads piece surfaces through protobuf")
    sp = caseops_tokenizer
    ids, counts = caseops.token_raw_bytes(sp, caseops.transform(text))
    assert ids == sp.encode(caseops.transform(text), out_type=int)
    assert sum(counts) == len(text.strip(" \t\r\n").encode("utf-8"))
    if sp.normalize(text).replace("\u2581", " ") == text:  # nothing to fold: the conventions agree on every token
        normalized = caseops.token_original_bytes(sp, tg.byte_tables(sp), ids, BOS_ID)
        whole = [not sp.is_byte(i) for i in ids]  # the surface of a character's byte pieces is all on its last one
        assert [c for c, w in zip(counts, whole) if w] == [c for c, w in zip(normalized, whole) if w]


def test_a_raw_convention_sample_is_the_normalized_one_plus_its_folded_whitespace(caseops_sample, tmp_path):
    pytest.importorskip("google.protobuf", reason="the raw convention reads piece surfaces through protobuf")
    from conftest import make_sample
    raw = make_sample.build(out=tmp_path, name="raw", tokenizer_name="raw", max_text_bytes=400_000,
                            caseops_transform=True, byte_convention="raw", verbose=False)
    tokens, counts = sidecar_and_tokens(raw)
    normalized_tokens, normalized_counts = sidecar_and_tokens(caseops_sample)
    assert np.array_equal(tokens, normalized_tokens) and counts.sum() > normalized_counts.sum()
    texts = make_sample.split_documents(make_sample.sample_documents(400_000))[1]
    assert int(counts.sum()) == sum(len(t.strip(" \t\r\n").encode("utf-8")) for t in texts)
    val = tg.load_validation_data(tg.config_from_env(tiny_env(raw, tmp_path)))
    assert val.byte_source == "sidecar" and val.byte_convention == "raw"


def shared_documents(name: str, limit: int) -> list[str]:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} is absent (the shared corpora are not part of a fresh clone)")
    texts = []
    with lzma.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            if len(texts) == limit:
                break
    return texts


@pytest.mark.parametrize("corpus", ["enwiki_2015", "blogs_2004"])
def test_real_validation_documents_round_trip_and_their_bytes_add_up(corpus):
    """A CaseOps tokenizer trained on part 1, then every one of the first validation documents of part 4."""
    import sentencepiece as spm

    from conftest import make_sample
    train = [caseops.transform(t) for t in shared_documents(f"{corpus}.part1of4.jsonl.xz", 100)]
    sp = spm.SentencePieceProcessor(model_proto=make_sample.train_tokenizer(train, 1024, tg.CASEOPS_OPERATORS))
    val = shared_documents(f"{corpus}.part4of4.jsonl.xz", 150 if corpus == "enwiki_2015" else 800)
    assert check_documents(sp, val) > 0


def test_every_evaluation_pass_divides_by_the_sidecar():
    """The same losses over a sidecar twice as large: the plain, TTT and SLOT passes' bpb all halve."""
    from test_evaluation import CPU, check_causality, setup
    results = []
    for scale in (1, 2):
        cfg, model, tokens = setup(n_tokens=200, TTT_ENABLED=1, SLOT_ENABLED=1)
        counts = torch.randint(1, 5, (tokens.numel(),), generator=torch.Generator().manual_seed(3), dtype=torch.int32)
        data = tg.ValidationData(tokens, check_causality.one_byte_per_token(cfg.VOCAB_SIZE), counts * scale)
        results.append(tg.Evaluator(cfg, model, data, CPU, lambda _: None).score(4))
    once, twice = results
    bpb_fields = [k for k in once.passes if k.endswith("_val_bpb")]
    assert bpb_fields and once.score_source.startswith("ttt")
    for field in bpb_fields:
        assert twice.passes[field] == pytest.approx(once.passes[field] / 2, rel=1e-9), field
    assert twice.quantized_val_bpb == pytest.approx(once.quantized_val_bpb / 2, rel=1e-9)
    assert twice.val_loss == once.val_loss
