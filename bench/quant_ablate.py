"""Quantization variants on one trained model: bytes, Hessian-weighted error and the quantization gap.

    python3 bench/quant_ablate.py --variant lqer_off:LQER_RANK=0 --variant damp:GPTQ_DAMP_MLP=0.02 \
        -- PRESET=sample DATA_PATH=... TOKENIZER_PATH=... ITERATIONS=300 TTT_ENABLED=0 SLOT_ENABLED=0

Trains the shared knobs once (in this process, on the CPU or one GPU), applies the EMA, collects the GPTQ
Hessians once from training data, then for the baseline (the shared knobs) and every variant: GPTQ with the
variant's quantization knobs, the artifact's compressed bytes, the Hessian-weighted error sum_g tr(E H E^T) with
E = W - W_hat (per group and in all), and the val_bpb of the model decoded from that artifact against the trained
model's (the quantization gap). A variant may set only knobs that act after training (bits, clips, damping,
LQER, compressor, passthrough size); anything else would need another model and is refused.

`--calibration` variants keep the shared quantization knobs and change where the Hessians come from (another
number of batches, or the live model's last training batches: what Hessians accumulated from the training
steps' own forwards would hold); with `--reference-batches N` every
weighted error is measured against Hessians of N calibration batches, so variants with less data are judged
against the same, better estimate of the true Hessians. Each row also gives its calibration seconds:

    python3 bench/quant_ablate.py --reference-batches 128 --calibration b8:batches=8 \
        --calibration last32:batches=32,source=last -- PRESET=sample ... GPTQ_CALIBRATION_BATCHES=32
"""
import argparse
import collections
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))
import train_gpt as tg  # noqa: E402
from ablate import parse_knobs, parse_variant  # noqa: E402

POST_TRAINING_KNOBS = {"QUANT_METHOD", "MATRIX_BITS", "EMBED_BITS", "MATRIX_CLIP_SIGMAS", "ATTN_CLIP_SIGMAS",
                       "MLP_CLIP_SIGMAS", "EMBED_CLIP_SIGMAS", "QUANT_PASSTHROUGH_NUMEL", "GPTQ_DAMP", "GPTQ_DAMP_ATTN",
                       "GPTQ_DAMP_MLP", "GPTQ_DAMP_EMBED", "GPTQ_BLOCK_SIZE", "LQER_RANK", "LQER_TOP_K", "LQER_GROUP",
                       "AWQ_TOP_GROUPS", "AWQ_GROUP_SIZE", "COMPRESSOR"}


def variant_config(cfg: tg.Config, knobs: dict[str, str]) -> tg.Config:
    fields = tg.knob_fields()
    wrong = sorted(set(knobs) - POST_TRAINING_KNOBS)
    if wrong:
        raise SystemExit(f"error: {wrong[0]} changes training, not quantization; a variant may set only "
                         f"{', '.join(sorted(POST_TRAINING_KNOBS))}")
    changed = dataclasses.replace(cfg, **{k: tg.parse_knob(k, v, fields[k]) for k, v in knobs.items()})
    tg.validate_config(changed)
    return changed


