"""The repository root is ComfyUI's entry point: importing it must be light and safe."""

import os
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


def _readme_library_snippet() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## The library\n", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_installed_library_runs_the_readme_snippet_from_another_folder(tmp_path):
    """After the README's install, `import act` works anywhere (not only in the checkout)."""
    code = (
        "import act, pathlib, sys\n"
        "print(pathlib.Path(act.__file__).resolve().parent)\n" + _readme_library_snippet()
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
        check=False, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, (
        f"the README snippet failed outside the checkout; install the library first with "
        f"`pip install .` in {ROOT}:\n{result.stderr[-2000:]}"
    )
    installed = Path(result.stdout.splitlines()[0])
    assert "1 modules, 16 units" in result.stdout
    assert (tmp_path / "style.safetensors").is_file()
    checkout = ROOT / "act"
    stale = [
        str(path.relative_to(checkout))
        for path in checkout.rglob("*")
        if path.is_file()
        and "__pycache__" not in path.parts
        and (
            not (installed / path.relative_to(checkout)).is_file()
            or (installed / path.relative_to(checkout)).read_bytes() != path.read_bytes()
        )
    ]
    assert not stale, f"the installed library ({installed}) differs from the checkout: {stale}"
