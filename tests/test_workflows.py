"""The pack as a user meets it in the browser: the example workflows (read as the frontend reads
them, laid out without overlaps, listed as templates with a picture) and a help page per node.

The frontend rules the conversion follows are those of comfyui-frontend-package 1.47 (see
testing/workflow.py); the server is a real ``main.py --cpu``.
"""
from __future__ import annotations

import io
import itertools
import json
import re
import urllib.parse

import pytest
from PIL import Image

from rewardtune.testing.workflow import (EXAMPLES, TITLE_HEIGHT, WorkflowError, combined_switch_inputs, combo_options,
                                         is_widget, load_example, min_node_size, ui_to_api, widget_inputs)

pytestmark = pytest.mark.server
MODEL_FILE_INPUTS = {"ckpt_name", "lora_name", "reward_model", "aesthetic_clip", "embedder_name", "lcm_lora"}


@pytest.fixture(scope="module")
def info(server):
    return server.get("/object_info")


@pytest.fixture(scope="module")
def pack(info):
    """The pack's folder name as the frontend derives it (python_module custom_nodes.<pack>)."""
    return info["RewardTuneCombinedKSampler"]["python_module"].split(".")[1]


def our_nodes(info):
    return sorted(n for n, i in info.items() if i["python_module"].startswith("custom_nodes.") and
                  n.startswith("RewardTune"))


# ------------------------------------------------------------------ the frontend's widget rules
def _node(values, ntype="T", inputs=()):
    return {"nodes": [{"id": 1, "type": ntype, "mode": 0, "inputs": list(inputs), "widgets_values": values}],
            "links": []}


def _info(required, optional=None):
    return {"T": {"input": {"required": required, "optional": optional or {}},
                  "input_order": {"required": list(required), "optional": list(optional or {})}}}


@pytest.mark.parametrize("name,extra,control", [
    ("seed", {}, True),                                   # named seed, says nothing: the frontend adds one
    ("noise_seed", {}, True),
    ("seed", {"control_after_generate": False}, False),   # says no
    ("steps", {}, False),
    ("steps", {"control_after_generate": True}, True),
    ("steps", {"control_after_generate": "fixed"}, True),
])
def test_control_after_generate_rule(name, extra, control):
    """INT: ``control_after_generate ?? name in ('seed', 'noise_seed')`` adds a control widget whose
    value is stored after the number and never sent."""
    info = _info({name: ["INT", {"default": 0, "min": 0, "max": 100, **extra}], "cfg": ["FLOAT", {"min": 0, "max": 30}]})
    values = [7, "randomize", 5.0] if control else [7, 5.0]
    assert ui_to_api(_node(values), info)["1"]["inputs"] == {name: 7, "cfg": 5.0}
    other = [7, 5.0] if control else [7, "randomize", 5.0]
    with pytest.raises(WorkflowError, match="shifted|not a valid"):
        ui_to_api(_node(other), info)


def test_float_and_combo_controls_and_dynamic_combo():
    info = _info({
        "f": ["FLOAT", {"control_after_generate": True}],
        "c": ["COMBO", {"options": ["a", "b"], "control_after_generate": True}],   # control + filter list
        "d": ["COMFY_DYNAMICCOMBO_V3", {"options": [
            {"key": "x", "inputs": {"required": {"n": ["INT", {"min": 0, "max": 9}]}}},
            {"key": "y", "inputs": {"required": {}}}]}],
        "m": ["MODEL", {}],
        "s": ["STRING", {"forceInput": True}],   # no widget
    })
    wf = _node([0.5, "fixed", "b", "increment", "", "x", 3], inputs=[{"name": "m", "link": None}])
    assert ui_to_api(wf, info)["1"]["inputs"] == {"f": 0.5, "c": "b", "d": "x", "d.n": 3}
    assert ui_to_api(_node([0.5, "fixed", "b", "fixed", "", "y"]), info)["1"]["inputs"] == {"f": 0.5, "c": "b", "d": "y"}
    with pytest.raises(WorkflowError, match="left over"):
        ui_to_api(_node([0.5, "fixed", "b", "fixed", "", "y", 3]), info)
    with pytest.raises(WorkflowError, match="not one of its options"):
        ui_to_api(_node([0.5, "fixed", "b", "fixed", "", "z"]), info)


