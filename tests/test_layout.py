"""The library's rings: the core at `act/`'s top level, two front ends around it, no circle.

Read from the source (every import statement, also those inside functions), so a forbidden
import fails here even on a code path no other test runs.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import act

ACT = Path(act.__file__).parent
PUBLIC_SURFACE = {"act", "act.__main__"}  # re-exports over the core and both front ends
CORE_THIRD_PARTY = {"torch", "numpy", "safetensors"}
FRONT_END_THIRD_PARTY = {
    "act.text": CORE_THIRD_PARTY | {"transformers", "tqdm", "gguf"},
    "act.diffusers": CORE_THIRD_PARTY | {"tqdm"},
}
FRONT_ENDS = tuple(FRONT_END_THIRD_PARTY)
COMFYUI = {"comfy", "comfy_api", "comfy_extras", "folder_paths", "nodes", "server"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ACT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(ACT.rglob("*.py"))}
CORE = sorted(
    name for name in MODULES if name not in PUBLIC_SURFACE and not name.startswith(FRONT_ENDS)
)


def imports(name: str) -> list[tuple[str, bool]]:
    """(imported module, whether the statement is at module level) for every import."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                found.append((node.module, id(node) in top_level))
                continue
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            target = f"{base}.{node.module}" if node.module else base
            for alias in node.names:  # `from . import presets` imports a submodule
                submodule = f"{target}.{alias.name}"
                found.append((submodule if submodule in MODULES else target, id(node) in top_level))
    return found


def third_party(module: str) -> str | None:
    top = module.split(".")[0]
    return None if top == "act" or top in sys.stdlib_module_names else top


def test_the_tree_is_a_core_and_two_front_end_packages():
    assert {"act.transport", "act.maps", "act.io", "act.fitting", "act.steering"} <= set(CORE)
    assert {"act.text", "act.diffusers"} <= set(MODULES)
    assert not any(name.startswith(("act.diffusion_", "act.llm")) for name in MODULES)


@pytest.mark.parametrize("name", CORE)
def test_the_core_imports_only_torch_numpy_safetensors_and_itself(name):
    for module, _ in imports(name):
        assert not module.startswith(FRONT_ENDS), f"{name} imports the front end {module}"
        package = third_party(module)
        assert package is None or package in CORE_THIRD_PARTY, f"{name} imports {module}"


@pytest.mark.parametrize("name", [n for n in MODULES if n.startswith(FRONT_ENDS)])
def test_front_ends_use_the_core_never_each_other(name):
    own = next(front for front in FRONT_ENDS if name.startswith(front))
    allowed = FRONT_END_THIRD_PARTY[own]
    for module, at_module_level in imports(name):
        other = next((front for front in FRONT_ENDS if module.startswith(front)), own)
        assert other == own, f"{name} imports the other front end's {module}"
        package = third_party(module)
        assert package is None or package in allowed, f"{name} imports {module}"
        if package in ("transformers", "diffusers"):
            assert not at_module_level, f"{name} imports {module} at module level"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_the_library_never_imports_comfyui(name):
    for module, _ in imports(name):
        assert module.split(".")[0] not in COMFYUI, f"{name} imports ComfyUI's {module}"


def test_no_import_circle():
    graph = {name: {m for m, _ in imports(name) if m in MODULES and m != name} for name in MODULES}
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycle = [*path[path.index(name) :], name]
            pytest.fail(f"import circle: {' -> '.join(cycle)}")
        if name in done:
            return
        for imported in sorted(graph[name]):
            visit(imported, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_importing_the_library_loads_neither_transformers_nor_diffusers():
    code = (
        "import sys\n"
        f"import {', '.join(CORE)}\n"
        "import act\n"
        "print([m for m in ('transformers', 'diffusers', 'comfy') if m in sys.modules])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=False,
        cwd=ACT.parent,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_every_public_name_is_importable_from_act():
    for name in act.__all__:
        assert getattr(act, name) is not None, name
