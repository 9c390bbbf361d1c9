"""One command that checks the CUDA paths of train_gpt.py on a machine with one GPU, and prints one table.

    python3 bench/gpu_check.py --plan short --corpus gpu/data --out gc   # 9 minutes: the questions that matter first
    python3 bench/gpu_check.py --train-jsonl enwiki.part1.jsonl.xz --val-jsonl enwiki.part4.jsonl.xz --out gc
    python3 bench/gpu_check.py --plan short --tiny --out gc              # the same stages at tiny size, on a CPU

--plan short, sized for one call of at most 9 minutes (--time-limit 540), every stage capped so the table always
comes out, each a row (pass / fail / skip, seconds, figures):
  0. environment, as below, and nvidia-smi sampled every 2 s into nvidia_smi.csv while the check runs;
  A. loop switch: PRESET=record at the record shape on the corpus, one warm-up step per state, 16 steps with
     recurrence switching on at 40 %, every step logged, TORCH_LOGS=recompiles, STALL_DUMP_SECONDS=60,
     STOP_AFTER=train: each warm-up state's compile seconds, ms/step plain and looped, graphs, recompiles, peak
     memory. Passes with at least 5 looped steps;
  B. step cost: bench/throughput.py on the trainer's real batches (--corpus) for PRESET=record, PRESET=r1081,
     PRESET=record VARLEN_ATTENTION=0 and PRESET=record DOC_ATTENTION=flex;
  C. whole cycle: A's shape, 4 steps, 2 calibration batches, TTT_MODE=lora, the validation set cut to 50
     documents: the seconds of training, calibration, GPTQ, compression, decompression, each pass and LoRA TTT's
     compile; a cycle stopped at its cap says how far it got (its JSON is written after every stage);
  D. the cuda tests, most informative first, while time is left.
Every run saves torch.compile's cache artifacts to compile_cache.bin in --out (COMPILE_CACHE) and loads them when
they are there, so the same command on a new machine, with that file carried back, starts warm.

--plan full (the default), about 20 minutes; steps:
  1. environment: torch, CUDA, GPU, FlashAttention 3/2, brotli, liger-kernel, triton, and the attention backend `auto` picks;
  2. the `cuda`-marked tests (tests/test_cuda.py): compiled == eager (the model and LoRA TTT's forward), FA3/FA2 ==
     SDPA, Parallel Muon == the unbanked reference, GPTQ on the GPU == on the CPU, a bit-exact artifact round trip;
  3. a short training run through GPTQ, the artifact and every evaluation pass on a local corpus
     (tokenized here by data/make_sample.py --jsonl, or one tokenized before: --corpus);
  4. the training run's artifact evaluated again with TTT_MODE=lora: per-document LoRA TTT's score and seconds, and
     the seconds its compiled forward took to compile and warm up;
  5. bench/throughput.py at the record shape (8 micro-batches on one GPU): ms/step, tok/s, MFU, memory.
`--time-limit S` stops a step that would run past S seconds from the start and records it as failed, so the
table always comes out. gpu_check.json is rewritten after every step. `--out DIR` keeps gpu_check.json, the logs
and the corpus there. The exit status is 1 when any step failed.
"""
import argparse
import importlib
import json
import os
import re
import shutil
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
                   attention_backend=tg.pick_attention_backend(device), **package_versions(),
                   nvidia_smi="nvidia_smi.csv, every 2 s" if shutil.which("nvidia-smi") else "absent")
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
            return subprocess.CompletedProcess(cmd, process.wait(timeout=None if timeout == INF else timeout))
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
    knobs = dict(TINY_KNOBS if args.tiny else {}, DATA_PATH=shards, TOKENIZER_PATH=tokenizer, VOCAB_SIZE=vocab,
                 TTT_ENABLED=1, TTT_MODE="lora", SLOT_ENABLED=0, EVAL_TIME_BUDGET=0)
    knobs = lora_run_knobs(knobs, args.tiny)
    log = args.out / "lora_ttt_eval.log"
    done = run_logged([sys.executable, "tools/eval_artifact.py", str(artifact)], with_knobs(env, knobs), log, 900,
                      args.deadline)
    text = log.read_text()
    if done.returncode or "\n{\n" not in text:
        return dict(status="fail", detail=f"tools/eval_artifact.py exit {done.returncode}; see {log.name}")
    summary = json.loads(text[text.rindex("\n{\n") + 1:])  # the summary it prints last
    keys = ("ttt_val_bpb", "ttt_seconds", "ttt_doc_batches", "ttt_lora_steps", "quantized_val_bpb", "eval_seconds")
    figures = {k: summary.get(k) for k in keys} | lora_compile_seconds(text)
    return dict(status="pass", figures=figures)


