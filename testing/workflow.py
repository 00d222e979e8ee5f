"""Turn a ComfyUI UI-format workflow (what users load, what example_workflows/ holds) into an API prompt.

The widget values of a UI node are stored positionally (``widgets_values``); which input each
belongs to comes from the server's ``/object_info`` (input order, widget types, options), read
by the same rules as the ComfyUI frontend (comfyui-frontend-package 1.47) reads them when it
loads a workflow:

* an INT input gets a *control after generate* widget after it (its value, ``fixed`` /
  ``randomize`` …, is saved in ``widgets_values`` but never sent) when the input says
  ``control_after_generate``, or, when it says nothing, when it is named ``seed`` or
  ``noise_seed`` (``t.control_after_generate ?? ['seed','noise_seed'].includes(t.name)``);
  a FLOAT gets one only when it says so; a COMBO that says so gets two (the control and a
  filter-list text box); a combo with an upload button (``image_upload`` …) one more;
* ``forceInput`` inputs have no widget;
* a DynamicCombo (``COMFY_DYNAMICCOMBO_V3``) is a combo whose chosen option's inputs follow it
  as widgets named ``<combo>.<input>`` (required, then optional);
* Note, MarkdownNote, PrimitiveNode and Reroute live only in the frontend.

Unlike the frontend, which fills missing values with defaults and drops extra ones without a
word, the conversion is strict: every value must fit its input (type, bounds, options) and the
count must match, so a workflow the browser would load shifted fails here too.
"""
from __future__ import annotations

import json
import math
import os

EXAMPLES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "example_workflows")
# The shipped example workflows. The Templates dialog shows a custom node pack's file names as the
# cards' titles (and, with - and _ as spaces, as their descriptions) and <name>.jpg as the picture;
# the numbers give the order when the dialog sorts by name (the server lists them unsorted).
EXAMPLES = {
    "combined": "1 Combined generation (base then tuned model)",
    "best_of_n": "2 Best-of-N with a reward model",
    "sweep": "3 Quality-diversity sweep (trade-off plot)",
    "diversity": "4 Diversity score of a batch",
    "train_imagerefl": "5 Train ImageReFL LoRA, then combined generation",
    "train_sqdf": "6 Train SQDF LoRA",
    "combined_sd35": "7 Combined generation on SD3.5 (flow model)",
}

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", "MARKDOWN", "COLOR", "TEXTAREA", "CURVE", "RANGE",
                "BOUNDING_BOX", "BOUNDING_BOXES", "COLORS", "CHART", "GALLERIA", "PAINTER", "IMAGECOMPARE"}
DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"
FRONTEND_ONLY_TYPES = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}
SEED_NAMES = ("seed", "noise_seed")
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
UPLOAD_FLAGS = ("image_upload", "video_upload", "animated_image_upload", "audio_upload")


class WorkflowError(ValueError):
    pass


def example_path(name: str) -> str:
    """The path of a shipped example workflow (its file name, with or without .json)."""
    return os.path.join(EXAMPLES_DIR, name if name.endswith(".json") else name + ".json")


def load_example(name: str) -> dict:
    with open(example_path(name), encoding="utf-8") as f:
        return json.load(f)


def _kind(spec) -> str:
    kind = spec[0]
    if isinstance(kind, list):
        return "COMBO"
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return opts.get("widgetType") or kind


def _opts(spec) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def is_widget(spec) -> bool:
    """Whether the frontend draws a widget for this input (and so stores a value for it)."""
    kind = _kind(spec)
    return (kind in WIDGET_TYPES or kind == DYNAMIC_COMBO) and not _opts(spec).get("forceInput")


def control_widgets(name: str, spec) -> list[str]:
    """The extra widgets the frontend adds after this input's widget, as the kinds of their values."""
    kind, opts = _kind(spec), _opts(spec)
    cag = opts.get("control_after_generate")
    if kind == "INT" and (cag if cag is not None else name in SEED_NAMES):
        return ["control"]
    if kind == "FLOAT" and cag:
        return ["control"]
    if kind == "COMBO":
        extra = ["control", "filter"] if cag else []
        return extra + (["upload"] if any(opts.get(f) for f in UPLOAD_FLAGS) else [])
    return []


def combo_options(spec) -> list:
    return spec[0] if isinstance(spec[0], list) else _opts(spec).get("options", [])


