"""Flip test: prove the configured evaluation path never looks ahead.

Runs the trainer's real evaluation passes (sliding window, then TTT and/or SLOT as the knobs in
the environment say) on a small random model and a random token stream, then for each probe
position j changes token j, runs everything again from the same weights, and requires the loss
of every target before j to be bit-identical. It also checks that every scored distribution sums
to one over the whole vocabulary and that every target is scored exactly once.

    python3 tools/check_causality.py                                   # the defaults
    SLOT_ENABLED=1 SLOT_LOGIT_BIAS=1 python3 tools/check_causality.py
    python3 tools/check_causality.py --plant slot-full                 # exits 1: a planted leak
    TTT_MODE=lora python3 tools/check_causality.py                     # per-document LoRA TTT
    TTT_MODE=lora PHASED_TTT_PHASES=2 PHASED_TTT_PREFIX_DOCS=4 python3 tools/check_causality.py

Conditions (community guide #1017): C1 the score at t depends only on tokens before t; C2 each
score comes from a normalized distribution over the full vocabulary; C3 no state has absorbed a
token before it is scored (a TTT that trains before scoring fails the flip test too); C4 every
token is scored exactly once. Prints a verdict per condition and exits 1 on any violation.
Per-document LoRA TTT scores documents batch by batch, out of stream order, so for it "before" means
scored before the changed token was seen: earlier batches, the other documents of its batch, and the
earlier targets of its own document (the stream keeps its BOS tokens, so the batches stay the same).
A phase trains the base weights on whole scored batches only, so the same sets apply with phases. The n-gram
tilt (on by default, NGRAM_TILT=0 turns it off) rides in every pass; its hints count what the pass scored before,
so the same sets apply to it, and C2 sums the tilted distributions. The random stream repeats stretches of earlier
documents, so hints fire.

`--plant NAME` first plants one of the classic leaks in the trainer's functions (in this process only) and
shows the check failing on it: `slot-full` fits SLOT on the positions it scores too, `slot-batch` shares one
SLOT delta across a batch of windows (as the leaky seed submissions did), `ttt-trains-first` lets chunk TTT
train on a chunk before scoring it, `ngram-later-docs` lets the n-gram tilt count the documents after a
target's own. The trainer itself has no such mode.
"""
import argparse
import contextlib
import copy
import os
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
import train_gpt as tg  # noqa: E402

# A small model and stream that still exercise every mechanism: several windows per batch,
# several TTT chunks, context and scored positions in every window. The sliding pass always runs
# too, as the control beside an adapted pass. Environment knobs win.
CHECK_DEFAULTS = dict(VOCAB_SIZE=128, NUM_LAYERS=3, MODEL_DIM=32, NUM_HEADS=2, NUM_KV_HEADS=1, ROPE_DIMS=8,
                      XSA_LAST_N=3, NUM_LOOPS=1, LOOP_START=1, LOOP_END=1, PARALLEL_RESIDUAL_START=2,
                      TRAIN_SEQ_LEN=32, TRAIN_BATCH_TOKENS=256, EVAL_SEQ_LEN=32, EVAL_STRIDE=8,
                      EVAL_BATCH_WINDOWS=6, TTT_CHUNK_TOKENS=64, TTT_EPOCHS=2, TTT_LR=0.05, SLOT_STEPS=3,
                      SLOT_LR=0.05, EVAL_TIME_BUDGET=0, EVAL_SLIDING_ALSO=1, TTT_DOC_BATCH=3, TTT_DOC_CHUNK=8,
                      TTT_SHORT_DOC_CHUNK=4, TTT_SHORT_DOC_LEN=20, TTT_LORA_RANK=4, TTT_LORA_LR=0.05,
                      TTT_MODE="chunk", PHASED_TTT_PHASES=0,  # TTT_MODE=lora (with PHASED_TTT_PHASES) checks the rest
                      NGRAM_ORDER=5, NGRAM_THRESHOLD=0.5)  # short contexts: the stream's repeats give many hints
