"""The repository root is ComfyUI's entry point: importing it must be light and safe."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_importing_the_pack_outside_comfyui_is_light():
    entry, root = str(ROOT / "__init__.py"), str(ROOT)
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('comfyui_act', {entry!r},"
        f" submodule_search_locations=[{root!r}])\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "sys.modules['comfyui_act'] = module\n"
        "spec.loader.exec_module(module)\n"
        "assert callable(module.comfy_entrypoint)\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'comfy') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_ci_runs_the_test_command_that_readme_gives():
    ci = (ROOT / ".ci" / "run").read_text()
    body = ci.split("test_command() {", 1)[1].split("}", 1)[0]
    command = [line.strip() for line in body.splitlines() if line.strip() and "#" not in line]
    assert len(command) == 1
    assert command[0] in (ROOT / "README.md").read_text()
