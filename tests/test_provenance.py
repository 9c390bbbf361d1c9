"""What a record shows about its data and its reference: make_record refuses data found overlapping the validation
set and warns when the check was never run; significance takes a record folder's own seeds as the reference."""
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from test_records import fake_run

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tools"))
import make_record  # noqa: E402
import significance  # noqa: E402

# The 1.05651 row (PR #2135): its submission.json's per-seed scores, seeds 0, 42 and 314.
ROW_SEEDS = {"314": (2.31227656, 1.05662016), "42": (2.31115900, 1.05610947), "0": (2.31265572, 1.05679341)}


def clean_check(**changes) -> dict:
    """What the trainer records from tools/check_overlap.py's read_overlap_result."""
    return {"status": "clean", "version": 1, "window": 64, "bos_id": 1, "train_shards": 80, "val_shards": 1,
            "train_tokens": 8_000_000_000, "val_documents": 50_000, "val_tokens": 47_801_520, "exact_documents": 0,
            "window_documents": 0, "window_tokens": 0, "overlapping_documents": 0, "overlapping_tokens": 0,
            "overlapping_document_share": 0.0, "overlapping_token_share": 0.0, "overlap": False,
            "checked_at": "2026-05-02T10:00:00+00:00", **changes}


def test_a_record_whose_data_overlaps_validation_is_refused(tmp_path):
    overlapping = clean_check(status="overlap", overlap=True, exact_documents=40_000, window_documents=40_100,
                              overlapping_documents=40_100, overlapping_tokens=38_000_000)
    paths = [fake_run(tmp_path / "runs", 1, overlap_check=clean_check()),
             fake_run(tmp_path / "runs", 2, overlap_check=overlapping)]
    with pytest.raises(make_record.Refused, match=r"seed 2: its training data holds validation text \(40,100 of "
                                                  r"50,000 validation documents, 38,000,000 of 47,801,520 tokens"):
        make_record.make_record(paths, "Leaky", out=tmp_path / "records", warn=pytest.fail)
    assert not (tmp_path / "records").exists()


def test_a_record_whose_data_was_never_checked_is_written_with_a_warning(tmp_path):
    paths = [fake_run(tmp_path / "runs", 1), fake_run(tmp_path / "runs", 2, overlap_check=None),
             fake_run(tmp_path / "runs", 3, overlap_check=clean_check(status="stale"))]
    warnings = []
    folder = make_record.make_record(paths, "Unchecked", date="2026-01-02", out=tmp_path / "records",
                                     warn=warnings.append)
    assert len(warnings) == 2
    assert warnings[0].startswith("seeds 1, 2: their training data was never checked for validation text: run "
                                  "`python3 tools/check_overlap.py DATA_PATH`")
    assert warnings[1].startswith("seed 3: the overlap check beside their data no longer matches the shards")
    assert "Train/validation overlap: **not shown**" in (folder / "README.md").read_text()
    assert json.loads((folder / "submission.json").read_text())["data_overlap_check"] is None


def test_the_command_line_prints_the_warning(tmp_path, capsys):
    make_record.main([str(fake_run(tmp_path / "runs", 1)), "--name", "Cli", "--out", str(tmp_path / "records")])
    captured = capsys.readouterr()
    assert captured.err.startswith("warning: seed 1: their training data was never checked") and "wrote" in captured.out


def test_a_clean_check_is_shown_without_a_warning(tmp_path):
    paths = [fake_run(tmp_path / "runs", seed, overlap_check=clean_check()) for seed in (1, 2)]
    folder = make_record.make_record(paths, "Clean", date="2026-01-02", out=tmp_path / "records", warn=pytest.fail)
    text = (folder / "README.md").read_text()
    assert "Train/validation overlap: none. `tools/check_overlap.py` (version 1, checked 2026-05-02" in text
    assert "found none of the 50,000 validation documents, whole or in 64-token spans, in the 80 training shards" \
        in text
    assert json.loads((folder / "submission.json").read_text())["data_overlap_check"]["status"] == "clean"


