"""TTT_MODE=lora: per-document LoRA test-time training through the model's own forward, scored first."""
import copy
import math

import pytest
import torch

import train_gpt as tg
from test_evaluation import CPU, check_causality, evaluator, leaks, setup

EVERY_SWITCH = dict(TTT_MODE="lora", SMEAR_GATE=1, SPARSE_ATTN_GATE=1, VARLEN_ATTENTION=1, PARALLEL_LANES_START=2)


def lora_scores(cfg, model, tokens, log=print):
    """The LoRA pass on a copy of the model (phases train the base weights)."""
    return evaluator(cfg, copy.deepcopy(model), tokens, log).run_pass(True, False, with_mass=True)


def same_windows_without_adapters(cfg, model, tokens) -> torch.Tensor:
    """Every chunk of every document batch as the LoRA pass lays it out, scored by GPT.forward (no adapters)."""
    spans = tg.document_spans(tokens, cfg.BOS_ID)
    nll = torch.full((tokens.numel() - 1,), float("nan"), dtype=torch.float64)
    for batch in tg.lora_batches(spans, cfg.TTT_DOC_BATCH):
        docs = [spans[d] for d in batch]
        sizes = [tg.doc_chunk_size(cfg, n) for _, n in docs]
        chunks = [-(-n // size) for (_, n), size in zip(docs, sizes)]
        for c in range(max(chunks)):
            index, scored, _ = tg.lora_chunk_rows(docs, sizes, chunks, c, cfg.EVAL_SEQ_LEN)
            rows = tokens[index].long()
            with torch.inference_mode():
                out = model(rows[:, :-1], rows[:, 1:])
            nll[index[:, 1:][scored] - 1] = out[scored].double()
    return nll


@pytest.mark.parametrize("knobs", [EVERY_SWITCH, dict(EVERY_SWITCH, TTT_LORA_NO_QV=1, NUM_LOOPS=0)],
                         ids=["every switch", "no q/v, no loops"])
def test_with_zero_learning_rate_lora_ttt_scores_exactly_what_the_model_scores(knobs):
    """The adapters ride the model's own forward (gates, SmearGate, lanes, recurrence, XSA), so at LR 0 the pass
    equals GPT.forward on the same windows bit for bit, though GPT.forward isolates documents (VARLEN_ATTENTION)
    and the adapted forward, whose rows hold one document each, attends plain causally; and each document's
    windows run alone (no batch, no padding) agree to float rounding."""
    cfg, model, tokens = setup(**knobs, TTT_LORA_LR=0, NGRAM_TILT=0)  # the machinery alone: no tilt
    scores, info = lora_scores(cfg, model, tokens)
    assert info["ttt_lora_steps"] == 0 and bool((scores.count == 1).all())
    assert torch.equal(scores.nll, same_windows_without_adapters(cfg, model, tokens))
    for start, n in tg.document_spans(tokens, cfg.BOS_ID)[:4]:
        size = tg.doc_chunk_size(cfg, n)
        for c in range(-(-n // size)):
            first, end, first_scored = tg.chunk_window(c, size, n, cfg.EVAL_SEQ_LEN)
            row = tokens[start + first:start + end + 1].long()[None]
            with torch.inference_mode():
                alone = model(row[:, :-1], row[:, 1:])[0, first_scored - 1 - first:]
            torch.testing.assert_close(scores.nll[start + first_scored - 1:start + end], alone.double(), rtol=0,
                                       atol=1e-5)


@pytest.mark.parametrize("switch, name", [("TTT_LORA_K", "k"), ("TTT_LORA_O", "o"), ("TTT_LORA_MLP", "mlp")])
def test_each_adapter_switch_removes_its_adapter_and_only_it_changes_the_scores(switch, name):
    """#2135 runs without K's adapter: switched off, no virtual layer has it, every other adapter is there, and the
    adapted scores differ (the adapter was doing something) while every target is still scored once."""
    cfg, model, tokens = setup(**EVERY_SWITCH, TTT_LORA_K=1, TTT_LORA_O=1, TTT_LORA_MLP=1)
    off = tg.dataclasses.replace(cfg, **{switch: 0})
    g = torch.Generator().manual_seed(0)
    names = [set(layer) for layer in tg.DocumentAdapters(off, model, 2, g).layers]
    assert names and all(n == {"q", "k", "v", "o", "mlp"} - {name} for n in names)
    with_it, _ = lora_scores(cfg, model, tokens)
    without, _ = lora_scores(off, model, tokens)
    assert bool((without.count == 1).all()) and not torch.equal(with_it.nll, without.nll)


def test_a_documents_first_chunk_is_scored_before_any_step_and_later_chunks_by_adapted_weights():
    cfg, model, tokens = setup(**EVERY_SWITCH)
    adapted, info = lora_scores(cfg, model, tokens)
    plain, _ = lora_scores(tg.dataclasses.replace(cfg, TTT_LORA_LR=0.0), model, tokens)
    assert info["ttt_lora_steps"] > 0
    first_chunk = torch.zeros_like(plain.nll, dtype=torch.bool)
    for start, n in tg.document_spans(tokens, cfg.BOS_ID):
        first_chunk[start:start + min(n, tg.doc_chunk_size(cfg, n))] = True
    assert torch.equal(adapted.nll[first_chunk], plain.nll[first_chunk])  # B restarts at 0 for every batch
    assert bool((adapted.nll[~first_chunk] != plain.nll[~first_chunk]).all())


def test_lora_ttt_learns_a_document_that_repeats_itself():
    """Documents that repeat a random 6-token phrase: after a few steps the adapters predict the phrase, so the
    later chunks score far better than the base model does (1.14 nats against 5.17 when written)."""
    cfg, model, _ = setup(**EVERY_SWITCH, TTT_LORA_LR=0.01, TTT_LORA_RANK=8, TTT_LORA_ALPHA=8, TTT_DOC_CHUNK=12,
                          TTT_SHORT_DOC_CHUNK=0)
    g = torch.Generator().manual_seed(3)
    docs = []
    for _ in range(4):
        phrase = torch.randint(2, cfg.VOCAB_SIZE, (6,), generator=g, dtype=torch.int32)
        docs.append(torch.cat((torch.tensor([cfg.BOS_ID], dtype=torch.int32), phrase.repeat(12))))
    tokens = torch.cat(docs)
    adapted, _ = lora_scores(cfg, model, tokens)
    plain, _ = lora_scores(tg.dataclasses.replace(cfg, TTT_LORA_LR=0.0), model, tokens)
    later = torch.zeros_like(plain.nll, dtype=torch.bool)
    for start, n in tg.document_spans(tokens, cfg.BOS_ID):
        later[start + 3 * cfg.TTT_DOC_CHUNK:start + n] = True
    assert float(adapted.nll[later].mean()) < 0.5 * float(plain.nll[later].mean())


def test_when_the_budget_would_overrun_adaptation_stops_and_every_target_is_still_scored():
    cfg, model, tokens = setup(**EVERY_SWITCH, EVAL_TIME_BUDGET=1e-6)
    said = []
    scores, info = lora_scores(cfg, model, tokens, said.append)
    unlimited, full = lora_scores(tg.dataclasses.replace(cfg, EVAL_TIME_BUDGET=0.0), model, tokens)
    assert bool((scores.count == 1).all()) and any("ttt lora: projected" in line for line in said)
    assert 0 < info["ttt_lora_steps"] < full["ttt_lora_steps"]  # the first batch adapted, then none


def test_documents_cover_every_target_once_and_batches_go_longest_first():
    tokens = torch.tensor([5, 7, 1, 3, 3, 1, 4, 1, 9, 9, 9, 9, 2])  # no BOS at 0: a leading document
    spans = tg.document_spans(tokens, bos_id=1)
    assert spans == [(0, 2), (2, 3), (5, 2), (7, 5)]
    covered = torch.cat([torch.arange(s + 1, s + n + 1) for s, n in spans])
    assert torch.equal(covered, torch.arange(1, tokens.numel()))
    # The records' queue: shortest first (ties by position) cut into batches from the short end, longest batch first
    batches = tg.lora_batches(spans, batch_docs=2)
    assert batches == [[1, 3], [0, 2]] and sorted(sum(batches, [])) == [0, 1, 2, 3]
    assert tg.lora_batches(spans, batch_docs=3) == [[3], [0, 2, 1]]  # the partial batch: the longest, first


def test_short_documents_take_the_short_chunk():
    cfg = check_causality.check_config(dict(TTT_MODE="lora", TTT_DOC_CHUNK="48", TTT_SHORT_DOC_CHUNK="16",
                                            TTT_SHORT_DOC_LEN="2048", EVAL_SEQ_LEN="64"))
    assert tg.doc_chunk_size(cfg, 2047) == 16 and tg.doc_chunk_size(cfg, 2048) == 48
    assert tg.chunk_window(chunk=3, size=16, targets=60, seq_len=32) == (28, 60, 49)


def test_lora_ttt_with_slot_is_refused():
    with pytest.raises(tg.ConfigError, match="TTT_MODE=lora with SLOT_ENABLED=1"):
        tg.config_from_env(dict(TTT_MODE="lora", SLOT_ENABLED="1"))


def test_a_chunk_wider_than_the_window_is_refused():
    """A chunk is scored in one window of EVAL_SEQ_LEN tokens; a longer one would leave targets unscored."""
    with pytest.raises(tg.ConfigError, match="TTT_DOC_CHUNK=40 .* must be at most EVAL_SEQ_LEN=32"):
        tg.config_from_env(dict(TTT_DOC_CHUNK="40", EVAL_SEQ_LEN="32", EVAL_STRIDE="8"))


def test_a_pass_that_misses_a_target_stops_the_evaluation(monkeypatch):
    """An unscored target would add 0 nats and flatter the score: the evaluator refuses to report it."""
    cfg, model, tokens = setup(TTT_MODE="lora")
    real = tg.Evaluator.lora_pass

    def misses_one(self, with_mass=False):
        scores, info = real(self, with_mass)
        scores.count[5] = 0
        return scores, info

    monkeypatch.setattr(tg.Evaluator, "lora_pass", misses_one)
    with pytest.raises(RuntimeError, match="ttt pass: 1 targets not scored exactly once"):
        evaluator(cfg, model, tokens).score(batch_seqs=2)


NO_FRONTIER_PIECES = dict(SMEAR_GATE=0, SPARSE_ATTN_GATE=0, VARLEN_ATTENTION=0, NUM_LOOPS=0)


@pytest.mark.parametrize("knobs", [dict(TTT_MODE="lora"), dict(EVERY_SWITCH, TTT_WARM_START_A=0, TTT_LORA_NO_QV=1),
                                   dict(NO_FRONTIER_PIECES, TTT_MODE="lora")],
                         ids=["lora", "every switch, cold A, no q/v", "no frontier pieces"])
def test_causality_check_passes_lora_ttt(knobs):
    verdicts = check_causality.check({k: str(v) for k, v in knobs.items()}, probes=4, n_tokens=160)
    for name, v in verdicts.items():
        assert v["C1/C3"] and v["C2"] and v["C4"], (name, v)


def test_causality_check_catches_lora_ttt_that_steps_before_scoring(monkeypatch):
    """The bug: a step on the whole window about to be scored, then the scoring forward."""
    real = tg.Evaluator.lora_losses

    def step_then_score(self, rows, cols, adapters):
        nll, _ = real(self, rows, cols, adapters)
        self.lora_step(nll, torch.ones_like(nll, dtype=torch.bool), adapters,
                       torch.optim.SGD(list(adapters.parameters()), lr=self.cfg.TTT_LORA_LR))
        return real(self, rows, cols, adapters)

    monkeypatch.setattr(tg.Evaluator, "lora_losses", step_then_score)
    verdicts = check_causality.check({"TTT_MODE": "lora"}, probes=4, n_tokens=160)
    assert leaks(verdicts) and verdicts["sliding"]["C1/C3"]


def test_phases_fall_due_at_batch_ends_one_per_batch_and_never_after_the_last():
    queue = [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10]]
    P = tg.Phase
    assert tg.phase_schedule(queue, prefix_docs=6, phases=2) == [P(0, 3), P(1, 6)]
    assert tg.phase_schedule(queue, prefix_docs=4, phases=1) == [P(1, 4)]  # due inside batch 1: after it, 4 documents
    assert tg.phase_schedule(queue, prefix_docs=100, phases=3) == [P(0, 3), P(2, 7)]  # 11 documents; none after the last
    # due at 2, 4 and 6: the third is due at batch 1's end too, but a batch ends one phase; it runs after batch 2
    assert tg.phase_schedule(queue, prefix_docs=6, phases=3) == [P(0, 2), P(1, 4), P(2, 6)]
    # due at 0, 1 and 2 documents: one phase per batch end, and the one of no documents does not run
    assert tg.phase_schedule(queue, prefix_docs=2, phases=3) == [P(1, 1), P(2, 2)]
    assert tg.phase_schedule(queue, prefix_docs=6, phases=0) == []


def test_the_records_phases_at_its_scale():
    """50,000 validation documents, batches of 64, 2,500 prefix documents, 3 phases (the 1.0611 run): the record
    pauses when its counter reads 848, 1,680 and 2,512 (after 14, 27 and 40 batches, the first one the 16 longest
    documents) and trains on the 833, 1,666 and 2,500 shortest documents scored."""
    spans = [(10 * d, 1 + (d * 7919) % 50_000) for d in range(50_000)]  # distinct lengths, in no order
    queue = tg.lora_batches(spans, 64)
    assert len(queue) == 782 and len(queue[0]) == 16 and spans[queue[0][-1]][1] == 50_000
    schedule = tg.phase_schedule(queue, prefix_docs=2500, phases=3)
    assert schedule == [tg.Phase(13, 833), tg.Phase(26, 1666), tg.Phase(39, 2500)]
    assert [sum(map(len, queue[:p.after_batch + 1])) for p in schedule] == [848, 1680, 2512]
    chosen = tg.phase_documents(spans, queue, schedule[0])
    scored = [d for batch in queue[:14] for d in batch]
    assert sorted(chosen) == sorted(sorted(scored, key=lambda d: spans[d][1])[:833])  # the shortest scored
    assert [spans[d][1] for d in chosen] == sorted(spans[d][1] for d in chosen)  # joined shortest first


def test_a_phase_trains_every_chunk_but_its_last_with_the_records_cosine(monkeypatch):
    """The record's global step: n chunks of TTT_CHUNK_TOKENS, chunk c < n - 1 trained at LR * (1 + cos(pi c /
    (n - 1))) / 2, the last one not trained."""
    cfg, model, tokens = setup(TTT_MODE="lora", PHASED_TTT_PHASES=1, TTT_CHUNK_TOKENS=40, PHASED_TTT_LR=0.01)
    ev = evaluator(cfg, model, tokens)
    calls = []
    monkeypatch.setattr(tg.Evaluator, "train_on_span",
                        lambda self, toks, lo, hi, trainable, opt, lr, epochs, is_target: calls.append((lo, hi, lr)))
    docs = tg.document_spans(tokens, cfg.BOS_ID)[:3]
    joined = sum(n + 1 for _, n in docs)  # each document with its targets
    n = -(-(joined - 1) // 40)
    assert n >= 3
    ev.global_phase(docs)
    expected = [(40 * c, min(40 * c + 40, joined - 1), 0.01 * 0.5 * (1 + math.cos(math.pi * c / (n - 1))))
                for c in range(n - 1)]
    assert [(lo, hi) for lo, hi, _ in calls] == [(lo, hi) for lo, hi, _ in expected]
    assert all(math.isclose(a, b) for (_, _, a), (_, _, b) in zip(calls, expected))


def test_phases_train_the_base_weights_only_for_what_comes_after_them():
    """Batches up to the first phase score as without phases; after it every later batch scores differently."""
    knobs = dict(EVERY_SWITCH, TTT_DOC_BATCH=2, PHASED_TTT_PREFIX_DOCS=4, PHASED_TTT_LR=0.05)
    cfg, model, tokens = setup(**knobs, PHASED_TTT_PHASES=2)
    phased, info = lora_scores(cfg, model, tokens)
    plain, _ = lora_scores(tg.dataclasses.replace(cfg, PHASED_TTT_PHASES=0), model, tokens)
    assert info["ttt_phases"] == 2 and bool((phased.count == 1).all())
    spans = tg.document_spans(tokens, cfg.BOS_ID)
    queue = tg.lora_batches(spans, cfg.TTT_DOC_BATCH)
    first_end = tg.phase_schedule(queue, cfg.PHASED_TTT_PREFIX_DOCS, cfg.PHASED_TTT_PHASES)[0].after_batch
    for k, batch in enumerate(queue):
        for d in batch:
            start, n = spans[d]
            same = torch.equal(phased.nll[start:start + n], plain.nll[start:start + n])
            assert same == (k <= first_end), (k, d)


@pytest.mark.parametrize("mode", ["lora", "chunk"])
def test_split_softcaps_score_as_the_shared_cap_until_ttt_trains_them(mode):
    """ASYM_LOGIT_RESCALE: at their start the two caps give the shared cap's logits bit for bit, so LoRA TTT scores
    every batch up to the first phase exactly as without them (chunk TTT its first chunk); the TTT that trains the
    base weights (the phases, chunk TTT's SGD) then moves each cap its own way."""
    phases = dict(PHASED_TTT_PHASES=1, PHASED_TTT_PREFIX_DOCS=4, PHASED_TTT_LR=0.05, TTT_DOC_BATCH=2)
    knobs = dict(EVERY_SWITCH, TTT_MODE=mode, TTT_CHUNK_TOKENS=96, **(phases if mode == "lora" else {}))
    cfg, model, tokens = setup(**knobs)  # the model of ASYM_LOGIT_RESCALE=0
    cfg = tg.dataclasses.replace(cfg, ASYM_LOGIT_RESCALE=1)
    with torch.no_grad():  # logits of a trained model's size, near the cap, where the caps' gradients are not tiny
        model.tok_emb.weight.mul_(20)
    split = copy.deepcopy(model)
    split.split_softcap()
    hidden = torch.randn(3, 5, cfg.MODEL_DIM) * 10
    assert torch.equal(split.compute_logits(hidden), model.compute_logits(hidden))
    with_caps, without = evaluator(cfg, split, tokens), evaluator(cfg, copy.deepcopy(model), tokens)
    scored, _ = with_caps.run_pass(True, False)
    shared, _ = without.run_pass(True, False)
    positive, negative = (c.item() for c in split.split_caps)
    assert positive != cfg.LOGIT_SOFTCAP and negative != cfg.LOGIT_SOFTCAP and positive != negative
    if mode == "lora":
        spans = tg.document_spans(tokens, cfg.BOS_ID)
        queue = tg.lora_batches(spans, cfg.TTT_DOC_BATCH)
        first = [d for batch in queue[:tg.phase_schedule(queue, 4, 1)[0].after_batch + 1] for d in batch]
        before = torch.zeros_like(scored.nll, dtype=torch.bool)
        for d in first:
            start, n = spans[d]
            before[start:start + n] = True
    else:
        before = torch.arange(scored.nll.numel()) < cfg.TTT_CHUNK_TOKENS
    assert torch.equal(scored.nll[before], shared.nll[before]) and not torch.equal(scored.nll, shared.nll)


@pytest.mark.parametrize("knobs", [dict(PHASED_TTT_PHASES=2, PHASED_TTT_PREFIX_DOCS=9),
                                   dict(EVERY_SWITCH, PHASED_TTT_PHASES=3, PHASED_TTT_PREFIX_DOCS=12,
                                        ASYM_LOGIT_RESCALE=1),
                                   dict(NO_FRONTIER_PIECES, PHASED_TTT_PHASES=2, PHASED_TTT_PREFIX_DOCS=9)],
                         ids=["lora+phases", "every switch+phases", "no frontier pieces+phases"])
def test_causality_check_passes_phased_lora_ttt(knobs):
    verdicts = check_causality.check({"TTT_MODE": "lora", **{k: str(v) for k, v in knobs.items()}}, probes=4,
                                     n_tokens=160)
    for name, v in verdicts.items():
        assert v["C1/C3"] and v["C2"] and v["C4"], (name, v)


def test_causality_check_catches_a_phase_that_trains_on_an_unscored_document(monkeypatch):
    """The bug: a phase that also takes the first document of the batch after it, not yet scored."""
    real = tg.Evaluator.global_phase

    def one_document_too_many(self, docs):
        cfg = self.cfg
        spans = tg.document_spans(self.data.tokens, cfg.BOS_ID)
        queue = tg.lora_batches(spans, cfg.TTT_DOC_BATCH)
        phase = next(p for p in tg.phase_schedule(queue, cfg.PHASED_TTT_PREFIX_DOCS, cfg.PHASED_TTT_PHASES)
                     if p.documents == len(docs))
        real(self, [spans[queue[phase.after_batch + 1][-1]]] + docs)  # its longest, first (the last chunk is untrained)

    monkeypatch.setattr(tg.Evaluator, "global_phase", one_document_too_many)
    verdicts = check_causality.check({"TTT_MODE": "lora", "PHASED_TTT_PHASES": "2", "PHASED_TTT_PREFIX_DOCS": "9"},
                                     probes=10)
    assert leaks(verdicts) and verdicts["sliding"]["C1/C3"]


def test_the_compiled_lora_forward_compiles_one_graph_before_the_clock_and_scores_as_eager():
    """lora_forward with dynamic shapes (a counting backend, on the CPU): one graph, compiled in its warm-up on
    random tokens; the pass then runs every chunk width, long and short chunks, a last batch padded with empty
    rows and two phases that change the base weights and remake the adapters without one recompile, and scores
    every target as the eager forward does."""
    cfg, model, tokens = setup(**EVERY_SWITCH, PHASED_TTT_PHASES=2, PHASED_TTT_PREFIX_DOCS=4)
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled_model = copy.deepcopy(model)
    base_weights_take_gradients = []
    torch._dynamo.reset()
    try:
        lora_fn = tg.lora_forward(cfg, compiled_model, CPU, backend=counting_backend)
        warmed_up = len(graphs)

        def watched(*args):
            base_weights_take_gradients.append(any(p.requires_grad for p in compiled_model.parameters()))
            return lora_fn(*args)
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled, info = tg.Evaluator(cfg, compiled_model, evaluator(cfg, model, tokens).data, CPU, lambda _: None,
                                          lora_fn=watched).run_pass(True, False, with_mass=True)
    finally:
        torch._dynamo.reset()
    eager, eager_info = lora_scores(cfg, model, tokens)
    assert warmed_up == len(graphs) == 1
    # no gradient for them in the compiled backward, yet the phases train them, and all of them are on again after
    assert base_weights_take_gradients and not any(base_weights_take_gradients)
    assert all(p.requires_grad for p in compiled_model.parameters())
    info.pop("ngram_seconds"), eager_info.pop("ngram_seconds")  # a timing
    assert info == eager_info and info["ttt_phases"] == 2 and len(tg.document_spans(tokens, cfg.BOS_ID)) % 3 != 0
    torch.testing.assert_close(compiled.nll, eager.nll, rtol=0, atol=1e-5)
    torch.testing.assert_close(compiled.mass, eager.mass, rtol=0, atol=1e-5)
