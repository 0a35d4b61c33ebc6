"""The benchmark scripts still run against today's code (numbers not checked: they are timings).

Nothing else imports them, so a renamed attribute breaks them silently: time_to_loss.py read
`trainer.step` for several stops after the trainer's counters moved, and prepare_speed.py never finished
once the shipped text fixture shrank below one of its documents. Tiny sizes: ~12 s for the first two.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "tests" / "data" / "shakespeare.txt"


def _run(script: str, *args: str, cwd: Path) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_time_to_loss_runs_both_arms(tmp_path):
    out = _run("time_to_loss.py", "--data", str(TEXT), "--pairs", "1", "--iters", "60", cwd=tmp_path)
    assert "reference" in out and "small-cpu" in out and "ratio" in out


def test_prepare_speed_generates_a_corpus_from_the_small_fixture_and_measures(tmp_path, gpt2_ranks):
    out = _run("prepare_speed.py", "--size-mb", "0.3", "--repeats", "1", cwd=tmp_path)
    assert "single-process tiktoken tokens/s" in out and "peak memory" in out


def test_quantized_decode_times_every_arm_and_kernel(tmp_path):
    out = _run("quantized_decode.py", "--preset", "char-small", "--rounds", "1", "--new-tokens", "3",
               "--arms", "fp32,bf16,int8,int4-bf16", "--shapes", "128x96", "--threads", "1", "--clock", "cpu",
               cwd=tmp_path)
    assert "| int4-bf16 |" in out and "| int8 x bf16 |" in out and "| int4 g128 |" in out


def test_serve_structured_load_measures_free_rows_beside_json_ones(tmp_path):
    out = _run("serve_structured_load.py", "--models", "demo", "--rounds", "1", "--requests", "1",
               "--max-tokens", "4", "--json-tokens", "16", cwd=tmp_path)
    assert "| demo |" in out and "B/A" in out and "JSON replies" in out
