"""One command that checks every CUDA path of train_gpt.py on a machine with one GPU, and prints one table.

    python3 bench/gpu_check.py --train-jsonl enwiki.part1.jsonl.xz --val-jsonl enwiki.part4.jsonl.xz --out gc
    python3 bench/gpu_check.py --tiny --out gc      # the same steps at tiny size, on a CPU

Steps, each a row of the table (pass / fail / skip, seconds, figures):
  1. environment: torch, CUDA, GPU, FlashAttention 3/2, brotli, liger-kernel, triton, and the attention backend `auto` picks;
  2. the `cuda`-marked tests (tests/test_cuda.py): compiled == eager (the model and LoRA TTT's forward), FA3/FA2 ==
     SDPA, Parallel Muon == the unbanked reference, GPTQ on the GPU == on the CPU, a bit-exact artifact round trip;
  3. a short training run through GPTQ, the artifact and every evaluation pass on a local corpus
     (tokenized here by data/make_sample.py --jsonl, or one tokenized before: --corpus);
  4. the training run's artifact evaluated again with TTT_MODE=lora: per-document LoRA TTT's score and seconds, and
     the seconds its compiled forward took to compile and warm up;
  5. bench/throughput.py at the record shape (8 micro-batches on one GPU): ms/step, tok/s, MFU, memory.
About 20 minutes in all with the defaults; `--time-limit S` stops a step that would run past S seconds from the
start and records it as failed, so the table always comes out. gpu_check.json is rewritten after every step.
`--out DIR` keeps gpu_check.json, the logs and the corpus there. The exit status is 1 when any step failed.
"""
import argparse
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
import train_gpt as tg  # noqa: E402

# --tiny: the sample preset cut down further, so every step runs on a CPU in about a minute.
TINY_KNOBS = dict(PRESET="sample", NUM_LAYERS=3, MODEL_DIM=64, NUM_HEADS=2, NUM_KV_HEADS=1, XSA_LAST_N=3, LOOP_START=1,
                  LOOP_END=1, PARALLEL_RESIDUAL_START=2, TRAIN_SEQ_LEN=128, TRAIN_BATCH_TOKENS=1024, EVAL_SEQ_LEN=128,
                  EVAL_STRIDE=128, GPTQ_CALIBRATION_BATCHES=2, SLOT_STEPS=1)
PACKAGES = {"flash_attn_interface": "FlashAttention 3", "flash_attn": "FlashAttention 2", "brotli": "brotli",
            "liger_kernel": "liger-kernel", "triton": "triton"}


def package_versions() -> dict:
    """Version (or 'missing') of every optional package the GPU path can use."""
    found = {}
    for module, label in PACKAGES.items():
        try:
            found[label] = getattr(importlib.import_module(module), "__version__", "present")
        except ImportError:
            found[label] = "missing"
    return found


def environment(args, _env: dict) -> dict:
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    figures = dict(torch=torch.__version__, cuda=torch.version.cuda or "none", python=sys.version.split()[0],
                   gpu=torch.cuda.get_device_name() if device.type == "cuda" else "none",
                   attention_backend=tg.pick_attention_backend(device), **package_versions())
    if device.type != "cuda" and not args.tiny:
        return dict(status="fail", figures=figures, detail="no CUDA GPU: use --tiny to rehearse the steps on a CPU")
    return dict(status="pass", figures=figures)


class OutOfTime(Exception):
    pass


def run_logged(cmd: list[str], env: dict, log: Path, timeout: float, deadline: float) -> subprocess.CompletedProcess:
    """Run a command, keeping its whole output in `log`; stop it at its timeout or at the check's deadline.
    A command stopped that way is first sent SIGUSR1 (train_gpt.py answers with every thread's stack; other
    commands may just end), then SIGTERM (a run writes its log and summary), then SIGKILL, each to its whole
    process group, so nothing it started outlives it."""
    log.parent.mkdir(parents=True, exist_ok=True)
    timeout = max(min(timeout, deadline - time.perf_counter()), 1)
    with open(log, "w") as out:
        process = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                   start_new_session=True)
        try:
            return subprocess.CompletedProcess(cmd, process.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            for sig, grace in ((signal.SIGUSR1, 3), (signal.SIGTERM, 10), (signal.SIGKILL, None)):
                os.killpg(process.pid, sig)
                try:
                    process.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            raise OutOfTime(f"stopped after {timeout:.0f}s; see {log.name}") from None
        except BaseException:  # Ctrl-C or any other way out: the command goes too
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise


def cuda_tests(args, env: dict) -> dict:
    report = args.out / "cuda_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/test_cuda.py", f"--junitxml={report}", "-p",
           "no:cacheprovider"]
    done = run_logged(cmd, env, args.out / "cuda_tests.log", 1200, args.deadline)
    outcomes = junit_outcomes(report)
    failed = [name for name, outcome in outcomes.items() if outcome == "fail"]
    ran = [name for name, outcome in outcomes.items() if outcome == "pass"]
    status = "fail" if failed or done.returncode not in (0, 5) or not outcomes else ("pass" if ran else "skip")
    detail = f"failed: {', '.join(failed)}" if failed else ("all skipped (no GPU)" if not ran else "")
    return dict(status=status, figures=outcomes, detail=detail)


