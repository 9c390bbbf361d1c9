"""Flip test: prove the configured evaluation path never looks ahead.

Runs the trainer's real evaluation passes (sliding window, then TTT and/or SLOT as the knobs in
the environment say) on a small random model and a random token stream, then for each probe
position j changes token j, runs everything again from the same weights, and requires the loss
of every target before j to be bit-identical. It also checks that every scored distribution sums
to one over the whole vocabulary and that every target is scored exactly once.

    python3 tools/check_causality.py                                   # the defaults
    SLOT_ENABLED=1 SLOT_OPTIMIZER=lbfgs python3 tools/check_causality.py
    SLOT_ENABLED=1 SLOT_MODE=full python3 tools/check_causality.py     # exits 1: it leaks

Conditions (community guide #1017): C1 the score at t depends only on tokens before t; C2 each
score comes from a normalized distribution over the full vocabulary; C3 no state has absorbed a
token before it is scored (a TTT that trains before scoring fails the flip test too); C4 every
token is scored exactly once. Prints a verdict per condition and exits 1 on any violation.
"""
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
                      SLOT_LR=0.05, EVAL_TIME_BUDGET=0, EVAL_SLIDING_ALSO=1)
STREAM_TOKENS = 300


def check_config(env) -> tg.Config:
    merged = {k: str(v) for k, v in CHECK_DEFAULTS.items()}
    merged.update({k: v for k, v in env.items() if k in tg.knob_fields()})
    return tg.config_from_env(merged)


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
    return model.eval()


def random_stream(cfg: tg.Config, generator: torch.Generator, n_tokens: int = STREAM_TOKENS) -> torch.Tensor:
    return torch.randint(0, cfg.VOCAB_SIZE, (n_tokens,), generator=generator, dtype=torch.int32)


def one_byte_per_token(vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Byte tables in which every token is one byte, with no leading space and no control tokens."""
    no = torch.zeros(vocab, dtype=torch.bool)
    return torch.ones(vocab, dtype=torch.int64), no, no


def run_passes(cfg: tg.Config, model: tg.GPT, tokens: torch.Tensor, rt: tg.Runtime | None = None) -> dict:
    """Every evaluation pass the knobs ask for, each from a fresh copy of the weights. The passes never
    read the byte tables (only the final score does), so one byte per token stands in for a tokenizer."""
    rt = rt or tg.Runtime(0, 1, torch.device("cpu"))
    data = tg.ValidationData(tokens, one_byte_per_token(cfg.VOCAB_SIZE))
    return {name: tg.Evaluator(cfg, copy.deepcopy(model), data, rt).run_pass(ttt, slot, with_mass=True)[0]
            for name, ttt, slot in tg.eval_passes(cfg)}


def probe_positions(n_tokens: int, count: int, seed: int) -> list[int]:
    """Spread over the stream, first and last target included."""
    g = torch.Generator().manual_seed(seed)
    middle = torch.randperm(n_tokens - 3, generator=g)[:max(0, count - 2)] + 2
    return sorted({1, n_tokens - 1, *middle.tolist()})


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
    for j in probe_positions(n_tokens, probes, seed):
        flipped = tokens.clone()
        flipped[j] = (flipped[j] + 1 + int(torch.randint(cfg.VOCAB_SIZE - 1, (1,), generator=g))) % cfg.VOCAB_SIZE
        for name, scores in run_passes(cfg, model, flipped).items():
            before = slice(0, j - 1)  # targets 1..j-1 live at indices 0..j-2
            differ = (scores.nll[before] != base[name].nll[before]).nonzero().flatten()
            if differ.numel():
                verdicts[name]["leaks"].append((j, int(differ[0]) + 1, differ.numel()))
    for v in verdicts.values():
        v["C1/C3"] = not v["leaks"]
    return verdicts


def describe(cfg_env) -> str:
    cfg = check_config(cfg_env)
    slot = (f"SLOT {cfg.SLOT_OPTIMIZER} mode={cfg.SLOT_MODE} scope={cfg.SLOT_DELTA_SCOPE} bias={cfg.SLOT_LOGIT_BIAS} "
            f"warm={cfg.SLOT_WARM_START}" if cfg.SLOT_ENABLED else "no SLOT")
    switches = [name for name in ("SMEAR_GATE", "SPARSE_ATTN_GATE", "VARLEN_ATTENTION") if getattr(cfg, name)]
    switches += ["two lanes"] if cfg.PARALLEL_LANES_START < cfg.NUM_LAYERS else []
    model = f"model with {', '.join(switches)}" if switches else "model without frontier switches"
    return (f"TTT={'on' if cfg.TTT_ENABLED else 'off'}, {slot}, EVAL_SEQ_LEN={cfg.EVAL_SEQ_LEN} "
            f"EVAL_STRIDE={cfg.EVAL_STRIDE}, {model}")


def main() -> int:
    print(f"causality check: {describe(os.environ)}; {STREAM_TOKENS}-token random stream, random model")
    verdicts = check()
    ok = True
    for name, v in verdicts.items():
        for cond, what in (("C1/C3", "losses before a changed token are bit-identical"),
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
