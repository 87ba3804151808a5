"""Checking shared workflows (UI format) against node schemas, without ComfyUI.

The schemas are `/object_info` entries: the live server's, or the snapshot committed in
tests/data/object_info.json (the pack's nodes and the core nodes the workflows use). The
conversion to API format follows the front end's rules (../shared/docs/comfyui.md): Note
nodes are skipped, `widgets_values` map in order onto the widget inputs of `input_order`
(required, then optional), and a seed-like INT with `control_after_generate` is followed by
one extra value (the control mode), which is not sent.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
SNAPSHOT = ROOT / "tests" / "data" / "object_info.json"
UI_ONLY = {"Note", "MarkdownNote"}  # front-end nodes: never sent to the server
# combos whose options are the files on the user's disk: any name is accepted here (AcT LLM
# Generate's model also always offers its built-in model: BUILT_IN_CHOICES)
FILE_COMBOS = {
    ("CheckpointLoaderSimple", "ckpt_name"),
    ("AcTLoadTransport", "transport_name"),
    ("AcTLLMGenerate", "model"),
}
BUILT_IN_CHOICES = {("AcTLLMGenerate", "model"): {"smollm2 (built-in)"}}  # never a file
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
AUTOGROW = "COMFY_AUTOGROW_V3"
CONTROL_MODES = {"fixed", "increment", "decrement", "randomize"}

Schemas = dict[str, dict[str, Any]]


class WorkflowError(ValueError):
    """A workflow that does not fit the node schemas; `problems` lists every finding."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def workflow_paths() -> list[Path]:
    """The shared workflows: every workflows/*.json, sorted by name."""
    return sorted(WORKFLOWS.glob("*.json"))


def load_json(path: Path) -> Any:
    """The parsed JSON file at `path`."""
    return json.loads(path.read_text(encoding="utf-8"))


def load_snapshot() -> Schemas:
    """The committed `/object_info` entries (tests/data/object_info.json)."""
    return load_json(SNAPSHOT)


def node_types(workflow: dict[str, Any]) -> set[str]:
    """The node types of a UI-format workflow that run on the server (Notes left out)."""
    return {node["type"] for node in workflow["nodes"]} - UI_ONLY


def normalized_entry(node_type: str, entry: dict[str, Any]) -> dict[str, Any]:
    """An /object_info entry without what depends on the server's disk: file combos keep only
    their built-in choices."""
    entry = json.loads(json.dumps(entry))
    for section in ("required", "optional"):
        for name, spec in entry["input"].get(section, {}).items():
            if (node_type, name) in FILE_COMBOS:
                built_in = BUILT_IN_CHOICES.get((node_type, name), set())
                if isinstance(spec[0], list):
                    spec[0] = [choice for choice in spec[0] if choice in built_in]
                else:
                    options = spec[1]["options"]
                    spec[1]["options"] = [choice for choice in options if choice in built_in]
    return entry


def snapshot_of(object_info: Schemas, types: set[str]) -> Schemas:
    """The snapshot of `types` from a live `/object_info` (normalized, sorted by type)."""
    return {name: normalized_entry(name, object_info[name]) for name in sorted(types)}


def input_specs(entry: dict[str, Any]) -> list[tuple[str, list[Any], bool]]:
    """(name, spec, required) of every input in `input_order` (required, then optional)."""
    order = entry.get("input_order", {})
    inputs = entry["input"]
    return [
        (name, inputs[section][name], section == "required")
        for section in ("required", "optional")
        for name in order.get(section, inputs.get(section, {}))
    ]


def input_type(spec: list[Any]) -> str:
    """The type of an input spec: "COMBO" for an option list, else its type name."""
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def options_of(spec: list[Any]) -> dict[str, Any]:
    """The options dict of an input spec (empty when there is none)."""
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def is_widget(spec: list[Any]) -> bool:
    """Whether the front end draws this input as a widget (a value), not only a socket."""
    return input_type(spec) in WIDGET_TYPES and not options_of(spec).get("forceInput")


def widget_slots(entry: dict[str, Any]) -> list[tuple[str | None, list[Any] | None]]:
    """The `widgets_values` layout of a node: (input name, spec) per value, and
    (None, None) for the control mode that follows a `control_after_generate` INT."""
    slots: list[tuple[str | None, list[Any] | None]] = []
    for name, spec, _ in input_specs(entry):
        if is_widget(spec):
            slots.append((name, spec))
            if options_of(spec).get("control_after_generate"):
                slots.append((None, None))
    return slots


