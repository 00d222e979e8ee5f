"""Turn a ComfyUI UI-format workflow (what users load, what example_workflows/ holds) into an API prompt.

The widget values of a UI node are stored positionally; which input each belongs to comes from the
server's ``/object_info`` (input order, widget types, ``control_after_generate``), so the
conversion is checked against the real host, not against a copy of its rules.
"""
from __future__ import annotations

import json
import os

EXAMPLE_WORKFLOW = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "example_workflows", "combined_generation.json")

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SKIPPED_TYPES = {"Note", "MarkdownNote", "PrimitiveNode"}


class WorkflowError(ValueError):
    pass


def _is_widget(spec) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def ui_to_api(workflow: dict, object_info: dict, replace_widgets: dict | None = None) -> dict:
    """API prompt for ``workflow``. ``replace_widgets`` maps ``(node type, input name)`` → value."""
    replace_widgets = replace_widgets or {}
    links = {link[0]: link for link in workflow.get("links", [])}
    prompt = {}
    for node in workflow["nodes"]:
        ntype = node["type"]
        if ntype in SKIPPED_TYPES:
            continue
        if node.get("mode", 0) != 0:
            raise WorkflowError(f"node {node['id']} ({ntype}) is muted or bypassed; enable it or remove it first")
        if ntype not in object_info:
            raise WorkflowError(f"node type {ntype!r} (node {node['id']}) is not installed on this server")
        info = object_info[ntype]
        order = info.get("input_order", {})
        specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        names = list(order.get("required", info["input"].get("required", {}).keys())) + \
            list(order.get("optional", info["input"].get("optional", {}).keys()))
        linked = {}
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                link = links[inp["link"]]
                linked[inp["name"]] = [str(link[1]), link[2]]
        values = list(node.get("widgets_values", []))
        pos = 0
        inputs = {}
        for name in names:
            spec = specs[name]
            widget = _is_widget(spec)
            if widget:
                value = values[pos] if pos < len(values) else spec[1].get("default") if len(spec) > 1 else None
                pos += 1
                if len(spec) > 1 and spec[1].get("control_after_generate"):
                    pos += 1  # the "fixed"/"randomize" value the frontend stores after the seed
                if (ntype, name) in replace_widgets:
                    value = replace_widgets[(ntype, name)]
            if name in linked:
                inputs[name] = linked[name]
            elif widget:
                inputs[name] = value
        prompt[str(node["id"])] = {"class_type": ntype, "inputs": inputs, "_meta": {"title": node.get("title", ntype)}}
    return prompt


def combined_example_prompt(object_info: dict, ckpt_name: str, lora_name: str, *, steps: int, switch: int,
                            size: int) -> dict:
    """The shipped combined-generation workflow as an API prompt, with the given models and sizes."""
    with open(EXAMPLE_WORKFLOW, encoding="utf-8") as f:
        workflow = json.load(f)
    return ui_to_api(workflow, object_info, {
        ("CheckpointLoaderSimple", "ckpt_name"): ckpt_name, ("LoraLoader", "lora_name"): lora_name,
        ("EmptyLatentImage", "width"): size, ("EmptyLatentImage", "height"): size,
        ("KSampler", "steps"): steps, ("RewardTuneCombinedKSampler", "steps"): steps,
        ("RewardTuneCombinedKSampler", "switch_step"): switch,
    })
