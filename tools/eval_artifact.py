"""Evaluate a saved artifact with the evaluation knobs in the environment, without training.

    DATA_PATH=... TOKENIZER_PATH=... VOCAB_SIZE=1024 python3 tools/eval_artifact.py logs/RUN.ptz
    SLOT_ENABLED=1 SLOT_OPTIMIZER=lbfgs TTT_ENABLED=0 python3 tools/eval_artifact.py logs/RUN.ptz --max-tokens 50000

The model is rebuilt from the artifact alone (its own shape knobs); the run's evaluation passes
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


def evaluate_file(env, path: Path, max_tokens: int = 0, log=print) -> dict:
    cfg = tg.config_from_env(env)
    rt = tg.init_runtime(env)
    backend = tg.pick_attention_backend(rt.device, cfg.ATTENTION_BACKEND)
    # The artifact first: a model for another vocabulary fails here, before the data is read.
    model = tg.model_from_artifact(tg.load_artifact(path), cfg, backend, rt.device, origin=str(path))
    data_path, tokenizer_path = tg.resolve_paths(cfg)
    tables = tg.byte_tables(tg.load_tokenizer(tokenizer_path, cfg.VOCAB_SIZE))
    tokens = tg.load_validation_tokens(data_path)
    if int(tokens.max()) >= cfg.VOCAB_SIZE:
        raise tg.ConfigError(f"validation shards in {data_path} hold token id {int(tokens.max())} >= VOCAB_SIZE="
                             f"{cfg.VOCAB_SIZE}: DATA_PATH is another vocabulary's data")
    if max_tokens:
        tokens = tokens[:max_tokens]
    batch_seqs = max(1, cfg.VAL_BATCH_TOKENS // (cfg.TRAIN_SEQ_LEN * rt.world_size))
    summary = dict(artifact=str(path), tokens=tokens.numel())
    tg.evaluate_artifact_model(cfg, model, tokens, tables, batch_seqs, rt, log if rt.is_main else (lambda _: None), summary)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return summary


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


if __name__ == "__main__":
    main()
