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


TRAIN_WORKFLOW = os.path.join(os.path.dirname(EXAMPLE_WORKFLOW), "train_imagerefl_then_combined.json")


def write_tiny_dataset(folder: str, n: int = 4, size: int = 96) -> str:
    """A small ImageReFL dataset: smooth random-colour images with same-named .txt captions."""
    import numpy as np
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        corners = rng.uniform(0, 255, (2, 2, 3))
        ys, xs = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
        img = (corners[0, 0] * ((1 - ys) * (1 - xs))[..., None] + corners[0, 1] * ((1 - ys) * xs)[..., None]
               + corners[1, 0] * (ys * (1 - xs))[..., None] + corners[1, 1] * (ys * xs)[..., None])
        Image.fromarray(img.astype("uint8")).save(os.path.join(folder, f"sample{i}.png"))
        with open(os.path.join(folder, f"sample{i}.txt"), "w", encoding="utf-8") as f:
            f.write(f"a soft colour gradient, picture {i}\n")
    return folder


def train_example_prompt(object_info: dict, ckpt_name: str, reward_name: str, dataset: str, *, job_name: str,
                         train_steps: int = 6, size: int = 64, steps: int = 10, switch: int = 7) -> dict:
    """The shipped train-then-combine workflow as an API prompt, shrunk for tiny CPU models: a
    10-step schedule (start index 6, t_f in 6–9, the paper's 30/40 scaled), fp32, batch 1."""
    with open(TRAIN_WORKFLOW, encoding="utf-8") as f:
        workflow = json.load(f)
    schedule = {"num_steps": 10, "imagerefl_start": 6, "imagerefl_tf_min": 6, "imagerefl_tf_max": 9, "cfg": 2.0}
    t = "RewardTuneTrainLoRA"
    return ui_to_api(workflow, object_info, {
        ("CheckpointLoaderSimple", "ckpt_name"): ckpt_name, ("RewardTuneLoadRewardModel", "reward_model"): reward_name,
        ("RewardTuneLoadRewardModel", "precision"): "fp32",
        (t, "job_name"): job_name, (t, "dataset_folder"): dataset, (t, "steps"): train_steps, (t, "batch_size"): 1,
        (t, "grad_accum"): 1, (t, "width"): size, (t, "height"): size, (t, "precision"): "fp32",
        (t, "gradient_checkpointing"): False, (t, "save_every"): 2, (t, "learning_rate"): 1e-3,
        (t, "config_json"): json.dumps(schedule),
        ("EmptyLatentImage", "width"): size, ("EmptyLatentImage", "height"): size, ("EmptyLatentImage", "batch_size"): 2,
        ("RewardTuneCombinedKSampler", "steps"): steps, ("RewardTuneCombinedKSampler", "switch_step"): switch,
    })