def widget_inputs(info: dict) -> list[tuple[str, list]]:
    """(name, spec) of a node's inputs in the order the frontend creates them (required, then optional)."""
    order = info.get("input_order", {})
    out = []
    for group in ("required", "optional"):
        specs = info["input"].get(group, {})
        for name in order.get(group, specs.keys()):
            out.append((name, specs[name]))
    return out


def check_value(where: str, spec, value, *, check_options: bool = True) -> None:
    """Raise WorkflowError when ``value`` cannot be this input's (wrong type, out of bounds, not an option)."""
    kind, opts = _kind(spec), _opts(spec)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "INT":
        ok = number and math.isfinite(value) and float(value).is_integer()
    elif kind == "FLOAT":
        ok = number and math.isfinite(value)
    elif kind == "BOOLEAN":
        ok = isinstance(value, bool)
    elif kind in ("STRING", "MARKDOWN", "TEXTAREA"):
        ok = isinstance(value, str)
    elif kind in ("COMBO", DYNAMIC_COMBO):
        keys = [o["key"] for o in opts.get("options", [])] if kind == DYNAMIC_COMBO else combo_options(spec)
        ok = isinstance(value, (str, int, float)) and not isinstance(value, bool)
        if ok and (check_options or kind == DYNAMIC_COMBO) and value not in keys:
            raise WorkflowError(f"{where}: {value!r} is not one of its options {keys[:12]}")
    else:
        return
    if not ok:
        raise WorkflowError(f"{where}: {value!r} is not a valid {kind} value (a value of another input: "
                            "the widget values are shifted)")
    if kind in ("INT", "FLOAT"):
        lo, hi = opts.get("min"), opts.get("max")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise WorkflowError(f"{where}: {value!r} is outside [{lo}, {hi}]")


def ui_to_api(workflow: dict, object_info: dict, replace_widgets: dict | None = None, *,
              check_options: bool = True) -> dict:
    """API prompt for ``workflow``, as the frontend would queue it.

    ``replace_widgets`` maps ``(node type, input name)`` → value (a DynamicCombo's inputs by their
    full name, e.g. ``("RewardTuneCombinedKSampler", "switch_unit.switch_step")``); replaced values
    are checked like the others. Where two nodes of one type must differ (a Positive and a Negative
    CLIPTextEncode), a key may name the node by its title instead, ``("Negative", "text")``; a
    title key wins over a type key. ``check_options=False`` skips the combo-membership check of the
    workflow's own values (model file names that only exist on the user's machine)."""
    replace_widgets = dict(replace_widgets or {})
    unused = set(replace_widgets)
    links = {link[0]: link for link in workflow.get("links", [])}
    prompt = {}
    for node in workflow["nodes"]:
        ntype = node["type"]
        if ntype in FRONTEND_ONLY_TYPES:
            continue
        where = f"node {node['id']} ({ntype})"
        title = node.get("title")
        if node.get("mode", 0) != 0:
            raise WorkflowError(f"{where} is muted or bypassed; enable it or remove it first")
        if ntype not in object_info:
            raise WorkflowError(f"node type {ntype!r} (node {node['id']}) is not installed on this server")
        linked = {}
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                link = links[inp["link"]]
                linked[inp["name"]] = [str(link[1]), link[2]]
        if isinstance(node.get("widgets_values"), dict):
            raise WorkflowError(f"{where}: widgets_values is a dict (a frontend-extension node); not supported")
        values = list(node.get("widgets_values") or [])
        pos = 0
        inputs = {}

        def take(name, spec):
            nonlocal pos
            if pos >= len(values):
                raise WorkflowError(f"{where}: no widget value for input {name!r}: the workflow has {len(values)} "
                                    f"values and the frontend reads more (it would fill in defaults)")
            value = values[pos]
            pos += 1
            return value

        def visit(name, spec):
            if not is_widget(spec):
                if name in linked:
                    inputs[name] = linked[name]
                return
            value = take(name, spec)
            key = (title, name) if title and (title, name) in replace_widgets else (ntype, name)
            replaced = key in replace_widgets
            check_value(f"{where} input {name!r}", spec, value, check_options=check_options and not replaced)
            for extra in control_widgets(name, spec):
                v = take(f"{name} ({extra})", spec)
                if extra == "control" and v not in CONTROL_VALUES + ("increment-wrap",):
                    raise WorkflowError(f"{where}: the control-after-generate widget of {name!r} holds {v!r}, not "
                                        f"one of {CONTROL_VALUES} (the widget values are shifted)")
            if replaced:
                if _kind(spec) == DYNAMIC_COMBO:
                    raise WorkflowError(f"{where}: {name!r} chooses which inputs follow it; edit the workflow "
                                        "instead of replacing it")
                value = replace_widgets[key]
                unused.discard(key)
                check_value(f"{where} input {name!r} (replaced)", spec, value, check_options=True)
            inputs[name] = linked.get(name, value)
            if _kind(spec) == DYNAMIC_COMBO:
                option = next(o for o in _opts(spec)["options"] if o["key"] == value)
                for group in ("required", "optional"):
                    for child, child_spec in option["inputs"].get(group, {}).items():
                        visit(f"{name}.{child}", child_spec)

        for name, spec in widget_inputs(object_info[ntype]):
            visit(name, spec)
        if pos != len(values):
            raise WorkflowError(f"{where}: the workflow has {len(values)} widget values, the frontend reads {pos} "
                                f"({values[pos:]!r} left over): the values are shifted")
        prompt[str(node["id"])] = {"class_type": ntype, "inputs": inputs, "_meta": {"title": node.get("title", ntype)}}
    if unused:
        raise WorkflowError(f"replace_widgets names inputs the workflow does not have: {sorted(unused)}")
    return prompt