def widget_values(node: dict[str, Any], schemas: Schemas) -> dict[str, Any]:
    """A node's widget values by input name (control modes left out; links not followed)."""
    slots = widget_slots(schemas[node["type"]])
    values = node.get("widgets_values") or []
    return {name: value for (name, _), value in zip(slots, values, strict=False) if name}


def control_modes(node: dict[str, Any], schemas: Schemas) -> dict[str, str]:
    """The control modes after generation ("fixed", "randomize", ...) by input name."""
    slots = widget_slots(schemas[node["type"]])
    values = node.get("widgets_values") or []
    return {
        slots[index - 1][0]: value
        for index, (value, (name, _)) in enumerate(zip(values, slots, strict=False))
        if name is None and index > 0
    }


def value_problem(node_type: str, name: str, spec: list[Any], value: Any) -> str | None:
    """Why `value` does not fit the widget input `name`, or None when it fits."""
    kind, options = input_type(spec), options_of(spec)
    if kind == "COMBO":
        choices = spec[0] if isinstance(spec[0], list) else options.get("options", [])
        if (node_type, name) in FILE_COMBOS:
            return None if isinstance(value, str) and value else f"{value!r} is not a file name"
        return None if value in choices else f"{value!r} is not one of {choices[:12]}"
    if kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"{value!r} is not a boolean"
    if kind == "STRING":
        return None if isinstance(value, str) else f"{value!r} is not a string"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"{value!r} is not a number"
    if kind == "INT" and value != int(value):
        return f"{value!r} is not an integer"
    low, high = options.get("min"), options.get("max")
    if low is not None and value < low:
        return f"{value!r} is below the minimum {low}"
    if high is not None and value > high:
        return f"{value!r} is above the maximum {high}"
    return None


def types_match(output_type: str, input_type_: str) -> bool:
    """Whether a link from an output of one type may feed an input of another ("*" = any;
    "A,B" = either)."""
    if "*" in (output_type, input_type_):
        return True
    return bool(set(output_type.split(",")) & set(input_type_.split(",")))


def autogrow_input(entry: dict[str, Any], name: str) -> tuple[str, list[Any]] | None:
    """(autogrow input, template spec) for a grown slot such as "images.image1", else None."""
    family, _, member = name.partition(".")
    inputs = entry["input"]
    spec = {**inputs.get("optional", {}), **inputs.get("required", {})}.get(family)
    if spec is None or input_type(spec) != AUTOGROW:
        return None
    template = options_of(spec)["template"]
    prefix, most = template.get("prefix", ""), template.get("max", 100)
    index = member.removeprefix(prefix)
    if not member.startswith(prefix) or not index.isdigit() or int(index) >= most:
        return None
    (inner,) = template["input"]["required"].values()
    return family, inner


def slot_spec(entry: dict[str, Any], name: str) -> list[Any] | None:
    """The schema of the input slot `name` (a plain input or a grown autogrow slot)."""
    for input_name, spec, _ in input_specs(entry):
        if input_name == name:
            return spec
    grown = autogrow_input(entry, name)
    return None if grown is None else grown[1]


def check_workflow(workflow: dict[str, Any], schemas: Schemas) -> list[str]:
    """Everything in a UI-format workflow that does not fit the schemas (empty: it fits).

    Checks: node types exist; every widget value fits its input (type, min/max, combo
    options; file-name combos accept any name); `widgets_values_named`, when the front end
    wrote it, agrees with the positional values; links join existing slots of matching types
    and agree with the nodes' own slot lists; every required input is linked or given.
    """
    problems: list[str] = []
    nodes = {node["id"]: node for node in workflow["nodes"]}
    for node in workflow["nodes"]:
        where = f"node {node['id']} ({node['type']})"
        problems += [f"{where}: {problem}" for problem in _node_problems(node, schemas)]
    problems += _link_problems(workflow, nodes, schemas)
    return problems


