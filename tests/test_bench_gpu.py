"""bench/gpu.py, the script for the one GPU run, works in its CPU test mode."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_script_runs_on_the_cpu_and_every_check_passes():
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--cpu", "--small", "--pairs", "1"],
        capture_output=True, text=True, cwd=ROOT, check=False, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    checks = [line for line in lines if ": ok;" in line or ": FAIL;" in line]
    assert checks and not [line for line in checks if "FAIL" in line], result.stdout
    assert any(line.startswith("tiny llama bfloat16: ok;") for line in lines)
    assert any(line.startswith("unet 16x16 bfloat16: ok;") for line in lines)
    assert any("steered (support 'range') / plain" in line for line in lines)
    assert any(line.startswith("fit 256 + 256 samples") for line in lines)