def junit_outcomes(report: Path) -> dict:
    """test name -> pass | fail | skip, from pytest's JUnit XML."""
    if not report.is_file():
        return {}
    outcomes = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        outcomes[case.get("name")] = "fail" if kinds & {"failure",
                                                        "error"} else ("skip" if "skipped" in kinds else "pass")
    return outcomes


def throughput(args, env: dict) -> dict:
    out = args.out / "throughput.json"
    steps = ["--steps", "3", "--warmup", "1"] if args.tiny else ["--steps", "10", "--warmup", "3"]
    env = with_knobs(env, TINY_KNOBS) if args.tiny else env
    done = run_logged([sys.executable, "bench/throughput.py", *steps, "--json", str(out)], env,
                      args.out / "throughput.log", 900, args.deadline)
    if done.returncode or not out.is_file():
        return dict(status="fail", detail=f"exit {done.returncode}; see throughput.log")
    r = json.loads(out.read_text())
    keys = ("plain_ms_per_step", "looping_ms_per_step", "plain_tokens_per_second", "looping_tokens_per_second",
            "plain_mfu", "looping_mfu", "peak_memory_mib", "newton_schulz_ms", "attention_backend")
    return dict(status="pass", figures={k: r.get(k) for k in keys})


def corpus(args, env: dict) -> tuple[Path, Path, int] | dict:
    """(shard folder, tokenizer, vocabulary) for the training run, or a failed step."""
    data = args.out / "data"
    if args.corpus:
        return corpus_made_before(args.corpus)
    if args.tiny:
        cmd = [sys.executable, "data/make_sample.py", "--out", str(data), "--max-text-bytes", "400000"]
        name, tokenizer, vocab = "sample_sp1024", "sample_1024_bpe", 1024
    else:
        if not (args.train_jsonl and args.val_jsonl):
            return dict(status="fail", detail="give --train-jsonl and --val-jsonl (e.g. the enwiki parts 1 and 4)")
        name, tokenizer, vocab = f"gpucheck_sp{args.vocab_size}", f"gpucheck_{args.vocab_size}_bpe", args.vocab_size
        cmd = [sys.executable, "data/make_sample.py", "--out", str(data), "--jsonl", *map(str, args.train_jsonl),
               "--val-jsonl", *map(str, args.val_jsonl), "--max-val-docs", str(args.max_val_docs),
               "--vocab-size", str(vocab), "--name", name, "--tokenizer-name", tokenizer]
    done = run_logged(cmd, env, args.out / "corpus.log", 1200, args.deadline)
    if done.returncode:
        return dict(status="fail", detail=f"data/make_sample.py exit {done.returncode}; see corpus.log")
    return data / "datasets" / name, data / "tokenizers" / f"{tokenizer}.model", vocab


def corpus_made_before(root: Path) -> tuple[Path, Path, int] | dict:
    """The one dataset and tokenizer under a data/make_sample.py --out folder."""
    datasets, tokenizers = sorted((root / "datasets").glob("*")), sorted((root / "tokenizers").glob("*.model"))
    if len(datasets) != 1 or len(tokenizers) != 1:
        return dict(status="fail", detail=f"--corpus {root}: want one datasets/* folder and one tokenizers/*.model")
    import sentencepiece as spm

    return datasets[0], tokenizers[0], spm.SentencePieceProcessor(model_file=str(tokenizers[0])).vocab_size()


def training_run(args, env: dict) -> dict:
    made = corpus(args, env)
    if isinstance(made, dict):
        return made
    args.corpus_made = made  # the LoRA TTT step evaluates on the same data
    shards, tokenizer, vocab = made
    knobs = dict(DATA_PATH=shards, TOKENIZER_PATH=tokenizer, VOCAB_SIZE=vocab, LOG_DIR=args.out / "logs",
                 RUN_ID="gpu_check")
    if args.tiny:
        knobs.update(TINY_KNOBS, ITERATIONS=10, VAL_LOSS_EVERY=5, TRAIN_LOG_EVERY=5)
    else:
        # One GPU reads all 64 calibration batches that 8 ranks share on the record's machine (94 s on an H200):
        # 8 gives this GPU one rank's share, so a short run keeps most of its cap for training.
        knobs.update(ITERATIONS=100000, MAX_WALLCLOCK_SECONDS=args.train_seconds, VAL_LOSS_EVERY=200,
                     TRAIN_LOG_EVERY=5,
                     GPTQ_CALIBRATION_BATCHES=8)
    done = run_logged([sys.executable, "train_gpt.py"], with_knobs(env, knobs), args.out / "training.log", 1500,
                      args.deadline)
    summary_path = args.out / "logs" / "gpu_check.json"
    if not summary_path.is_file():
        return dict(status="fail", detail=f"train_gpt.py exit {done.returncode} without a summary; see training.log")
    s = json.loads(summary_path.read_text())
    keys = ("steps", "ms_per_step", "tokens_per_second", "train_data_seconds", "pre_quant_val_bpb", "quantized_val_bpb",
            "sliding_val_bpb", "ttt_val_bpb", "slot_val_bpb", "val_bpb", "score_source", "model_bytes",
            "artifact_bytes_total", "compress_seconds", "decompress_seconds", "eval_seconds", "peak_memory_mib")
    figures = {k: s[k] for k in keys if k in s}
    if s.get("status") != "ok" or done.returncode:
        return dict(status="fail", figures=figures, detail=s.get("error") or f"exit {done.returncode}")
    return dict(status="pass", figures=figures)


