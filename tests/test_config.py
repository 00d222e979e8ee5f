"""How a TrainConfig is built: ``TrainConfig.resolve``'s precedence, field by field; the checks of
each source's names and types; ``check_inputs`` (the data an objective needs); the CLI's --help
showing every field's help; and the node (run through the real host) and the CLI (its real parser)
building the same TrainConfig from equivalent inputs."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest

from rewardtune.trainers.cli import build_parser, config_from_args
from rewardtune.trainers.config import ConfigError, TrainConfig
from rewardtune.trainers.fingerprint import uses_images, uses_prompts
from rewardtune.trainers.presets import CUSTOM, PRESETS

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SQDF = "SQDF aesthetic (paper)"

# field: (TrainConfig's default, base, the SQDF preset's value, first override, second override),
# each value differs from the one below it (so a source that failed to win shows), each valid with
# the preset's other fields
LADDER = {
    "lr": (3e-4, 2e-4, 1e-3, 5e-4, 7e-4),
    "rank": (8, 6, 4, 12, 16),
    "steps": (4000, 100, 2000, 300, 400),
    "num_steps": (40, 45, 50, 55, 60),
    "cfg": (7.5, 6.0, 5.0, 3.0, 2.0),
    "weight_decay": (1e-2, 2e-2, 1e-4, 3e-4, 0.0),
    "batch_size": (8, 4, 64, 2, 1),
    "grad_accum": (4, 2, 1, 3, 5),
    "objective": ("imagerefl", "refl", "sqdf", "imagerefl", "refl"),
}


def test_the_ladder_matches_the_defaults_and_the_preset():
    """The table below is what the precedence test reads: check it against the real sources."""
    defaults = TrainConfig()
    for name, (default, _, preset, *_) in LADDER.items():
        assert getattr(defaults, name) == default and PRESETS[SQDF][name] == preset, name


@pytest.mark.parametrize("name", LADDER)
@pytest.mark.parametrize("present", range(5))
def test_each_source_beats_the_ones_below_it(name, present):
    """With the ``present`` lowest sources given, the field holds the highest one's value; each
    source names only this field (the preset names its own, and those must not leak into it)."""
    default, base, preset, first, second = LADDER[name]
    args = [SQDF if present >= 2 else None]
    if present >= 3:
        args.append(("first", {name: first}))
    if present >= 4:
        args.append(("second", {name: second}))
    config = TrainConfig.resolve(*args, base=("base", {name: base}) if present >= 1 else None)
    assert getattr(config, name) == LADDER[name][present]
    if present < 2:  # no preset: nothing else moved from the defaults
        others = {f.name for f in dataclasses.fields(TrainConfig)} - {name}
        assert all(getattr(config, o) == getattr(TrainConfig(), o) for o in others)


def test_sources_set_only_the_fields_they_name():
    """All fields at once, each source naming a different subset: every field ends at the highest
    source that names it."""
    fields = list(LADDER)
    base = {n: LADDER[n][1] for n in fields}
    first = {n: LADDER[n][3] for n in fields[::2]}           # every other field
    second = {n: LADDER[n][4] for n in fields[::3]}          # every third
    config = TrainConfig.resolve(SQDF, ("first", first), ("second", second), base=("base", base))
    for n in fields:
        expected = second.get(n, first.get(n, LADDER[n][2]))
        assert getattr(config, n) == expected, n
    # fields the preset sets and nobody overrides come from the preset, the rest from the defaults
    assert config.sqdf_window == PRESETS[SQDF]["sqdf_window"] and config.seed == 0
    # custom, None and "" set nothing
    assert TrainConfig.resolve(CUSTOM) == TrainConfig.resolve(None) == TrainConfig.resolve("") == TrainConfig()
    # a plain mapping works as a source too
    assert TrainConfig.resolve(None, {"lr": 1e-3}).lr == 1e-3


@pytest.mark.parametrize("sources, message", [
    ([("config_json", {"lr": "0.001"})], 'config_json: "lr" must be a number, got "0.001" (write numbers without '
                                         'quotes)'),
    ([("--config run.json", {"steps": 2.5})], '--config run.json: "steps" must be a whole number, got 2.5'),
    ([("config_json", {"sqdf_use_buffer": 0})], 'config_json: "sqdf_use_buffer" must be true or false, got 0'),
    ([("config_json", {"targets": "to_q"})], 'config_json: "targets" must be a list of names, got "to_q"'),
    ([("config_json", {"rnak": 4})], "config_json: unknown training settings: rnak (did you mean rank?)"),
    ([("options", {"rank": 0})], "LoRA rank must be ≥ 1, got 0"),  # the result is validated
])
def test_each_source_is_checked_and_named_in_the_message(sources, message):
    with pytest.raises(ConfigError) as e:
        TrainConfig.resolve(None, *sources)
    assert message in str(e.value)


def test_unknown_preset_and_json_numbers():
    with pytest.raises(ConfigError, match=re.escape("unknown preset 'SQDF'; choose one of: " + ", ".join(PRESETS))):
        TrainConfig.resolve("SQDF")
    # JSON has one number type: a whole number for a float field, an integral float for an int field
    config = TrainConfig.resolve(None, ("config_json", {"cfg": 5, "steps": 10.0, "reward_scale": None}))
    assert (config.cfg, config.steps) == (5.0, 10) and type(config.cfg) is float and type(config.steps) is int


@pytest.mark.parametrize("text, name", [('{"reward_scale": NaN}', "reward_scale"), ('{"cfg": Infinity}', "cfg"),
                                        ('{"sqdf_gamma": NaN, "objective": "sqdf"}', "sqdf_gamma")])
def test_nan_and_infinity_are_refused_by_name(text, name):
    """Python's json reads NaN and Infinity; NaN passes every range check (all comparisons are
    false), so without the finiteness check a NaN reward scale trained on and failed at step 1."""
    with pytest.raises(ConfigError, match=f"{name} must be a finite number"):
        TrainConfig.from_json(text)


@pytest.mark.parametrize("objective, refl_every, has_prompts, has_images, message", [
    ("refl", 0, False, True, "classic ReFL samples from prompts: GIVE PROMPTS"),
    ("sqdf", 0, False, True, "SQDF samples from prompts: GIVE PROMPTS"),
    ("imagerefl", 4, False, True, "the ReFL regulariser (refl_every = 4) samples from prompts: GIVE PROMPTS"),
    ("imagerefl", 0, True, False, "ImageReFL trains on real images: GIVE IMAGES"),
    ("imagerefl", 0, False, True, None),
    ("refl", 0, True, False, None),
    ("sqdf", 0, True, False, None),
    ("imagerefl", 4, True, True, None),
])
def test_check_inputs_refuses_a_run_without_its_data(objective, refl_every, has_prompts, has_images, message):
    config = TrainConfig.resolve(None, {"objective": objective, "refl_every": refl_every, "sqdf_buffer": 64})
    # the same notion of "uses prompts / images" as the run's fingerprint
    assert (config.needs_prompts, config.needs_images) == (uses_prompts(config), uses_images(config))
    check = dict(has_prompts=has_prompts, has_images=has_images, give_prompts="GIVE PROMPTS", give_images="GIVE IMAGES")
    if message is None:
        assert config.check_inputs(**check) is config
    else:
        with pytest.raises(ConfigError) as e:
            config.check_inputs(**check)
        assert str(e.value) == message
    # the default hints (the engine's words)
    if message and "prompts" in message:
        with pytest.raises(ConfigError, match="samples from prompts: give at least one prompt"):
            config.check_inputs(has_prompts=False, has_images=True)


# ------------------------------------------------------------------------------------------- the CLI
REQUIRED = ["--checkpoint", "model.safetensors", "--reward", "reward.pt", "--out", "run"]


def cli_config(*argv) -> TrainConfig:
    return config_from_args(build_parser().parse_args([*REQUIRED, *argv]))


def _squeeze(text: str) -> str:
    return "".join(text.split())  # argparse wraps lines (also after hyphens)


def test_help_shows_every_field_with_its_help_and_default():
    text = _squeeze(build_parser().format_help())
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        help = f.metadata.get("help")
        assert help and len(help) > 10, f"{f.name} has no help text"
        flag = "--" + f.name.replace("_", "-")
        assert _squeeze(f"{flag} ") in text and _squeeze(help) in text, f.name
    assert _squeeze(f"(default: {defaults.lr})") in text and _squeeze("(default: unset)") in text
    # the real script: --help needs neither ComfyUI nor models
    proc = subprocess.run([sys.executable, os.path.join(PACK_ROOT, "scripts", "train.py"), "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = _squeeze(proc.stdout)
    assert _squeeze(dataclasses.fields(TrainConfig)[0].metadata["help"]) in out
    assert _squeeze("--sqdf-gamma FLOAT") in out and _squeeze("< ``--config run.json`` < the options") in out


def test_cli_precedence_preset_then_config_then_options(tmp_path, capsys):
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"lr": 5e-4, "rank": 12, "num_steps": 55, "cfg": 5.0}))
    config = cli_config("--preset", SQDF, "--config", str(run), "--lr", "7e-4", "--seed", "3")
    assert config.lr == 7e-4            # option > --config > preset
    assert config.rank == 12            # --config > preset
    assert config.num_steps == 55       # --config > preset
    assert config.alpha == 4.0          # preset > default
    assert config.seed == 3             # option > default
    assert config.grad_accum == 1 and config.precision == "fp32"
    # the --config file changing the preset's fields is said (lr is not: the option decides it; cfg is
    # the preset's own value)
    err = capsys.readouterr().err
    assert err.count("note:") == 1 and "sets num_steps, rank differently from the preset" in err, err
    # without --config: no note; the preset alone, then options
    assert cli_config("--preset", SQDF) == TrainConfig.resolve(SQDF)
    assert cli_config("--preset", SQDF, "--rank", "2").rank == 2
    assert "note:" not in capsys.readouterr().err
    # a run's full config.json resumes exactly as saved, options over it
    saved = tmp_path / "config.json"
    saved.write_text(config.to_json())
    assert cli_config("--config", str(saved)) == config
    assert cli_config("--config", str(saved), "--steps", "9") == dataclasses.replace(config, steps=9)
    (tmp_path / "typo.json").write_text('{"rnak": 4}')
    with pytest.raises(ConfigError, match=re.escape(f"--config {tmp_path / 'typo.json'}: unknown training settings: "
                                                    "rnak (did you mean rank?)")):
        cli_config("--config", str(tmp_path / "typo.json"))


# ------------------------------------------------------------------------- the node and the CLI agree
def _node_config(host, prompt) -> TrainConfig:
    """Run a Train Reward LoRA graph (wait mode) through the real host; the TrainConfig its job stored."""
    outputs = host.run(prompt)
    text = "".join(t for out in outputs.values() for t in out.get("text", []))
    (folder,) = re.findall(r"^files: (.+)$", text, re.M)
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        return TrainConfig.from_json(f.read())


@pytest.mark.slow
def test_the_node_and_the_cli_build_the_same_config(host, models_tree, reward_tree, tmp_path):
    from test_trainer_node import SMALL, train_prompt
    # 1. custom: every widget given; the CLI gives the same values as options (rank sets alpha in the node)
    prompt = train_prompt(models_tree, reward_tree, name="same-custom", mode="wait", steps=1, seed=3)
    node = _node_config(host, prompt)
    (tmp_path / "small.json").write_text(json.dumps(SMALL))
    cli = cli_config("--objective", "refl", "--steps", "1", "--lr", "1e-3", "--rank", "2", "--alpha", "2",
                     "--batch-size", "1", "--grad-accum", "1", "--width", "64", "--height", "64", "--precision",
                     "fp32", "--no-grad-checkpointing", "--save-every", "1", "--seed", "3",
                     "--config", str(tmp_path / "small.json"))
    assert node == cli
    assert (node.objective, node.lr, node.rank, node.num_steps, node.cfg) == ("refl", 1e-3, 2, 4, 2.0)

    # 2. a preset: the widgets left at their defaults (objective, learning_rate, rank, batch_size) give
    # way to it, the ones changed (steps, size, precision, checkpointing, save_every) win over it, and
    # config_json wins over both; the CLI: --preset, the changed settings as options, the same JSON
    extra = {**SMALL, "batch_size": 1, "sqdf_collect": 1, "sqdf_buffer": 4, "sqdf_window": 4}
    prompt = train_prompt(models_tree, reward_tree, name="same-preset", mode="wait", steps=1,
                          config_json=json.dumps(extra))
    prompt["3"]["inputs"].update(preset=SQDF, objective="imagerefl", learning_rate=3e-4, rank=8, batch_size=2)
    node = _node_config(host, prompt)
    (tmp_path / "extra.json").write_text(json.dumps(extra))
    cli = cli_config("--preset", SQDF, "--steps", "1", "--width", "64", "--height", "64", "--precision", "fp32",
                     "--no-grad-checkpointing", "--save-every", "1", "--config", str(tmp_path / "extra.json"))
    assert node == cli
    assert node.objective == "sqdf" and (node.lr, node.rank, node.alpha) == (1e-3, 4, 4.0)  # the preset's
    assert (node.steps, node.width, node.save_every) == (1, 64, 1)                        # changed widgets
    assert (node.num_steps, node.cfg, node.batch_size) == (4, 2.0, 1)                      # config_json
    assert node.weight_decay == 1e-4 and node.sqdf_gamma == 0.9                           # the preset's


def test_the_node_refuses_missing_data_and_bad_json_before_making_a_job(host, models_tree, reward_tree):
    import folder_paths
    from test_trainer_node import SMALL, train_prompt
    small = {**SMALL, "imagerefl_start": 2, "imagerefl_tf_min": 2, "imagerefl_tf_max": 3}
    jobs_dir = os.path.join(folder_paths.get_output_directory(), "rewardtune", "jobs")
    before = set(os.listdir(jobs_dir)) if os.path.isdir(jobs_dir) else set()
    cases = [(dict(prompts=""), "classic ReFL samples from prompts: write them in prompts"),
             (dict(objective="imagerefl", prompts=""), "ImageReFL trains on real images: set dataset_folder or "
                                                       "connect images"),
             (dict(config_json='{"lr": "0.001"}'), 'config_json: "lr" must be a number, got "0.001"'),
             (dict(config_json='{"lr": 0.001,'), "config_json is not valid JSON (Expecting property name")]
    for kw, message in cases:
        err = host.run_expect_error(train_prompt(models_tree, reward_tree, name="refused", **{"extra": small, **kw}))
        assert err.get("node_type") == "RewardTuneTrainLoRA" and message in err["exception_message"], (kw, err)
    after = set(os.listdir(jobs_dir)) if os.path.isdir(jobs_dir) else set()
    assert after == before  # refused before any job folder was made
    # the preset's tooltip states the precedence
    info = host.node_classes["RewardTuneTrainLoRA"].GET_NODE_INFO_V1()["input"]["required"]
    assert "widgets you changed win over the preset; config_json wins over both" in info["preset"][1]["tooltip"]