STREAM_TOKENS = 300


def check_config(env) -> tg.Config:
    return tg.config_from_env({k: v for k, v in env.items() if k in tg.knob_fields()}, base=CHECK_DEFAULTS)


def random_model(cfg: tg.Config, seed: int) -> tg.GPT:
    """Every weight random (the zero-initialized projections too), so every position can
    influence every later one and a leak has a path to show itself."""
    torch.manual_seed(seed)
    model = tg.GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 1.0 / p.size(1) ** 0.5)
            elif name == "smear_lambda":  # a closed SmearGate would hide a leak across positions
                p.fill_(1.0)
    model.looping = cfg.NUM_LOOPS > 0
    if cfg.ASYM_LOGIT_RESCALE:  # as the evaluation's model gets them, apart already (as after some TTT)
        model.split_softcap()
        with torch.no_grad():
            model.split_caps[1].mul_(0.5)
    return model.eval()


def random_stream(cfg: tg.Config, generator: torch.Generator, n_tokens: int = STREAM_TOKENS) -> torch.Tensor:
    """Documents of 8 to 60 tokens, each starting with BOS_ID (no BOS elsewhere), so per-document TTT sees several
    batches, documents and chunks. About half open with a stretch of an earlier document, so the n-gram tilt meets
    contexts it has seen (with hints that are right, and after a flip, wrong); their own lengths put them in other
    LoRA batches than their sources, whose hints they may then use."""
    def draw(high: int) -> int:
        return int(torch.randint(high, (1,), generator=generator))

    documents: list[torch.Tensor] = []
    while sum(map(len, documents)) < n_tokens:
        length = 8 + draw(53)
        document = torch.randint(0, cfg.VOCAB_SIZE, (length,), generator=generator, dtype=torch.int32)
        if documents and draw(2):
            source = documents[draw(len(documents))]
            copied = min(length, len(source)) - draw(4)
            document[:copied] = source[:copied]
        document[document == cfg.BOS_ID] = (cfg.BOS_ID + 1) % cfg.VOCAB_SIZE
        document[0] = cfg.BOS_ID
        documents.append(document)
    return torch.cat(documents)[:n_tokens]


