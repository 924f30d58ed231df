"""The quickstart's helpers (the quickstart itself is too long for CI: run `bash scripts/quickstart.sh`).

The summary must read the training log the training loop really writes, and the data.json it
derives from the guide's must be one the data pipeline accepts."""
import io
import json
import os
import subprocess

from scripts import quickstart_steps
from scripts.bench_report import format_table, row

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_script_parses():
    assert subprocess.run(["bash", "-n", os.path.join(ROOT, "scripts", "quickstart.sh")]).returncode == 0


def test_data_json_from_the_guides_is_valid(tmp_path):
    from mindspeed_mm.data.config import load_data_config

    out = tmp_path / "data.json"
    quickstart_steps.main(["data-json", "--out", str(out), "--model-dir", "ckpt/hf_path/tiny",
                           "--dataset", "data/tiny/mllm.json", "--dataset-dir", "data/tiny",
                           "--cache-dir", "data/tiny/cache", "--min-pixels", "3136", "--max-pixels", "12544"])
    cfg = load_data_config(str(out))
    pre, basic = cfg.dataset_param.preprocess_parameters, cfg.dataset_param.basic_parameters
    assert (pre.model_name_or_path, pre.max_pixels, basic.dataset, basic.cache_dir) == (
        "ckpt/hf_path/tiny", 12544, "data/tiny/mllm.json", "data/tiny/cache")
    with open(os.path.join(ROOT, "examples", "qwen2vl", "data.json")) as f:
        guide = json.load(f)
    assert basic.template == guide["dataset_param"]["basic_parameters"]["template"]  # the rest is the guide's


def _training_log(losses) -> str:
    from mindspeed_mm.training.reporting import ProgressReport

    stream = io.StringIO()
    report = ProgressReport(len(losses), 1, 1, writer_rank=True, stream=stream)
    for i, loss in enumerate(losses, 1):
        report.step(i, loss=loss, lr=1e-3, grad_norm=1.0, loss_scale=1.0, elapsed=0.1, flops=1e9, tokens=100,
                    consumed_samples=8 * i, global_batch_size=8, skipped_iters=0, nan_iters=0)
    return stream.getvalue()


def test_report_reads_the_training_log_and_scores_answers(tmp_path, capsys):
    log = tmp_path / "train.log"
    log.write_text(_training_log([5.0, 3.0, 1.0, 0.5]))
    pp_log = tmp_path / "pp.log"
    pp_log.write_text(_training_log([5.0, 3.25]))
    answers = tmp_path / "answers.jsonl"
    rows = [("A red circle on the left.", "A red circle on the left."),
            ("A blue square on the top", "A blue square on the top."),  # final full stop does not matter
            ("A red circle on the left.", "A green triangle on the right.")]
    answers.write_text("".join(json.dumps({"prompt": "<image>\nWhat is it?", "response": r, "reference": ref}) + "\n"
                               for r, ref in rows))
    assert quickstart_steps.losses(str(log)) == {1: 5.0, 2: 3.0, 3: 1.0, 4: 0.5}
    quickstart_steps.main(["report", "--train-log", str(log), "--pp-log", str(pp_log), "--answers", str(answers)])
    out = capsys.readouterr().out
    assert "loss 5.000 at iteration 1 -> 0.500 at iteration 4" in out
    assert "largest loss difference over iterations 1-2: 2.5e-01" in out
    assert "2/3 correct" in out


def test_benchmark_table_shows_the_ratio_to_the_reference():
    table = format_table([row("decode", "tokens/s", "higher", 300.0, 200.0, "HF generate", "same tokens")])
    line = table.splitlines()[-1]
    assert "decode" in line and "1.50" in line and "HF generate" in line