def _node_problems(node: dict[str, Any], schemas: Schemas) -> list[str]:
    node_type = node["type"]
    if node_type in UI_ONLY:
        return []
    if node_type not in schemas:
        return [
            f"unknown node type {node_type!r}: not in the schemas (if it is new, regenerate "
            "tests/data/object_info.json: see tests/test_workflows_comfyui.py)"
        ]
    if node.get("mode", 0) != 0:
        return [f"mode {node['mode']}: shared workflows keep every node active"]
    entry = schemas[node_type]
    problems = []
    slots = widget_slots(entry)
    values = node.get("widgets_values") or []
    if isinstance(values, dict):
        return ["widgets_values is a dict; the front end writes a list"]
    if len(values) != len(slots):
        names = [name or "(control mode)" for name, _ in slots]
        problems.append(f"{len(values)} widgets_values for {len(slots)} widgets {names}")
    given = {}
    for (name, spec), value in zip(slots, values, strict=False):
        if name is None:
            if value not in CONTROL_MODES:
                problems.append(f"control mode {value!r} is not one of {sorted(CONTROL_MODES)}")
            continue
        given[name] = value
        problem = value_problem(node_type, name, spec, value)
        if problem:
            problems.append(f"widget {name}: {problem}")
    named = node.get("widgets_values_named")
    if named is not None:
        wrong = {name for name in given if name in named and named[name] != given[name]}
        if wrong:
            problems.append(f"widgets_values_named disagrees with widgets_values on {wrong}")
    linked = {slot["name"] for slot in node.get("inputs", []) if slot.get("link") is not None}
    for name, spec, required in input_specs(entry):
        if not required or name in linked or name in given:
            continue
        if input_type(spec) == AUTOGROW:
            least = options_of(spec)["template"].get("min", 1)
            grown = [slot for slot in linked if slot.startswith(f"{name}.")]
            if len(grown) >= least:
                continue
        problems.append(f"required input {name} is neither linked nor given a value")
    return problems


def _link_problems(
    workflow: dict[str, Any], nodes: dict[int, dict[str, Any]], schemas: Schemas
) -> list[str]:
    problems = []
    links = {}
    for link in workflow.get("links", []):
        link_id, source, source_slot, target, target_slot, link_type = link
        links[link_id] = link
        where = f"link {link_id} ({source}:{source_slot} -> {target}:{target_slot})"
        if source not in nodes or target not in nodes:
            problems.append(f"{where}: joins a node that does not exist")
            continue
        outputs, inputs = nodes[source].get("outputs", []), nodes[target].get("inputs", [])
        if source_slot >= len(outputs) or target_slot >= len(inputs):
            problems.append(f"{where}: joins a slot that does not exist")
            continue
        output, slot = outputs[source_slot], inputs[target_slot]
        if link_id not in (output.get("links") or []) or slot.get("link") != link_id:
            problems.append(f"{where}: the nodes' slot lists do not name this link")
        source_type, target_type = nodes[source]["type"], nodes[target]["type"]
        if source_type in schemas:
            declared = schemas[source_type]["output"]
            if source_slot >= len(declared) or declared[source_slot] != output["type"]:
                problems.append(f"{where}: output type {output['type']} is not in the schema")
            elif not types_match(declared[source_slot], link_type):
                problems.append(f"{where}: link type {link_type} != output {output['type']}")
        if target_type in schemas:
            spec = slot_spec(schemas[target_type], slot["name"])
            if spec is None:
                problems.append(f"{where}: {target_type} has no input {slot['name']!r}")
            elif not types_match(output["type"], input_type(spec)):
                problems.append(
                    f"{where}: {output['type']} cannot feed {slot['name']} ({input_type(spec)})"
                )
    for node in workflow["nodes"]:
        for slot in node.get("inputs", []):
            if slot.get("link") is not None and slot["link"] not in links:
                problems.append(f"node {node['id']}: input {slot['name']} names no link")
    return problems


def to_api(workflow: dict[str, Any], schemas: Schemas) -> dict[str, Any]:
    """The API-format prompt of a UI-format workflow (what the front end queues).

    Raises:
        WorkflowError: the workflow does not fit the schemas (every problem is listed).
    """
    problems = check_workflow(workflow, schemas)
    if problems:
        raise WorkflowError(problems)
    links = {link[0]: link for link in workflow.get("links", [])}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in UI_ONLY:
            continue
        inputs = widget_values(node, schemas)
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                _, source, source_slot, *_ = links[slot["link"]]
                inputs[slot["name"]] = [str(source), source_slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