def write_row(folder: Path, submission: bool = True, logs: bool = True, losses: bool = True) -> Path:
    """A record folder shaped like PR #2135's: submission.json with seed_results, and train_seed<N>.log files whose
    last score line is the final one (periodic validation lines come first)."""
    folder.mkdir(parents=True)
    if submission:
        results = {seed: {"val_bpb": bpb, **({"val_loss": loss} if losses else {}), "artifact_bytes": 15_945_305}
                   for seed, (loss, bpb) in ROW_SEEDS.items()}
        (folder / "submission.json").write_text(json.dumps({"val_bpb": 1.05650768, "seeds": [314, 42, 0],
                                                            "seed_results": results}))
    if logs:
        for seed, (loss, bpb) in ROW_SEEDS.items():
            (folder / f"train_seed{seed}.log").write_text(
                f"  seed: {seed}\n4000/20000 val_loss: 2.4235 val_bpb: 1.1074\n"
                "diagnostic quantized val_loss:2.33886991 val_bpb:1.06867913 eval_time:10347ms\n"
                f"quantized_ttt_phased val_loss:{loss:.8f} val_bpb:{bpb:.8f} eval_time:567097ms\n"
                "total_eval_time:567.1s\n")
    (folder / "requirements.txt").write_text("torch\n")
    return folder


def new_runs(tmp_path: Path) -> list[Path]:
    """Three finished runs of our own trainer, at the row's 3.16 bytes per token, a little better than it."""
    scores = [(2.3089, 1.05510), (2.3101, 1.05565), (2.3080, 1.05469)]
    return [fake_run(tmp_path / "new", seed, val_loss=loss, val_bpb=bpb) for seed, (loss, bpb) in
            zip((1, 2, 3), scores)]


def welch_by_hand(reference: list[float], new: list[float], margin: float = 0.0) -> tuple[float, float, float]:
    """t, degrees of freedom and one-sided p that mean(reference) - mean(new) > margin."""
    var_ref, var_new = statistics.variance(reference) / len(reference), statistics.variance(new) / len(new)
    t = (statistics.fmean(reference) - statistics.fmean(new) - margin) / math.sqrt(var_ref + var_new)
    df = (var_ref + var_new) ** 2 / (var_ref ** 2 / (len(reference) - 1) + var_new ** 2 / (len(new) - 1))
    return t, df, significance.t_sf_builtin(t, df)


@pytest.mark.parametrize("shape", ["submission", "logs_only", "bpb_only_submission_with_logs"])
def test_significance_against_a_record_folder_is_welch_on_its_seeds(tmp_path, shape):
    row = write_row(tmp_path / "row", submission=shape != "logs_only", losses=shape == "submission")
    reference = significance.load_reference([str(row)])
    assert sorted(r["seed"] for r in reference) == [0, 42, 314]
    by_seed = {str(r["seed"]): (r["val_loss"], r["val_bpb"]) for r in reference}
    assert by_seed == ROW_SEEDS
    runs = significance.load_summaries([str(p) for p in new_runs(tmp_path)])
    result = significance.compare(runs, reference)
    row_losses, losses = [loss for loss, _ in ROW_SEEDS.values()], [r["val_loss"] for r in runs]
    t, df, p = welch_by_hand(row_losses, losses)
    t_rule, _, p_rule = welch_by_hand(row_losses, losses, margin=0.005)
    assert result["test"] == "Welch" and result["reference_n"] == 3 and result["rule"] == "frontier"
    assert (result["t"], result["df"]) == pytest.approx((t_rule, df), rel=1e-12)
    assert (result["p_any"], result["p_threshold"]) == pytest.approx((p, p_rule), rel=1e-9)
    assert 0 < p < 0.25 and p_rule > 0.5  # these runs beat the row, but not by 0.005 nats
    assert result["p_value"] == result["p_any"] and result["passes"] == (result["p_any"] < 0.25)