def combined_example_prompt(object_info: dict, ckpt_name: str, lora_name: str, *, steps: int, switch: int,
                            size: int, replace: dict | None = None) -> dict:
    """The shipped combined-generation workflow as an API prompt, with the given models and sizes
    (``replace``: more ``ui_to_api`` replacements, e.g. the prompt, the sampler, the CFG)."""
    return ui_to_api(load_example(EXAMPLES["combined"]), object_info, {
        ("CheckpointLoaderSimple", "ckpt_name"): ckpt_name, ("LoraLoader", "lora_name"): lora_name,
        ("EmptyLatentImage", "width"): size, ("EmptyLatentImage", "height"): size,
        ("KSampler", "steps"): steps, ("RewardTuneCombinedKSampler", "steps"): steps,
        ("RewardTuneCombinedKSampler", "switch_unit.switch_step"): switch, **(replace or {}),
    })


def write_captioned_dataset(folder: str, images, captions: list[str]) -> str:
    """An ImageReFL dataset folder: ``sample<i>.png`` with a same-named ``.txt`` caption for each
    (H, W, 3) picture (uint8, or float in [0, 1])."""
    import numpy as np
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    for i, (img, caption) in enumerate(zip(images, captions)):
        img = np.asarray(img)
        if img.dtype != np.uint8:
            img = np.clip(np.rint(img.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(folder, f"sample{i}.png"))
        with open(os.path.join(folder, f"sample{i}.txt"), "w", encoding="utf-8") as f:
            f.write(caption + "\n")
    return folder


def write_tiny_dataset(folder: str, n: int = 4, size: int = 96) -> str:
    """A small ImageReFL dataset: smooth random-colour images with same-named .txt captions."""
    import numpy as np
    rng = np.random.default_rng(0)
    images = []
    for _ in range(n):
        corners = rng.uniform(0, 255, (2, 2, 3))
        ys, xs = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
        img = (corners[0, 0] * ((1 - ys) * (1 - xs))[..., None] + corners[0, 1] * ((1 - ys) * xs)[..., None]
               + corners[1, 0] * (ys * (1 - xs))[..., None] + corners[1, 1] * (ys * xs)[..., None])
        images.append(img.astype("uint8"))
    return write_captioned_dataset(folder, images, [f"a soft colour gradient, picture {i}" for i in range(n)])


def write_toyworld_dataset(folder: str, n: int = 16, seed: int = 0) -> str:
    """An ImageReFL dataset of the toy world's own pictures with their captions (docs/toyworld.md)."""
    from ..toyworld import scenes as S
    scenes = S.sample_scenes(seed, n)
    return write_captioned_dataset(folder, S.render_batch(scenes), [s.caption for s in scenes])


def train_example_prompt(object_info: dict, ckpt_name: str, reward_name: str, dataset: str, *, job_name: str,
                         train_steps: int = 6, size: int = 64, steps: int = 10, switch: int = 7,
                         schedule: dict | None = None, replace: dict | None = None) -> dict:
    """The shipped train-then-combine workflow as an API prompt, shrunk for tiny CPU models: a
    10-step schedule (start index 6, t_f in 6–9, the paper's 30/40 scaled), fp32, batch 1
    (``schedule``: the training config's schedule instead; ``replace``: more ``ui_to_api``
    replacements)."""
    workflow = load_example(EXAMPLES["train_imagerefl"])
    if schedule is None:
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
        ("RewardTuneCombinedKSampler", "steps"): steps,
        ("RewardTuneCombinedKSampler", "switch_unit.switch_step"): switch, **(replace or {}),
    })


