"""No code path unpickles: every `torch.load` in the repository reads tensors only."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("act", "nodes", "bench", "tests")
SOURCES = [ROOT / "__init__.py", *sorted(p for f in FOLDERS for p in (ROOT / f).rglob("*.py"))]


def unsafe_loads(path: Path) -> list[str]:
    """`torch.load` calls without `weights_only=True`, and any pickle/dill/joblib load."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = getattr(node.func.value, "id", None)
        if owner == "torch" and node.func.attr == "load":
            flags = {k.arg: k.value for k in node.keywords}
            safe = (
                isinstance(flags.get("weights_only"), ast.Constant)
                and flags["weights_only"].value is True
            )
            if not safe:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} torch.load")
        if owner in ("pickle", "dill", "joblib", "cloudpickle") and node.func.attr.startswith(
            "load"
        ):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} {owner}.{node.func.attr}")
    return found


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_nothing_unpickles(path):
    assert unsafe_loads(path) == []