def one_byte_per_token(vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Byte tables in which every token is one byte, with no leading space and no control tokens."""
    no = torch.zeros(vocab, dtype=torch.bool)
    return torch.ones(vocab, dtype=torch.int64), no, no


def run_passes(cfg: tg.Config, model: tg.GPT, tokens: torch.Tensor, rt: tg.Runtime | None = None) -> dict:
    """Every evaluation pass the knobs ask for, each from a fresh copy of the weights. The passes never
    read the byte tables (only the final score does), so one byte per token stands in for a tokenizer."""
    rt = rt or tg.Runtime(0, 1, torch.device("cpu"))
    data = tg.ValidationData(tokens, one_byte_per_token(cfg.VOCAB_SIZE))
    return {name: tg.Evaluator(cfg, copy.deepcopy(model), data, rt, log=lambda _: None).run_pass(ttt, slot,
                                                                                                 with_mass=True)[0]
            for name, ttt, slot in tg.eval_passes(cfg)}


def probe_positions(tokens: torch.Tensor, bos_id: int, count: int, seed: int) -> list[int]:
    """Spread over the stream, the first and last non-BOS targets included. BOS tokens stay: they are the
    documents' boundaries, which per-document TTT plans its batches from."""
    inside = (tokens[1:] != bos_id).nonzero().flatten() + 1
    g = torch.Generator().manual_seed(seed)
    middle = inside[1:-1][torch.randperm(inside.numel() - 2, generator=g)[:max(0, count - 2)]]
    return sorted({int(inside[0]), int(inside[-1]), *middle.tolist()})


def unchangeable(cfg: tg.Config, name: str, tokens: torch.Tensor, j: int) -> torch.Tensor:
    """Which targets (bool, indexed by target - 1) may not change when token j changes. In stream order (sliding,
    chunk TTT, SLOT): every target before j. Per-document LoRA TTT scores documents out of stream order, batch by
    batch (tg.lora_batches), so there: every target of an earlier batch, of the other documents of j's batch (each
    has its own adapter row), and of j's document before j."""
    n = tokens.numel() - 1
    if not (name == "ttt" and cfg.TTT_MODE == "lora"):
        return torch.arange(1, n + 1) < j
    spans = tg.document_spans(tokens, cfg.BOS_ID)
    batch_of, doc_of = torch.empty(n, dtype=torch.long), torch.empty(n, dtype=torch.long)
    for k, batch in enumerate(tg.lora_batches(spans, cfg.TTT_DOC_BATCH)):
        for d in batch:
            start, count = spans[d]
            batch_of[start:start + count], doc_of[start:start + count] = k, d
    targets = torch.arange(1, n + 1)
    k, d = batch_of[j - 1], doc_of[j - 1]
    return (batch_of < k) | ((batch_of == k) & (doc_of != d)) | ((doc_of == d) & (targets < j))


def check(env=None, probes: int = 10, seed: int = 0, n_tokens: int = STREAM_TOKENS) -> dict:
    """Verdicts per pass and condition: {pass: {"C1/C3": bool, "C2": bool, "C4": bool, "leaks": [(j, first changed target, count)]}}."""
    cfg = check_config(os.environ if env is None else env)
    model = random_model(cfg, seed)
    g = torch.Generator().manual_seed(seed + 1)  # draws the stream, then the flipped tokens
    tokens = random_stream(cfg, g, n_tokens)
    base = run_passes(cfg, model, tokens)
    verdicts = {}
    for name, scores in base.items():
        verdicts[name] = {"C2": bool(((scores.mass - 1).abs() < 1e-5).all()),
                          "C4": bool((scores.count == 1).all()), "leaks": []}
    for j in probe_positions(tokens, cfg.BOS_ID, probes, seed):
        flipped = tokens.clone()
        while int(flipped[j]) in (int(tokens[j]), cfg.BOS_ID):  # another token, never a BOS: the documents stay as they are
            flipped[j] = int(torch.randint(cfg.VOCAB_SIZE, (1,), generator=g))
        for name, scores in run_passes(cfg, model, flipped).items():
            fixed = unchangeable(cfg, name, tokens, j)
            differ = ((scores.nll != base[name].nll) & fixed).nonzero().flatten()
            if differ.numel():
                verdicts[name]["leaks"].append((j, int(differ[0]) + 1, differ.numel()))
    for v in verdicts.values():
        v["C1/C3"] = not v["leaks"]
    return verdicts


def slot_fitted_on_scored_positions():
    real = tg.fit_slot
    return "fit_slot", lambda cfg, model, hidden, targets, fit_mask, warm: real(
        cfg, model, hidden, targets, torch.ones_like(fit_mask), warm)


def slot_delta_shared_by_the_batch():
    real = tg.slot_parameters
    return "slot_parameters", lambda cfg, hidden, vocab, warm: real(cfg, hidden[:1], vocab, warm)


def ttt_trained_before_scoring():
    real = tg.Evaluator.score_window_range

    def train_then_score(self, starts, first_scored, scores, *args, own_budget=True):
        if not own_budget:  # inside chunk TTT: train on the chunk about to be scored first (the bug)
            chunk = int(starts[0] + first_scored[0]) // self.cfg.TTT_CHUNK_TOKENS
            params = list(self.model.parameters())
            self.train_on_chunk(chunk, params, torch.optim.SGD(params, lr=self.cfg.TTT_LR), self.cfg.TTT_LR)
        real(self, starts, first_scored, scores, *args, own_budget=own_budget)
    return "Evaluator.score_window_range", train_then_score


def ngram_counts_from_later_documents():
    real = tg.ngram_hints
    return "ngram_hints", lambda tokens, docs, units, *rest: real(tokens, docs[::-1], range(len(docs)), *rest)


# name -> (the knobs that turn the leaking pass on, the patch: (attribute of train_gpt, replacement)).
PLANTS = {"slot-full": (dict(TTT_ENABLED="0", SLOT_ENABLED="1"), slot_fitted_on_scored_positions),
          "slot-batch": (dict(TTT_ENABLED="0", SLOT_ENABLED="1"), slot_delta_shared_by_the_batch),
          "ttt-trains-first": (dict(TTT_ENABLED="1", TTT_MODE="chunk", SLOT_ENABLED="0"), ttt_trained_before_scoring),
          "ngram-later-docs": (dict(TTT_ENABLED="0", NGRAM_TILT="1"), ngram_counts_from_later_documents)}


@contextlib.contextmanager
def planted(name: str):
    """The trainer with leak `name` planted, inside the block only; yields the knobs its pass needs."""
    knobs, make_patch = PLANTS[name]
    attribute, replacement = make_patch()
    owner_name, _, leaf = attribute.rpartition(".")
    owner = getattr(tg, owner_name) if owner_name else tg
    real = getattr(owner, leaf)
    setattr(owner, leaf, replacement)
    try:
        yield knobs
    finally:
        setattr(owner, leaf, real)


def describe(cfg_env) -> str:
    cfg = check_config(cfg_env)
    slot = (f"SLOT bias={cfg.SLOT_LOGIT_BIAS} warm={cfg.SLOT_WARM_START}" if cfg.SLOT_ENABLED else "no SLOT")
    switches = [name for name in ("SMEAR_GATE", "SPARSE_ATTN_GATE", "VARLEN_ATTENTION") if getattr(cfg, name)]
    switches += ["two lanes"] if cfg.PARALLEL_LANES_START < cfg.NUM_LAYERS else []
    model = f"model with {', '.join(switches)}" if switches else "model without frontier switches"
    phases = f" with {cfg.PHASED_TTT_PHASES} phases" if cfg.TTT_MODE == "lora" and cfg.PHASED_TTT_PHASES else ""
    ttt = f"TTT {cfg.TTT_MODE}{phases}" if cfg.TTT_ENABLED else "no TTT"
    tilt = f"n-gram tilt (order {cfg.NGRAM_ORDER})" if cfg.NGRAM_TILT else "no n-gram tilt"
    return (f"{ttt}, {slot}, {tilt}, EVAL_SEQ_LEN={cfg.EVAL_SEQ_LEN} "
            f"EVAL_STRIDE={cfg.EVAL_STRIDE}, {model}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plant", choices=sorted(PLANTS), help="plant this leak first (the check must fail)")
    args = parser.parse_args(argv)
    with planted(args.plant) if args.plant else contextlib.nullcontext({}) as knobs:
        env = {**os.environ, **knobs}
        print(f"causality check: {describe(env)}; {STREAM_TOKENS}-token random stream, random model"
              + (f"; planted leak: {args.plant}" if args.plant else ""))
        verdicts = check(env)
    return report(verdicts, check_config(env))


def report(verdicts: dict, cfg: tg.Config) -> int:
    ok = True
    for name, v in verdicts.items():
        before = ("every loss scored before the changed token was seen is bit-identical"
                  if name == "ttt" and cfg.TTT_MODE == "lora" else "losses before a changed token are bit-identical")
        for cond, what in (("C1/C3", before),
                           ("C2", "every scored distribution sums to 1 over the vocabulary"),
                           ("C4", "every target scored exactly once")):
            ok &= v[cond]
            print(f"  {name:8s} {cond:5s} {'PASS' if v[cond] else 'FAIL'}  {what}")
        for j, first, n in v["leaks"][:5]:
            print(f"           changing token {j} changed {n} earlier losses, the first at target {first}")
    print("verdict:", "causal" if ok else "VIOLATION")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