# ------------------------------------------------------------------ layout (what the frontend draws)
# LiteGraph in comfyui-frontend-package 1.47: the title bar (30 px) is above the node's `size`; a
# node is max(sockets without a widget, outputs) × 20 px of slots, then each visible widget
# (20 px + 4 gap) and 8 px, then 6 px; the frontend grows a node that is smaller than that, over
# whatever lies below it (ComfyUI's own KSampler: 4 × 20 + 7 × 24 + 8 + 6 = 262 px). A multiline
# text box is a DOM widget (estimated at 60 px here).
TITLE_HEIGHT = 30
SLOT_HEIGHT = 20
WIDGET_HEIGHT = 20
WIDGET_GAP = 4
MULTILINE_HEIGHT = 60
CHAR_WIDTH = 8.4         # LiteGraph's fallback estimate: 14 px font × 0.6 per character
SOURCE_BADGE_WIDTH = 100  # a custom node's title bar also shows the pack's name on its right


def node_widgets(node: dict, info: dict) -> list[tuple[str, list]]:
    """(name, spec) of every widget the frontend draws on ``node`` (control widgets included, a
    DynamicCombo's inputs for the option the node holds)."""
    values = list(node.get("widgets_values") or [])
    out = []

    def visit(name, spec):
        if not is_widget(spec):
            return
        idx = len(out)  # widgets_values holds one value per widget drawn so far
        out.append((name, spec))
        out.extend((f"{name} ({extra})", ["COMBO" if extra == "control" else "STRING", {}])
                   for extra in control_widgets(name, spec))
        if _kind(spec) == DYNAMIC_COMBO:
            value = values[idx] if idx < len(values) else _opts(spec)["options"][0]["key"]
            option = next((o for o in _opts(spec)["options"] if o["key"] == value), _opts(spec)["options"][0])
            for group in ("required", "optional"):
                for child, child_spec in option["inputs"].get(group, {}).items():
                    visit(f"{name}.{child}", child_spec)

    for name, spec in widget_inputs(info):
        visit(name, spec)
    return out


def min_node_size(node: dict, info: dict) -> tuple[float, float]:
    """The smallest (width, height) the frontend draws ``node`` at (height without the title bar)."""
    sockets = [n for n, spec in widget_inputs(info) if not is_widget(spec)]
    rows = max(len(sockets), len(info.get("output", [])), 1)
    widgets = node_widgets(node, info)
    height = rows * SLOT_HEIGHT + 6
    if widgets:
        height += 8 + sum((MULTILINE_HEIGHT if _opts(spec).get("multiline") else WIDGET_HEIGHT) + WIDGET_GAP
                          for _, spec in widgets)
    title = node.get("title") or info.get("display_name") or node["type"]
    builtin = info.get("python_module", "nodes").split(".")[0] in ("nodes", "comfy_extras", "comfy_api_nodes")
    badge = 0 if builtin else SOURCE_BADGE_WIDTH
    width = max(210 if widgets else 140, 40 + CHAR_WIDTH * len(title) + badge)
    return width, height


# ------------------------------------------------------- the Combined KSampler's DynamicCombo inputs
def combined_switch_inputs(*, switch_unit: str = "step", switch_step: int = 30, switch_fraction: float = 0.75,
                           mode: str = "switch", blend_power: float = 1.0, api: bool = True) -> dict:
    """The switch point and mode of the Combined KSampler / Guider, from the flat settings.

    ``api=True``: as an API prompt holds them (``"switch_unit": "step", "switch_unit.switch_step": 30``);
    ``api=False``: as ``execute`` receives them (``switch_unit={"switch_unit": "step", "switch_step": 30}``)."""
    unit_input = ("switch_step", switch_step) if switch_unit == "step" else ("switch_fraction", switch_fraction)
    mode_inputs = [("blend_power", blend_power)] if mode == "blend" else []
    if api:
        return {"switch_unit": switch_unit, f"switch_unit.{unit_input[0]}": unit_input[1], "mode": mode,
                **{f"mode.{k}": v for k, v in mode_inputs}}
    return {"switch_unit": {"switch_unit": switch_unit, unit_input[0]: unit_input[1]},
            "mode": {"mode": mode, **dict(mode_inputs)}}
