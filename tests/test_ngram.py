"""The causal n-gram tilt: hints from what was scored before, the closed-form renormalization, and the tilt in
every evaluation pass."""
import copy
import functools
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt as tg
from test_evaluation import evaluator, setup

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tools"))
import check_causality  # noqa: E402


def test_the_closed_form_is_the_renormalized_tilted_distribution():
    """-log p'(y) from the untilted NLL and log Z equals -log of exp(beta [a = h]) p(a) normalized over the whole
    vocabulary, with and without a hint, hit or miss; and that distribution sums to 1."""
    g = torch.Generator().manual_seed(0)
    log_probs = torch.randn(5, 11, generator=g, dtype=torch.float64).mul(3).log_softmax(-1)
    targets = torch.tensor([3, 3, 7, 0, 10])
    hint = torch.tensor([3, 5, -1, 0, 2], dtype=torch.int32)  # hit, miss, none, hit, miss
    tilt = tg.NgramTilt(hint, hint.long() == targets, 2.625)
    index = torch.arange(5)
    scores = tg.StreamScores(torch.zeros(5, dtype=torch.float64), torch.zeros(5, dtype=torch.int32),
                             torch.zeros(5, dtype=torch.float64), tilt)
    scores.add(index, -log_probs.gather(1, targets[:, None]).squeeze(1), log_probs)
    explicit = log_probs.double() + torch.zeros(5, 11, dtype=torch.float64).scatter_(
        1, hint.clamp_min(0).long()[:, None], torch.where(hint >= 0, 2.625, 0.0).double()[:, None])
    explicit = explicit.log_softmax(-1)
    torch.testing.assert_close(scores.nll, -explicit.gather(1, targets[:, None]).squeeze(1), rtol=0, atol=1e-12)
    torch.testing.assert_close(scores.mass, torch.ones(5, dtype=torch.float64), rtol=0, atol=1e-12)
    assert scores.nll[2] == -log_probs[2, 7].double()  # no hint: the score is untouched


@pytest.mark.parametrize("knobs", [dict(TTT_ENABLED=0), dict(TTT_ENABLED=1), dict(TTT_ENABLED=1, TTT_MODE="lora")],
                         ids=["sliding", "chunk ttt", "lora ttt"])
def test_a_zero_boost_scores_exactly_as_no_tilt_and_the_tilt_moves_the_hinted_targets_only(knobs):
    on, model, tokens = setup(n_tokens=160, NGRAM_TILT=1, **knobs)

    def fresh(cfg):  # chunk TTT trains the weights it is given
        return evaluator(cfg, copy.deepcopy(model), tokens, log=lambda _: None)

    ttt = bool(knobs["TTT_ENABLED"])
    base = fresh(tg.dataclasses.replace(on, NGRAM_TILT=0)).run_pass(ttt, False, with_mass=True)[0]
    assert torch.equal(fresh(tg.dataclasses.replace(on, NGRAM_BOOST=0.0)).run_pass(ttt, False)[0].nll, base.nll)
    tilted = fresh(on)
    scores, info = tilted.run_pass(ttt, False, with_mass=True)
    hinted = tilted.tilt("lora" if knobs.get("TTT_MODE") == "lora" else "stream")[0].hint >= 0
    assert info["ngram_hints"] == int(hinted.sum()) > 0
    assert torch.equal(scores.nll[~hinted], base.nll[~hinted]) and not torch.equal(scores.nll[hinted], base.nll[hinted])
    torch.testing.assert_close(scores.mass, torch.ones_like(scores.mass), rtol=0, atol=1e-5)  # C2 on real logits


def test_the_causality_check_catches_ngram_counts_from_later_documents():
    with check_causality.planted("ngram-later-docs") as knobs:  # 12 probes: some fall where a copy repeats text
        verdicts = check_causality.check(knobs, probes=12, n_tokens=160)
    assert not verdicts["sliding"]["C1/C3"] and tg.ngram_hints.__name__ == "ngram_hints"  # and the plant is gone


# ---- the hints, against a plain sequential reference of the same definition ----

def count_event(state: list, token: int) -> None:
    """[total, top count, top token, counts]: the top changes only on a strictly larger count."""
    state[0] += 1
    count = state[3][token] = state[3].get(token, 0) + 1
    if count > state[1]:
        state[1], state[2] = count, token