@pytest.mark.slow
def test_the_old_sweep_workflow_fails_as_it_did_in_the_browser(info):
    """The shipped sweep before the fix had no value for the seed's control widget: in the browser
    every later widget shifted one slot (steps = NaN, scheduler = 512 …). The conversion now fails
    on it too."""
    wf = load_example(EXAMPLES["sweep"])
    node = next(n for n in wf["nodes"] if n["type"] == "RewardTuneQualityDiversitySweep")
    seed_at = 4  # prompts, negative, images_per_prompt, seed, then the control
    assert node["widgets_values"][seed_at] == "fixed"
    del node["widgets_values"][seed_at]
    with pytest.raises(WorkflowError, match="control-after-generate widget of 'seed' holds 40"):
        ui_to_api(wf, info, check_options=False)


@pytest.mark.slow
def test_seed_inputs_say_control_after_generate(info):
    for name in our_nodes(info):
        for inp, spec in widget_inputs(info[name]):
            if inp in ("seed", "noise_seed") or "seed" in inp:
                assert "control_after_generate" in spec[1], f"{name}.{inp} leaves the control widget to the frontend"


def test_combined_inputs_are_nested_and_flat_prompts_are_refused(host, models_tree):
    """switch_unit and mode are DynamicCombos: an API prompt names their inputs
    switch_unit.switch_step / switch_unit.switch_fraction / mode.blend_power. A prompt with the
    flat names of RewardTune 0.2 is refused by ComfyUI's validation, naming the missing input."""
    def prompt(switch):
        return {
            "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": models_tree["sd15"]}},
            "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a fox"}},
            "lat": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "c": {"class_type": "RewardTuneCombinedKSampler", "inputs": {
                "base_model": ["ckpt", 0], "tuned_model": ["ckpt", 0], "positive": ["pos", 0], "negative": ["pos", 0],
                "latent_image": ["lat", 0], "seed": 0, "steps": 4, "cfg_base": 7.5, "cfg_tuned": 1.0,
                "sampler_name": "euler", "scheduler": "normal", "handoff": "continuous", "denoise": 1.0, **switch}},
            "dec": {"class_type": "VAEDecode", "inputs": {"samples": ["c", 0], "vae": ["ckpt", 2]}},
            "out": {"class_type": "PreviewImage", "inputs": {"images": ["dec", 0]}}}

    def errors(switch):
        return [(e["message"], e["details"]) for e in host.validate(prompt(switch))[3].get("c", {}).get("errors", [])]
    assert errors(combined_switch_inputs(switch_step=3)) == []
    assert errors(combined_switch_inputs(switch_unit="fraction", switch_fraction=0.5, mode="blend", blend_power=2.0)) == []
    assert errors({"switch_unit": "step", "switch_step": 3, "switch_fraction": 0.5, "mode": "switch",
                   "blend_power": 1.0}) == [("Required input is missing", "switch_step")]
    assert errors({"switch_unit": "step", "switch_unit.switch_step": 3, "mode": "blend"}) == \
        [("Required input is missing", "blend_power")]


def test_a_title_key_replaces_one_node_of_a_type(info):
    """Two CLIPTextEncode nodes (Positive, Negative) take different texts by their titles; a type
    key reaches the nodes no title key names."""
    wf = load_example(EXAMPLES["combined"])

    def texts(replace):
        prompt = ui_to_api(wf, info, replace, check_options=False)
        return {p["_meta"]["title"]: p["inputs"]["text"] for p in prompt.values() if p["class_type"] == "CLIPTextEncode"}

    assert texts({("Positive", "text"): "a red circle", ("Negative", "text"): ""}) == {"Positive": "a red circle",
                                                                                       "Negative": ""}
    assert texts({("CLIPTextEncode", "text"): "a red circle", ("Negative", "text"): ""}) == {
        "Positive": "a red circle", "Negative": ""}
    with pytest.raises(WorkflowError, match="does not have"):
        texts({("Neutral", "text"): ""})