def with_knobs(env: dict, knobs: dict) -> dict:
    return {**env, **{k: str(v) for k, v in knobs.items()}}


def lora_run_knobs(knobs: dict, tiny: bool) -> dict:
    """The knobs of a run scored by LoRA TTT: no SLOT knob but SLOT_ENABLED (SLOT is off there, and a knob set
    outside its mode stops the run); at --tiny, chunks a whole window wide, a few LoRA steps per document, enough
    to prove the path."""
    knobs = {k: v for k, v in knobs.items() if not k.startswith("SLOT_") or k == "SLOT_ENABLED"}
    return dict(knobs, TTT_DOC_CHUNK=TINY_KNOBS["EVAL_SEQ_LEN"]) if tiny else knobs


def lora_compile_seconds(log_text: str) -> dict:
    """The seconds LoRA TTT's compiled forward took to compile and warm up, where the log says (CUDA, COMPILE=1)."""
    compiled = re.search(r"ttt lora: forward compiled and warmed up in ([0-9.]+)s", log_text)
    return dict(lora_compile_seconds=float(compiled.group(1))) if compiled else {}


# ------------------------------------------------------------------------------------------- --plan short

def gpu_sampler(args) -> subprocess.Popen | None:
    """nvidia-smi writing the GPU's use, memory, power and temperature every 2 s to nvidia_smi.csv; None where
    there is no nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    out = open(args.out / "nvidia_smi.csv", "w")
    return subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,utilization.gpu,memory.used,power.draw,"
                             "temperature.gpu", "--format=csv", "-l", "2"], stdout=out, stderr=subprocess.STDOUT)


def shape_knobs(args, corpus: tuple[Path, Path, int]) -> dict:
    """The record shape (PRESET=record's defaults) on the corpus, or --tiny's; COMPILE_CACHE in --out."""
    shards, tokenizer, vocab = corpus
    knobs = dict(DATA_PATH=shards, TOKENIZER_PATH=tokenizer, VOCAB_SIZE=vocab, LOG_DIR=args.out / "logs",
                 COMPILE_CACHE=args.out / "compile_cache.bin")
    return {**knobs, **TINY_KNOBS} if args.tiny else knobs


def run_summary(args, run_id: str) -> dict:
    path = args.out / "logs" / f"{run_id}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def staged(cap: float, run) -> tuple[subprocess.CompletedProcess | None, str | None]:
    """run(timeout) inside the stage's cap; (its result, None), or (None, why it was stopped)."""
    try:
        return run(cap), None
    except OutOfTime as stopped:
        return None, str(stopped)


def loop_switch(args, env: dict) -> dict:
    """Stage A: does PRESET=record train past the switch to recurrence on real documents, and at what cost."""
    made = corpus(args, env)
    if isinstance(made, dict):
        return made
    args.corpus_made = made
    steps = 10 if args.tiny else 16
    knobs = dict(shape_knobs(args, made), RUN_ID="loop_switch", WARMUP_STEPS=1, ITERATIONS=steps,
                 MAX_WALLCLOCK_SECONDS=0, ENABLE_LOOPING_AT=0.4, TRAIN_LOG_EVERY=1, VAL_LOSS_EVERY=0,
                 STOP_AFTER="train", STALL_DUMP_SECONDS=60)
    log = args.out / "loop_switch.log"
    done, stopped = staged(args.cap_a, lambda cap: run_logged(
        [sys.executable, "train_gpt.py"], {**with_knobs(env, knobs), "TORCH_LOGS": "recompiles"}, log, cap,
        args.deadline))
    s, text = run_summary(args, "loop_switch"), log.read_text() if log.is_file() else ""
    figures = dict(steps=s.get("steps"), looping_enabled_step=s.get("looping_enabled_step"),
                   ms_per_step_plain=s.get("ms_per_step_before_looping"),
                   ms_per_step_looped=s.get("ms_per_step_after_looping"), compiled_graphs=s.get("compiled_graphs"),
                   recompiles=text.count("Recompiling function"), peak_memory_mib=s.get("peak_memory_mib"))
    for seq_len, looping, first, steady in s.get("warmup") or []:
        figures[f"compile_s_{'looped' if looping else 'plain'}"] = first
    last = re.findall(r"\] step:(\d+)/", text)
    figures["last_logged_step"] = int(last[-1]) if last else None
    looped = (s["steps"] - s["looping_enabled_step"]) if s.get("steps") and s.get("looping_enabled_step") else 0
    figures["looped_steps"] = looped
    if stopped or done.returncode or s.get("status") != "stopped":
        return dict(status="fail", figures=figures, detail=stopped or s.get("error") or f"exit {done.returncode}")
    return dict(status="pass" if looped >= 5 else "fail", figures=figures,
                detail="" if looped >= 5 else f"only {looped} looped steps")


STEP_COST_CONFIGS = (("record", {}), ("r1081", dict(PRESET="r1081")), ("record_no_isolation", dict(VARLEN_ATTENTION=0)),
                     ("record_flex", dict(DOC_ATTENTION="flex")))


def step_cost(args, env: dict) -> dict:
    """Stage B: bench/throughput.py on the trainer's real batches, for each stack and document isolation."""
    if not getattr(args, "corpus_made", None):
        return dict(status="fail", detail="no corpus (stage A did not get one)")
    base = {k: v for k, v in shape_knobs(args, args.corpus_made).items() if not k.startswith("SLOT_")}
    for knob in ("LOG_DIR", "COMPILE_CACHE"):  # the benchmark writes no log, and its compiles are its own
        base.pop(knob)
    shards = base.pop("DATA_PATH")
    steps = ["--steps", "2", "--warmup", "1"] if args.tiny else ["--steps", "6", "--warmup", "2"]
    figures, failed, started = {}, [], time.perf_counter()
    for i, (name, knobs) in enumerate(STEP_COST_CONFIGS):
        if knobs.get("DOC_ATTENTION") == "flex" and not args.has_cuda:
            figures[name] = "skip (FlexAttention trains on CUDA only)"
            continue
        out = args.out / f"step_cost_{name}.json"
        share = (args.cap_b - (time.perf_counter() - started)) / (len(STEP_COST_CONFIGS) - i)
        done, stopped = staged(share, lambda cap: run_logged(
            [sys.executable, "bench/throughput.py", "--corpus", str(shards), *steps, "--json", str(out)],
            with_knobs(env, {**base, **knobs}), args.out / f"step_cost_{name}.log", max(cap, 1), args.deadline))
        if stopped or done.returncode or not out.is_file():
            failed.append(name)
            figures[name] = f"fail ({stopped or f'exit {done.returncode}'}; see step_cost_{name}.log)"
            continue
        r = json.loads(out.read_text())
        figures.update({f"{name}_ms_plain": r.get("plain_ms_per_step"), f"{name}_ms_looped": r.get("looping_ms_per_step"),
                        f"{name}_isolation": r.get("document_isolation"), f"{name}_peak_mib": r.get("peak_memory_mib")})
    return dict(status="fail" if failed else "pass", figures=figures,
                detail=f"failed: {', '.join(failed)}" if failed else "")


def cut_validation(shards: Path, into: Path, documents: int, bos_id: int = 1) -> Path:
    """A copy of the shard folder whose validation set is its first `documents` documents (and their byte
    sidecar, if any); the training shards are linked, not copied."""
    into.mkdir(parents=True, exist_ok=True)
    for shard in tg.find_shards(shards, "train"):
        link = into / shard.name
        if not link.exists():
            try:
                link.symlink_to(shard.resolve())
            except OSError:
                shutil.copyfile(shard, link)
    tokens = tg.load_validation_tokens(shards).numpy()
    starts = (tokens == bos_id).nonzero()[0]
    end = int(starts[documents]) if len(starts) > documents else len(tokens)
    tg.write_shard(into / "fineweb_val_000000.bin", tokens[:end])
    sidecar = tg.load_byte_sidecar(shards, tg.torch.from_numpy(tokens), bos_id)
    if sidecar is not None:
        magic = tg.SIDECAR_MAGIC if sidecar[1] == "normalized" else tg.SHARD_MAGIC
        tg.write_shard(into / "fineweb_val_bytes_000000.bin", sidecar[0][:end].numpy(), magic, sidecar[1])
    return into


def whole_cycle(args, env: dict) -> dict:
    """Stage C: train -> calibration -> GPTQ -> artifact -> every evaluation pass with LoRA TTT, at A's shape."""
    if not getattr(args, "corpus_made", None):
        return dict(status="fail", detail="no corpus (stage A did not get one)")
    shards, tokenizer, vocab = args.corpus_made
    data = cut_validation(shards, args.out / "cycle_data", args.cycle_docs)
    knobs = dict(shape_knobs(args, (data, tokenizer, vocab)), RUN_ID="cycle", WARMUP_STEPS=1, ITERATIONS=4,
                 MAX_WALLCLOCK_SECONDS=0, TRAIN_LOG_EVERY=1, VAL_LOSS_EVERY=0, GPTQ_CALIBRATION_BATCHES=2,
                 TTT_ENABLED=1, TTT_MODE="lora", SLOT_ENABLED=0, STALL_DUMP_SECONDS=60)
    knobs = lora_run_knobs(knobs, args.tiny)
    log = args.out / "cycle.log"
    done, stopped = staged(args.cap_c, lambda cap: run_logged(
        [sys.executable, "train_gpt.py"], with_knobs(env, knobs), log, cap, args.deadline))
    s = run_summary(args, "cycle")
    keys = ("train_seconds", "hessian_seconds", "gptq_seconds", "compress_seconds", "decompress_seconds",
            "quantized_eval_seconds", "ttt_seconds", "eval_seconds", "val_bpb", "artifact_bytes_total")
    figures = {k: s[k] for k in keys if k in s} | lora_compile_seconds(log.read_text())
    figures["reached"] = next((stage for stage, key in (("evaluation", "val_bpb"), ("artifact", "model_bytes"),
                                                         ("training", "steps"), ("start", "run_id")) if key in s), "none")
    if stopped or done.returncode or s.get("status") != "ok":
        return dict(status="fail", figures=figures, detail=stopped or s.get("error") or f"exit {done.returncode}")
    return dict(status="pass", figures=figures)


# The cuda tests that answer the open questions first: the compiled model, document isolation, LoRA TTT's compile.
CUDA_TEST_ORDER = ("test_compiled_model_is_as_accurate_as_eager", "test_a_training_step_makes_no_host_sync",
                   "test_flex_document_attention_matches_the_masked_reference", "test_varlen_kernel_matches",
                   "test_compiled_varlen_model_compiles_once", "test_compiled_lora_forward_matches_eager",
                   "test_a_saved_compile_cache_makes_the_next_compile_warm")


def ordered_cuda_tests(args, env: dict) -> dict:
    """Stage D: the cuda tests, most informative first, in the time left."""
    left = args.deadline - time.perf_counter()
    if left < 30:
        return dict(status="skip", detail=f"{max(left, 0):.0f}s left")
    listed = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-m", "cuda", "tests/test_cuda.py",
                             "-p", "no:cacheprovider"], env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    ids = [line for line in listed.stdout.splitlines() if "::" in line]
    rank = {name: i for i, name in enumerate(CUDA_TEST_ORDER)}
    ids.sort(key=lambda node: min((i for name, i in rank.items() if name in node), default=len(rank)))
    report = args.out / "cuda_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", *ids, f"--junitxml={report}", "-p", "no:cacheprovider"]
    done, stopped = staged(left, lambda cap: run_logged(cmd, env, args.out / "cuda_tests.log", cap,
                                                              args.deadline))
    outcomes = junit_outcomes(report)
    failed = [name for name, outcome in outcomes.items() if outcome == "fail"]
    ran = [name for name, outcome in outcomes.items() if outcome == "pass"]
    status = "fail" if failed or stopped or done.returncode not in (0, 5) else ("pass" if ran else "skip")
    detail = stopped or (f"failed: {', '.join(failed)}" if failed else ("all skipped (no GPU)" if not ran else ""))
    return dict(status=status, figures=outcomes, detail=detail)


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
    parser.add_argument("--plan", choices=("full", "short"), default="full",
                        help="short: the 9-minute plan of stages 0, A-D; full: every step, about 20 minutes")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, the embedded sample; runs on a CPU")
    parser.add_argument("--out", type=Path, default=Path("gpu_check_out"), help="where gpu_check.json and the logs go")
    parser.add_argument("--train-jsonl", nargs="+", type=Path, help="training documents for the training run")
    parser.add_argument("--val-jsonl", nargs="+", type=Path, help="validation documents for the training run")
    parser.add_argument("--max-val-docs", type=int, default=500, help="validation documents to keep")
    parser.add_argument("--vocab-size", type=int, default=8192, help="tokenizer trained on the corpus")
    parser.add_argument("--corpus", type=Path, help="a data/make_sample.py --out folder to train on as it is")
    parser.add_argument("--time-limit", type=float, help="seconds for all the steps together (default: none; "
                        "540 for --plan short on a GPU)")
    parser.add_argument("--train-seconds", type=float, default=300.0, help="MAX_WALLCLOCK_SECONDS of the training run")
    # The caps size a GPU call; --tiny rehearses the plan's path on a CPU, whose speed (a loaded CI machine) says
    # nothing about them, so there they default to none.
    parser.add_argument("--cap-a", type=float, help="--plan short: seconds for stage A (190; --tiny: none)")
    parser.add_argument("--cap-b", type=float, help="--plan short: seconds for stage B (170; --tiny: none)")
    parser.add_argument("--cap-c", type=float, help="--plan short: seconds for stage C (170; --tiny: none)")
    parser.add_argument("--cycle-docs", type=int, default=50, help="--plan short: validation documents of stage C")
    parser.add_argument("--warm-from", type=Path, help="--plan short: a compile_cache.bin an earlier check saved (on "
                        "the same torch and Triton): copied into --out first, so this check starts warm")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for name, cap in (("cap_a", 190.0), ("cap_b", 170.0), ("cap_c", 170.0)):
        if getattr(args, name) is None:
            setattr(args, name, INF if args.tiny else cap)
    default_limit = 540.0 if args.plan == "short" and not args.tiny else INF
    time_limit = args.time_limit if args.time_limit is not None else default_limit
    args.deadline = time.perf_counter() + time_limit  # by which every step must have ended
    import torch

    args.has_cuda = torch.cuda.is_available()
    if args.warm_from:
        shutil.copyfile(args.warm_from, args.out / "compile_cache.bin")
    sampler = gpu_sampler(args) if args.plan == "short" else None
    try:
        steps = run_plan(args, env, PLANS[args.plan])
    finally:
        if sampler is not None:
            sampler.terminate()
    print(table(steps))
    return 1 if any(r["status"] == "fail" for r in steps.values()) else 0


INF = float("inf")
PLANS = {"full": (("environment", environment), ("cuda tests", cuda_tests), ("training run", training_run),
                  ("lora ttt eval", lora_ttt_eval), ("throughput", throughput)),
         "short": (("environment", environment), ("A loop switch", loop_switch), ("B step cost", step_cost),
                   ("C whole cycle", whole_cycle), ("D cuda tests", ordered_cuda_tests))}


def run_plan(args, env: dict, plan) -> dict:
    """Every step in order, gpu_check.json rewritten after each; a failed environment ends the plan."""
    steps = {}
    for name, step in plan:
        t0 = time.perf_counter()
        try:
            steps[name] = step(args, env)
        except OutOfTime as stopped:
            steps[name] = dict(status="fail", detail=str(stopped))
        steps[name]["seconds"] = time.perf_counter() - t0
        (args.out / "gpu_check.json").write_text(json.dumps(steps, indent=1) + "\n")
        print(f"{name}: {steps[name]['status']} ({steps[name]['seconds']:.1f}s)", flush=True)
        if name == "environment" and steps[name]["status"] == "fail":
            break
    return steps


if __name__ == "__main__":
    sys.exit(main())