def plain_pass(model_fn, cfg: tg.Config, val, rt: tg.Runtime) -> dict:
    """The plain validation pass train_gpt.py scores before and after quantization."""
    return tg.evaluate(model_fn, val, cfg.TRAIN_SEQ_LEN, max(1, cfg.VAL_BATCH_TOKENS // cfg.TRAIN_SEQ_LEN), rt)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Where a variant's GPTQ Hessians come from. source=first: the trainer's calibration (the EMA model on
    a fresh loader's first `batches` batches); source=last: the live model's activations on the last
    `batches` training batches, i.e. what Hessians accumulated during the final training steps would hold."""
    batches: int
    source: str = "first"


def parse_calibration(text: str) -> tuple[str, Calibration]:
    """'label:batches=8,source=last' -> ('label', Calibration(8, 'last'))."""
    label, sep, spec = text.partition(":")
    try:
        fields = dict(item.split("=", 1) for item in spec.split(","))
        calibration = Calibration(int(fields.pop("batches")), fields.pop("source", "first"))
    except (ValueError, KeyError):
        fields, calibration = None, None
    if not sep or not label or fields or calibration is None or calibration.batches < 1 \
            or calibration.source not in ("first", "last"):
        raise SystemExit(f"error: --calibration {text!r} is not LABEL:batches=N[,source=first|last] with N >= 1")
    return label, calibration


def hessians_and_seconds(cfg, model, plan, batches, rt) -> tuple[dict, float]:
    t0 = time.perf_counter()
    hessians, _ = tg.collect_hessians(cfg, model, plan, batches, rt)
    return hessians, time.perf_counter() - t0


def trained_model(cfg: tg.Config, rt: tg.Runtime, late: dict[str, Calibration]):
    """(EMA model with recurrence on, training files, validation data, backend, {label: (Hessians, seconds)} of
    the `late` calibrations), trained as train_gpt.py trains. The late ones are collected from the live
    weights before the EMA replaces them, on the last training batches (recorded as the loop hands them to
    train_step)."""
    log = lambda line: print(line, flush=True)  # noqa: E731
    train_files, val = tg.load_inputs(cfg, log)
    backend = tg.pick_attention_backend(rt.device, cfg.ATTENTION_BACKEND)
    model, model_fn, optimizers = tg.build_model(cfg, backend, rt, log)
    budget = tg.training_budget(cfg, model, rt, log)
    recent = collections.deque(maxlen=max([c.batches for c in late.values()], default=0))
    real_step = tg.train_step

    def recording_step(cfg_, model_fn_, model_, optimizers_, batch, rt_):
        recent.append(batch)
        return real_step(cfg_, model_fn_, model_, optimizers_, batch, rt_)

    tg.train_step = recording_step
    try:
        result = tg.Trainer(cfg, model_fn, model, optimizers, train_files, rt, log).train(
            lambda: plain_pass(model_fn, cfg, val, rt), budget.seconds)
    finally:
        tg.train_step = real_step
    model.looping = cfg.NUM_LOOPS > 0
    plan = tg.quantization_plan(model, cfg)
    late_hessians = {label: hessians_and_seconds(cfg, model, plan, list(recent)[-c.batches:], rt)
                     for label, c in late.items()}
    if result.ema is not None:
        result.ema.copy_to()
    return model, train_files, val, backend, late_hessians


def weighted_errors(plan: list[tg.QuantGroup], state: dict, decoded: dict, hessians: dict) -> dict[str, float]:
    """tr(E H E^T) per group (attention, mlp, embedding) and in all: the loss increase GPTQ minimizes."""
    errors = {"all": 0.0}
    for g in plan:
        E = torch.cat([state[n].float() - decoded[n].float() for n in g.names])
        H = hessians[g.hessian].to(E.device)
        value = float(((E @ H) * E).sum())
        errors[g.group] = errors.get(g.group, 0.0) + value
        errors["all"] += value
    return errors


def measure(cfg: tg.Config, model: tg.GPT, plan, hessians, reference, val, backend: str, rt: tg.Runtime) -> dict:
    """GPTQ from `hessians`; the weighted error against `reference` (the best estimate of the true Hessians)."""
    factors = tg.gptq_factors(cfg, plan, hessians) if cfg.QUANT_METHOD == "gptq" else None
    packed = tg.quantize_model(cfg, model, plan, factors)
    blob, by_group = tg.encode_artifact(packed, cfg.COMPRESSOR)
    decoded_model = tg.model_from_artifact(tg.decode_artifact(blob), cfg, backend, rt.device)
    state = model.state_dict()
    errors = weighted_errors(plan, state, decoded_model.state_dict(), reference)
    return dict(model_bytes=len(blob), bytes_by_group=by_group, weighted_error=errors,
                quantized_val_bpb=plain_pass(decoded_model, cfg, val, rt)["val_bpb"])


def table(results: dict, pre_quant_bpb: float) -> str:
    base = results["baseline"]
    rows = ["| variant | model bytes | Δ bytes | H-error attn | H-error mlp | H-error emb | H-error all | Δ% | "
            "quantized bpb | gap vs pre-quant | Δ gap | calibration s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        e, b = r["weighted_error"], base["weighted_error"]
        gap = r["quantized_val_bpb"] - pre_quant_bpb
        rows.append(f"| {label} | {r['model_bytes']} | {r['model_bytes'] - base['model_bytes']:+d} | "
                    f"{e.get('attention', 0):.4g} | {e.get('mlp', 0):.4g} | {e.get('embedding', 0):.4g} | "
                    f"{e['all']:.4g} | {100 * (e['all'] / b['all'] - 1):+.1f} | {r['quantized_val_bpb']:.5f} | "
                    f"{gap:+.5f} | {r['quantized_val_bpb'] - base['quantized_val_bpb']:+.5f} | "
                    f"{r['calibration_seconds']:.2f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", default=[], type=parse_variant,
                        help="LABEL:NAME=VALUE[,NAME=VALUE...] of post-training knobs; repeatable")
    parser.add_argument("--calibration", action="append", default=[], type=parse_calibration,
                        help="LABEL:batches=N[,source=first|last]: GPTQ from other Hessians (the "
                             "shared knobs' quantization); repeatable")
    parser.add_argument("--reference-batches", type=int, default=0,
                        help="measure every weighted error against Hessians of this many calibration batches "
                             "(default: the baseline's own)")
    parser.add_argument("--json", type=Path, help="write every variant's figures here")
    parser.add_argument("shared", nargs="*", help="NAME=VALUE knobs of the trained model and the baseline")
    args = parser.parse_args(argv)
    cfg = tg.config_from_env(parse_knobs(args.shared))
    variants = {"baseline": cfg, **{label: variant_config(cfg, knobs) for label, knobs in args.variant}}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rt = tg.Runtime(0, 1, device)
    calibrations = dict(args.calibration)
    model, train_files, val, backend, late = trained_model(
        cfg, rt, {label: c for label, c in calibrations.items() if c.source == "last"})
    pre_quant_bpb = plain_pass(model, cfg, val, rt)["val_bpb"]
    plan = tg.quantization_plan(model, cfg)

    def first_batches(count: int) -> tuple[dict, float]:
        counted = dataclasses.replace(cfg, GPTQ_CALIBRATION_BATCHES=count)
        return hessians_and_seconds(counted, model, plan, tg.calibration_batches(counted, train_files, rt), rt)

    hessians, seconds = first_batches(cfg.GPTQ_CALIBRATION_BATCHES)
    reference = first_batches(args.reference_batches)[0] if args.reference_batches else hessians
    results = {}
    for label, vcfg in variants.items():
        if tg.quantization_plan(model, vcfg) != plan:
            raise SystemExit(f"error: variant {label} plans other matrices (QUANT_PASSTHROUGH_NUMEL): its Hessians "
                             "were not collected")
        results[label] = dict(measure(vcfg, model, plan, hessians, reference, val, backend, rt),
                              calibration_seconds=seconds)
        print(f"{label}: {results[label]}", flush=True)
    for label, c in calibrations.items():
        variant_hessians, variant_seconds = late[label] if c.source == "last" else first_batches(c.batches)
        results[label] = dict(measure(cfg, model, plan, variant_hessians, reference, val, backend, rt),
                              calibration_seconds=variant_seconds)
        print(f"{label}: {results[label]}", flush=True)
    print(f"pre-quantization val_bpb: {pre_quant_bpb:.5f}")
    print(table(results, pre_quant_bpb))
    if args.json:
        args.json.write_text(json.dumps(dict(shared=args.shared, variants={k: dataclasses.asdict(v) for k, v in
                                                                           variants.items()},
                                             pre_quant_val_bpb=pre_quant_bpb, results=results), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