# ------------------------------------------------------------------ the shipped examples
@pytest.mark.slow
@pytest.mark.parametrize("key", sorted(EXAMPLES))
def test_example_converts_as_the_frontend_reads_it(info, key):
    """Every widget value lands on the input it belongs to: each value fits its input's type,
    bounds and (for fixed option lists) options, and the node holds exactly as many values as
    the frontend reads (control widgets included)."""
    wf = load_example(EXAMPLES[key])
    prompt = ui_to_api(wf, info, check_options=False)
    for node in wf["nodes"]:
        if str(node["id"]) not in prompt:
            continue
        inputs = prompt[str(node["id"])]["inputs"]
        node_info = info[node["type"]]
        for name, spec in widget_inputs(node_info):
            if is_widget(spec) and name not in MODEL_FILE_INPUTS and spec[0] != "COMFY_DYNAMICCOMBO_V3" \
                    and combo_options(spec) and not isinstance(inputs.get(name), list):
                assert inputs[name] in combo_options(spec), (key, node["type"], name, inputs[name])
        for inp in node.get("inputs", []):  # every connected socket reaches the prompt as a link
            if inp.get("link") is not None:
                assert isinstance(inputs.get(inp["name"]), list), (key, node["type"], inp["name"])


@pytest.mark.slow
def test_examples_hold_the_papers_settings(info):
    """Spot checks by input name: the values users see are the ones the notes describe."""
    def inputs(key, ntype):
        return [p["inputs"] for p in ui_to_api(load_example(EXAMPLES[key]), info, check_options=False).values()
                if p["class_type"] == ntype]
    comb = inputs("combined", "RewardTuneCombinedKSampler")[0]
    assert {k: comb[k] for k in ("seed", "steps", "switch_unit", "switch_unit.switch_step", "cfg_base", "cfg_tuned",
                                 "mode", "sampler_name", "scheduler", "handoff", "denoise")} == {
        "seed": 42, "steps": 40, "switch_unit": "step", "switch_unit.switch_step": 30, "cfg_base": 7.5,
        "cfg_tuned": 1.0, "mode": "switch", "sampler_name": "ddpm", "scheduler": "ddim_uniform",
        "handoff": "continuous", "denoise": 1.0}
    sweep = inputs("sweep", "RewardTuneQualityDiversitySweep")[0]
    assert (sweep["seed"], sweep["steps"], sweep["scheduler"], sweep["width"], sweep["height"]) == \
        (0, 40, "ddim_uniform", 512, 512)
    sqdf = inputs("train_sqdf", "RewardTuneTrainLoRA")[0]
    assert (sqdf["objective"], sqdf["preset"], sqdf["lcm_lora"]) == ("sqdf", "SQDF HPS (paper)", "(none)")
    assert len(sqdf["prompts"].splitlines()) == 4
    refl = inputs("train_imagerefl", "RewardTuneTrainLoRA")[0]
    assert (refl["objective"], refl["preset"], refl["dataset_folder"]) == \
        ("imagerefl", "ImageReFL (paper, SD1.5)", "my_dataset")


# how the shipped templates' file names say a model family; a title naming a family must name the
# family of its node's file (template 7's SD3.5 loader was titled "Base checkpoint (SD1.5)")
FAMILIES = {"SD1.5": r"v1-5|sd15|sd1\.5", "SDXL": r"sdxl|sd_xl", "SD3.5": r"sd3\.5|sd35"}
FAMILY = re.compile("|".join(re.escape(f) for f in FAMILIES))
NOTE_TITLE = "About this workflow"


@pytest.mark.parametrize("key", sorted(EXAMPLES))
def test_template_titles_state_no_numbers_and_name_the_right_family(key):
    """A title that states a number goes stale as soon as the widget it repeats changes ("k = 30 of
    40" over a node set to 28 steps, switch 21): no digits in titles but a family's name; a title
    that names a family names the one of the node's file."""
    for node in load_example(EXAMPLES[key])["nodes"]:
        title = node.get("title") or ""
        assert not re.search(r"\d", FAMILY.sub("", title)), f"{key}: node {node['id']} is titled {title!r}"
        for family in FAMILY.findall(title):
            files = [v for v in node.get("widgets_values") or [] if isinstance(v, str) and v.endswith(".safetensors")]
            assert files and all(re.search(FAMILIES[family], f, re.IGNORECASE) for f in files), \
                f"{key}: node {node['id']} titled {title!r} holds {files}"


