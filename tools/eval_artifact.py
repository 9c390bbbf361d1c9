"""Evaluate a saved artifact with the evaluation knobs in the environment, without training.

    DATA_PATH=... TOKENIZER_PATH=... VOCAB_SIZE=1024 python3 tools/eval_artifact.py logs/RUN.ptz
    SLOT_ENABLED=1 SLOT_LOGIT_BIAS=1 TTT_ENABLED=0 python3 tools/eval_artifact.py logs/RUN.ptz --max-tokens 50000

The model is rebuilt from the artifact alone (its own ModelConfig: shape knobs in the environment that
disagree are ignored, with a warning); the run's evaluation passes
(plain, then TTT and/or SLOT as configured; sliding window when neither is on, or with
EVAL_SLIDING_ALSO=1) score the validation stream, or its first --max-tokens tokens. Prints one
line per pass and the summary as JSON. Works under torchrun.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
import train_gpt as tg  # noqa: E402


def shape_knob_conflicts(env, model_config: tg.ModelConfig) -> list[str]:
    """Model knobs set in the environment that the artifact's own ModelConfig overrides."""
    warnings, fields = [], tg.knob_fields()
    for name, value in tg.dataclasses.asdict(model_config).items():
        if name in env and name != "VOCAB_SIZE":  # VOCAB_SIZE must agree: model_from_artifact refuses a mismatch
            given = tg.parse_knob(name, env[name], fields[name])
            if given != value:
                warnings.append(f"WARNING: {name}={env[name]} in the environment is ignored: the artifact's model has "
                                f"{name}={value}")
    return warnings


def evaluate_file(env, path: Path, max_tokens: int = 0, log=print) -> dict:
    cfg = tg.config_from_env(env)
    rt = tg.init_runtime(env)
    if not rt.is_main:
        log = lambda _: None  # noqa: E731 - rank 0 alone speaks
    backend = tg.pick_attention_backend(rt.device, cfg.ATTENTION_BACKEND)
    # The artifact first: a model for another vocabulary fails here, before the data is read.
    qm = tg.load_artifact(path)
    model = tg.model_from_artifact(qm, cfg, backend, rt.device, origin=str(path))
    for warning in shape_knob_conflicts(env, qm.model_config):
        log(warning)
    val = tg.load_validation_data(cfg)
    if max_tokens:
        val = val.head(max_tokens)
    batch_seqs = max(1, cfg.VAL_BATCH_TOKENS // (cfg.TRAIN_SEQ_LEN * rt.world_size))
    result = tg.evaluate_artifact_model(cfg, model, val, batch_seqs, rt, log)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return dict(artifact=str(path), tokens=val.tokens.numel(), byte_source=val.byte_source,
                byte_convention=val.byte_convention,
                model_config=tg.dataclasses.asdict(qm.model_config),
                **tg.summary_fields(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--max-tokens", type=int, default=0, help="score only the first N validation tokens")
    args = parser.parse_args()
    try:
        summary = evaluate_file(dict(os.environ), args.artifact, args.max_tokens)
    except (tg.ConfigError, tg.ArtifactError) as e:
        sys.exit(f"error: {e}")
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=1))
    if os.environ.get("WORLD_SIZE", "1") != "1":
        tg.exit_process(0)  # not through the interpreter's finalization, which gloo's threads can abort


if __name__ == "__main__":
    main()