def lora_ttt_eval(args, env: dict) -> dict:
    """The training run's artifact evaluated again with TTT_MODE=lora (tools/eval_artifact.py): its seconds on
    this GPU say whether per-document LoRA TTT fits the evaluation budget."""
    artifact = args.out / "logs" / "gpu_check.ptz"
    if not artifact.is_file() or not getattr(args, "corpus_made", None):
        return dict(status="fail", detail="no artifact from the training run")
    shards, tokenizer, vocab = args.corpus_made
    knobs = dict(DATA_PATH=shards, TOKENIZER_PATH=tokenizer, VOCAB_SIZE=vocab, TTT_ENABLED=1, TTT_MODE="lora",
                 SLOT_ENABLED=0, EVAL_TIME_BUDGET=0)
    if args.tiny:  # chunks a whole window wide: a few LoRA steps per document, enough to prove the path
        tiny = {k: v for k, v in TINY_KNOBS.items() if not k.startswith("SLOT_")}  # SLOT is off in this pass
        knobs = dict(tiny, TTT_DOC_CHUNK=TINY_KNOBS["EVAL_SEQ_LEN"], **knobs)
    log = args.out / "lora_ttt_eval.log"
    done = run_logged([sys.executable, "tools/eval_artifact.py", str(artifact)], with_knobs(env, knobs), log, 900,
                      args.deadline)
    text = log.read_text()
    if done.returncode or "\n{\n" not in text:
        return dict(status="fail", detail=f"tools/eval_artifact.py exit {done.returncode}; see {log.name}")
    summary = json.loads(text[text.rindex("\n{\n") + 1:])  # the summary it prints last
    keys = ("ttt_val_bpb", "ttt_seconds", "ttt_doc_batches", "ttt_lora_steps", "quantized_val_bpb", "eval_seconds")
    figures = {k: summary.get(k) for k in keys}
    compiled = re.search(r"ttt lora: forward compiled and warmed up in ([0-9.]+)s", text)  # CUDA with COMPILE=1
    if compiled:
        figures["lora_compile_seconds"] = float(compiled.group(1))
    return dict(status="pass", figures=figures)


def with_knobs(env: dict, knobs: dict) -> dict:
    return {**env, **{k: str(v) for k, v in knobs.items()}}


def table(steps: dict) -> str:
    lines = ["| step | result | seconds | figures |", "|---|---|---|---|"]
    for name, r in steps.items():
        figures = ", ".join(f"{k}={fmt(v)}" for k, v in (r.get("figures") or {}).items())
        detail = f" ({r['detail']})" if r.get("detail") else ""
        lines.append(f"| {name} | {r['status']}{detail} | {r['seconds']:.1f} | {figures} |")
    return "\n".join(lines)


def fmt(value) -> str:
    return f"{value:.5g}" if isinstance(value, float) else str(value)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, the embedded sample; runs on a CPU")
    parser.add_argument("--out", type=Path, default=Path("gpu_check_out"), help="where gpu_check.json and the logs go")
    parser.add_argument("--train-jsonl", nargs="+", type=Path, help="training documents for the training run")
    parser.add_argument("--val-jsonl", nargs="+", type=Path, help="validation documents for the training run")
    parser.add_argument("--max-val-docs", type=int, default=500, help="validation documents to keep")
    parser.add_argument("--vocab-size", type=int, default=8192, help="tokenizer trained on the corpus")
    parser.add_argument("--corpus", type=Path, help="a data/make_sample.py --out folder to train on as it is")
    parser.add_argument("--time-limit", type=float, default=float("inf"), help="seconds for all the steps together")
    parser.add_argument("--train-seconds", type=float, default=300.0, help="MAX_WALLCLOCK_SECONDS of the training run")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args.deadline = time.perf_counter() + args.time_limit  # by which every step must have ended
    steps = {}
    for name, step in (("environment", environment), ("cuda tests", cuda_tests), ("training run", training_run),
                       ("lora ttt eval", lora_ttt_eval), ("throughput", throughput)):
        t0 = time.perf_counter()
        try:
            steps[name] = step(args, env)
        except OutOfTime as stopped:
            steps[name] = dict(status="fail", detail=str(stopped))
        steps[name]["seconds"] = time.perf_counter() - t0
        (args.out / "gpu_check.json").write_text(json.dumps(steps, indent=1) + "\n")
        if name == "environment":
            if steps[name]["status"] == "fail":
                break
        print(f"{name}: {steps[name]['status']} ({steps[name]['seconds']:.1f}s)", flush=True)
    print(table(steps))
    return 1 if any(r["status"] == "fail" for r in steps.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