@pytest.mark.slow
def test_templates_share_one_placeholder_style(info):
    """The files a user must supply have one kind of name in every template (my_…, as the
    dataset_folder tooltip's example, my_dataset), and every note has the same title (an untitled
    note shows as "Markdown Note")."""
    tooltip = info["RewardTuneTrainLoRA"]["input"]["required"]["dataset_folder"][1]["tooltip"]
    assert "my_dataset" in tooltip, tooltip
    for key, name in EXAMPLES.items():
        wf = load_example(name)
        prompt = ui_to_api(wf, info, check_options=False)
        for node in prompt.values():
            placeholder = node["inputs"].get("lora_name") if node["class_type"] == "LoraLoader" else \
                node["inputs"].get("dataset_folder") if node["class_type"] == "RewardTuneTrainLoRA" else None
            if placeholder:
                assert placeholder.startswith("my_"), f"{key}: {node['class_type']} holds {placeholder!r}"
        notes = [n for n in wf["nodes"] if n["type"] in ("MarkdownNote", "Note")]
        assert notes and all(n.get("title") == NOTE_TITLE for n in notes), \
            f"{key}: notes titled {[n.get('title') for n in notes]}"


def _box(node):
    x, y = node["pos"]
    w, h = node["size"]
    return x, y - TITLE_HEIGHT, x + w, y + h   # the title bar sits above pos


def _overlap(a, b):
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


@pytest.mark.slow
@pytest.mark.parametrize("key", sorted(EXAMPLES))
def test_example_layout_has_no_overlaps_and_room_for_every_widget(info, key):
    wf = load_example(EXAMPLES[key])
    for node in wf["nodes"]:
        if node["type"] in info:
            need_w, need_h = min_node_size(node, info[node["type"]])
            w, h = node["size"]
            title = node.get("title") or info[node["type"]]["display_name"]
            assert h >= need_h, f"{key}: {title} is {h} px high, its slots and widgets need {need_h}"
            assert w >= need_w, f"{key}: {title!r} is {w} px wide, its title needs {need_w:.0f}"
    for a, b in itertools.combinations(wf["nodes"], 2):
        assert not _overlap(_box(a), _box(b)), f"{key}: node {a['id']} ({a.get('title', a['type'])}) overlaps " \
                                               f"node {b['id']} ({b.get('title', b['type'])})"
    for a, b in itertools.combinations(wf.get("groups", []), 2):
        assert not _overlap(a["bounding"][:2] + [a["bounding"][0] + a["bounding"][2], a["bounding"][1] + a["bounding"][3]],
                            b["bounding"][:2] + [b["bounding"][0] + b["bounding"][2], b["bounding"][1] + b["bounding"][3]])


def test_overlap_check_can_fail():
    """The layout check sees a node whose title bar reaches into the node above."""
    upper = {"pos": [0, 30], "size": [300, 262]}
    lower = {"pos": [0, 30 + 262 + 20], "size": [300, 100]}   # 20 px gap, title bar 30 px
    assert _overlap(_box(upper), _box(lower))
    lower["pos"][1] += 10
    assert not _overlap(_box(upper), _box(lower))


@pytest.mark.slow
def test_templates_are_listed_with_pictures(server, pack):
    """/workflow_templates lists one template per task; the Templates dialog titles each card with
    the file name and fetches <name>.jpg as its picture. ComfyUI's own templates and node docs are
    served too (a normal install has their packages; without them the dialog had only ours and an
    error banner)."""
    core = server.get("/templates/index.json")
    assert isinstance(core, list) and sum(len(c.get("templates", [])) for c in core) > 10
    assert server.get("/docs/KSampler/en.md").decode("utf-8").strip()
    listed = server.get("/workflow_templates")[pack]
    assert sorted(listed) == sorted(EXAMPLES.values())
    for name in listed:
        base = f"/api/workflow_templates/{pack}/{urllib.parse.quote(name)}"
        wf = server.get(base + ".json")
        wf = json.loads(wf) if isinstance(wf, bytes) else wf
        assert wf["nodes"]
        picture = Image.open(io.BytesIO(server.get(base + ".jpg")))
        assert picture.format == "JPEG" and picture.size == (256, 256), (name, picture.format, picture.size)
        assert len(set(picture.convert("L").resize((16, 16)).tobytes())) > 8, f"{name}.jpg is a flat placeholder"
        assert re.fullmatch(r"\d [A-Z][A-Za-z0-9 .,()-]+", name), f"{name!r} does not read as a title"


# ------------------------------------------------------------------ a flow-model template
def _saved(server, entry, node_id):
    import numpy as np
    img = entry["outputs"][node_id]["images"]
    return np.stack([np.asarray(Image.open(f"{server.workdir}/output/{i['subfolder']}/{i['filename']}")) for i in img])