def test_reference_seeds_without_val_loss_use_the_runs_bytes_per_token(tmp_path):
    row = write_row(tmp_path / "row", logs=False, losses=False)
    reference = significance.load_reference([str(row / "submission.json")])
    runs = significance.load_summaries([str(p) for p in new_runs(tmp_path)])
    result = significance.compare(runs, reference)
    bytes_per_token = statistics.fmean(r["val_loss"] / (r["val_bpb"] * math.log(2)) for r in runs)
    derived = [bpb * math.log(2) * bytes_per_token for _, bpb in ROW_SEEDS.values()]
    assert result["p_any"] == pytest.approx(welch_by_hand(derived, [r["val_loss"] for r in runs])[2], rel=1e-9)
    assert result["reference_losses_derived"] == 3
    assert "3 reference seed(s) gave no val_loss" in significance.report(result)


def test_our_own_record_folders_logs_are_read_past_the_script(tmp_path):
    folder = tmp_path / "ours"
    folder.mkdir()
    script = 'log(f"final_score val_loss:{x:.6f} val_bpb:{y:.6f}")\nprint("val_loss:9.0 val_bpb:9.0")'
    for seed, (loss, bpb) in ROW_SEEDS.items():
        (folder / f"train_seed{seed}.log").write_text(
            script + make_record.SEPARATOR + f"step:100/200 val_loss:3.0 val_bpb:1.5\n"
            f"final_score val_loss:{loss:.8f} val_bpb:{bpb:.8f} source:ttt\nartifact written\n")
    assert {str(r["seed"]): (r["val_loss"], r["val_bpb"]) for r in significance.load_record(folder)} == ROW_SEEDS


def test_the_default_verdict_is_the_frontier_rule_and_the_readme_rule_stays_available(tmp_path):
    row = write_row(tmp_path / "row")
    runs = [str(p) for p in new_runs(tmp_path)]
    tool = [sys.executable, str(REPO_ROOT / "tools" / "significance.py"), *runs, "--reference", str(row)]
    frontier = subprocess.run(tool, capture_output=True, text=True, timeout=60)
    assert frontier.returncode == 0, frontier.stderr
    assert "reference: n=3  val_bpb 1.056508" in frontier.stdout and "Welch t-test" in frontier.stdout
    assert "verdict: the p < 0.25 frontier rule (PR #1902: any improvement over the current row), in nats per " \
           "token: PASSES" in frontier.stdout
    assert "   also: the README rule (>= 0.005 nats at p < 0.01), applied in nats per token: does not pass" \
           in frontier.stdout
    readme = subprocess.run(tool + ["--rule", "readme"], capture_output=True, text=True, timeout=60)
    assert "verdict: the README rule (>= 0.005 nats at p < 0.01), applied in nats per token: does NOT pass" \
           in readme.stdout


def test_make_record_takes_a_record_folder_as_its_reference(tmp_path):
    row = write_row(tmp_path / "row")
    paths = new_runs(tmp_path)
    make_record.main([*map(str, paths), "--name", "Beats", "--date", "2026-05-03", "--reference", str(row),
                      "--out", str(tmp_path / "records")])
    folder = tmp_path / "records" / "track_10min_16mb" / "2026-05-03_Beats"
    sub = json.loads((folder / "submission.json").read_text())
    runs = significance.load_summaries([str(p) for p in paths])
    expected = significance.compare(runs, significance.load_record(row))
    assert sub["comparison_baseline_bpb"] == pytest.approx(statistics.fmean(bpb for _, bpb in ROW_SEEDS.values()))
    assert sub["p_value"] == pytest.approx(expected["p_any"]) and sub["p_value_rule"] == "frontier"
    assert "Welch t-test" in (folder / "README.md").read_text()


def test_a_record_folder_without_scores_says_what_to_give_instead(tmp_path):
    empty = tmp_path / "row"
    empty.mkdir()
    (empty / "submission.json").write_text(json.dumps({"val_bpb": 1.05651}))
    with pytest.raises(SystemExit, match="has no per-seed scores .* give the row's val_bpb as a number instead"):
        significance.load_reference([str(empty)])