def reference_hints(x, docs, units, order, threshold):
    """Unit by unit: each document looks its contexts up in the state the earlier units left, plus its own earlier
    events (a copy-on-write overlay); the unit's events reach the shared state only when the unit is over."""
    x, L, gate = [int(t) for t in x], order - 1, np.float32(threshold)
    hint = np.full(len(x) - 1, -1, np.int32)

    def events(s, c):
        return [(p, tuple(tg.NGRAM_PAD if j < s else x[j] for j in range(p - L, p)), x[p])
                for p in range(s + 1, s + c + 1)]

    shared, docs, units = {}, [tuple(map(int, d)) for d in docs], list(units)
    for unit in sorted(set(units)):
        batch = [d for d, u in zip(docs, units) if u == unit]
        for s, c in batch:
            own = {}
            for p, context, token in events(s, c):
                state = own.get(context) or shared.get(context)
                if state and np.float32(state[1]) / np.float32(state[0]) >= gate:
                    hint[p - 1] = state[2]
                if context not in own:
                    own[context] = [state[0], state[1], state[2], dict(state[3])] if state else [0, 0, -1, {}]
                count_event(own[context], token)
        for s, c in batch:
            for _, context, token in events(s, c):
                count_event(shared.setdefault(context, [0, 0, -1, {}]), token)
    return hint


def random_documents(rng, vocab: int, count: int):
    """Documents of 1 to 40 tokens over a tiny vocabulary (so contexts repeat), each starting with BOS (1)."""
    lengths = rng.integers(1, 41, count)
    x = np.concatenate([np.concatenate([[1], rng.integers(0, vocab, n - 1)]) for n in lengths] + [[1]])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return x.astype(np.uint16), np.stack([starts, lengths], 1)


def schedule(rng, docs, kind: str):
    """(documents in scoring order, units)."""
    n = len(docs)
    if kind == "stream":
        return docs, np.arange(n)
    if kind == "one unit":
        return docs[rng.permutation(n)], np.zeros(n, int)
    if kind == "lora":  # the records' queue: shortest first, cut into batches, longest batch first
        size = int(rng.integers(1, 6))
        ascending = np.argsort(docs[:, 1], kind="stable")
        batches = [ascending[i:i + size] for i in range(0, n, size)][::-1]
        return docs[np.concatenate(batches)], np.repeat(np.arange(len(batches)), [len(b) for b in batches])
    return docs[rng.permutation(n)], np.sort(rng.integers(0, max(1, n // 3), n))


KINDS = ["stream", "one unit", "lora", "random"]


def check_case(seed: int, kind: str) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vocab, order, threshold = int(rng.integers(2, 6)), int(rng.integers(5, 12)), float(rng.choice([0.8, 0.5, 1.0]))
    x, docs = random_documents(rng, vocab, int(rng.integers(1, 25)))
    docs, units = schedule(rng, docs, kind)
    expected = reference_hints(x, docs, units, order, threshold)
    assert np.array_equal(tg.ngram_hints(x, docs, units, order, threshold), expected), (seed, kind)
    for ranks in (2, 3):  # disjoint shares whose maximum is the whole
        parts = [tg.ngram_hints(x, docs, units, order, threshold, ranks, r) for r in range(ranks)]
        assert sum((part >= 0).astype(int) for part in parts).max() <= 1
        assert np.array_equal(np.maximum.reduce(parts), expected), (seed, kind, ranks)
    return expected


@pytest.mark.parametrize("kind", KINDS)
def test_the_hints_equal_the_sequential_reference_on_any_number_of_ranks(kind):
    assert sum(int((check_case(seed, kind) >= 0).sum()) for seed in range(25)) > 20  # and hints do fire


def test_hash_collisions_and_the_wide_key_path_change_no_hint(monkeypatch):
    monkeypatch.setattr(tg, "hash_runs", functools.partial(tg.hash_runs, keep_bits=3))  # nearly every context collides
    monkeypatch.setattr(tg, "pair_counts", functools.partial(tg.pair_counts, key_bits=0))
    for seed in range(6):
        for kind in KINDS:
            check_case(100 + seed, kind)


def test_a_hint_reads_only_the_prefix_its_pass_scored_before():
    """C1 for the hints: in stream order, changing token p changes no hint of a target at or before p; in one unit,
    a document's hints ignore every other document."""
    rng = np.random.default_rng(7)
    x, docs = random_documents(rng, 3, 20)
    base = tg.ngram_hints(x, docs, np.arange(len(docs)), 6, 0.5)
    for p in rng.choice(np.arange(1, x.size), 25, replace=False):
        flipped = x.copy()
        flipped[p] = 5  # a token no document holds
        assert np.array_equal(tg.ngram_hints(flipped, docs, np.arange(len(docs)), 6, 0.5)[:p], base[:p])
    together = tg.ngram_hints(x, docs, np.zeros(len(docs)), 6, 0.5)
    alone = [tg.ngram_hints(x, docs[i:i + 1], [0], 6, 0.5) for i in range(len(docs))]
    assert np.array_equal(together, np.maximum.reduce(alone))


def test_the_speed_bench_times_both_orders_and_their_shares_combine(small_sample, capsys):
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import ngram_speed

    assert ngram_speed.main([str(small_sample["dataset_dir"]), "--targets", "30000", "--ranks", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("shares combine into the one-rank hints: True") == 2 and "lora order" in out