@pytest.mark.slow
def test_sd35_template_runs_on_a_flow_checkpoint(server, info, models_tree, reward_tree):
    """Template 7 on a tiny SD3.5 checkpoint (MMDiT, rectified flow, CLIP-L, 16-channel TAESD) and a
    LoRA for it, as a user queues it: the Combined KSampler's row equals the base row at k = N and the
    tuned row at k = 0 (the images, bit for bit), and differs from both at k = N/2. Then the
    quality–diversity sweep template runs on the same flow model."""
    steps = 4

    def run(k):
        prompt = ui_to_api(load_example(EXAMPLES["combined_sd35"]), info, {
            ("CheckpointLoaderSimple", "ckpt_name"): models_tree["sd35"],
            ("LoraLoader", "lora_name"): models_tree["sd35_lora"],
            ("EmptySD3LatentImage", "width"): 64, ("EmptySD3LatentImage", "height"): 64,
            ("KSampler", "steps"): steps, ("RewardTuneCombinedKSampler", "steps"): steps,
            ("RewardTuneCombinedKSampler", "switch_unit.switch_step"): k})
        entry = server.wait(server.queue(prompt), timeout=600)
        assert entry["status"]["status_str"] == "success", (entry["status"], server.log_tail())
        return {row: _saved(server, entry, nid) for row, nid in (("base", "12"), ("combined", "13"), ("tuned", "14"))}

    assert "lora key not loaded" not in server.log_tail(200_000)
    at_n, at_0, mid = run(steps), run(0), run(steps // 2)
    assert "lora key not loaded" not in server.log_tail(200_000)
    assert at_n["base"].shape == (2, 64, 64, 3)
    assert (at_n["combined"] == at_n["base"]).all() and (at_0["combined"] == at_0["tuned"]).all()
    assert not (at_n["base"] == at_n["tuned"]).all(), "the LoRA did not change the SD3.5 model"
    assert not (mid["combined"] == mid["base"]).all() and not (mid["combined"] == mid["tuned"]).all()

    info = server.get("/object_info")  # again: the reward files came after the module's first read
    sweep = ui_to_api(load_example(EXAMPLES["sweep"]), info, {
        ("CheckpointLoaderSimple", "ckpt_name"): models_tree["sd35"], ("LoraLoader", "lora_name"): models_tree["sd35_lora"],
        ("RewardTuneLoadRewardModel", "reward_model"): reward_tree["files"]["pickscore"],
        ("RewardTuneQualityDiversitySweep", "steps"): steps, ("RewardTuneQualityDiversitySweep", "switch_steps"): "0, 2, 4",
        ("RewardTuneQualityDiversitySweep", "images_per_prompt"): 2,
        ("RewardTuneQualityDiversitySweep", "width"): 64, ("RewardTuneQualityDiversitySweep", "height"): 64})
    entry = server.wait(server.queue(sweep), timeout=600)
    assert entry["status"]["status_str"] == "success", (entry["status"], server.log_tail())
    texts = " ".join(t for o in entry["outputs"].values() for t in o.get("text", []))
    for k in (0, 2, 4):
        assert re.search(rf"\bk\s*=\s*{k}\b", texts), texts[:2000]


# ------------------------------------------------------------------ help pages
def _all_input_names(node_info):
    names = []

    def visit(name, spec):
        names.append(name)
        if spec[0] == "COMFY_DYNAMICCOMBO_V3":
            for option in spec[1]["options"]:
                for group in option["inputs"].values():
                    for child, child_spec in group.items():
                        visit(child, child_spec)
    for name, spec in widget_inputs(node_info):
        visit(name, spec)
    return names


@pytest.mark.slow
def test_every_node_has_a_help_page_documenting_every_input(host, server, info, pack):
    """Every node of the pack in NODE_CLASS_MAPPINGS has a help page the server serves at the first
    address the frontend's help panel fetches, /extensions/<pack>/docs/<Node>/en.md (it falls back
    to <Node>.md only after a 404 there); each page names every input, as `name`, and has a worked
    example."""
    ours = our_nodes(info)
    assert ours == sorted(n for n in host.node_classes if n.startswith("RewardTune"))
    for name in ours:
        page = server.get(f"/extensions/{pack}/docs/{name}/en.md")
        assert isinstance(page, bytes), f"{name}: help page not served as markdown"
        text = page.decode("utf-8")
        assert text.startswith("# "), f"{name}: help page has no title"
        missing = [i for i in _all_input_names(info[name]) if f"`{i}`" not in text]
        assert not missing, f"web/docs/{name}/en.md does not document {missing}"
        assert "## Example" in text, f"{name}: help page has no worked example"
