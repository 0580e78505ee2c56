"""The experiment config, the arm grammar, result-folder guards and the demo's argument handling (no training)."""

import argparse

import pytest

from reversion_lens.errors import ConfigError, ResultsFormatError
from reversion_lens.io import read_json, write_json
from reversion_lens.pipeline import Arm, ExperimentConfig
from reversion_lens.pipeline.layout import record_config
from reversion_lens.toyworld import demo


def test_arm_parsing():
    assert Arm.parse("none") == Arm("none")
    a = Arm.parse("grad:v_rev@0,2")
    assert (a.mode, a.direction, a.layers, a.data) == ("grad", "v_rev", (0, 2), "benign")
    assert Arm.parse("control:rehearsal").data == "rehearsal" and Arm.parse("control:rehearsal").is_control
    assert Arm.parse("control:aligned-mix").data == "rehearsal"  # the toy world's older name still works
    assert Arm.parse("penalty-push:v_rev").mode == "penalty-push"
    with pytest.raises(ConfigError, match="'none' blocks nothing"):
        Arm.parse("none@1")
    with pytest.raises(ConfigError, match="control:rehearsal"):
        Arm.parse("control:other")
    with pytest.raises(ConfigError, match="unknown arm 'grad:vrev'"):
        Arm.parse("grad:vrev")
    with pytest.raises(ConfigError, match="must be integers"):
        Arm.parse("grad:v_rev@x")


def test_config_validation_and_toml(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config field\(s\) \['step'\]"):
        ExperimentConfig.from_dict({"step": 3})
    with pytest.raises(ConfigError, match="outside 0..10"):
        ExperimentConfig(steps=10, track_steps=(1, 20))
    cfg = ExperimentConfig(
        params={"preset": "tiny", "d_model": 32}, seeds=(3, 1), steps=40, track_steps=(1, 40), eval_steps=(0, 40)
    )
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    back = ExperimentConfig.from_toml(path)
    assert back == cfg and back.hash() == cfg.hash()
    (tmp_path / "bad.toml").write_text("seeds = [0]\nlearning_rate = 1\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        ExperimentConfig.from_toml(tmp_path / "bad.toml")
    # workers and cache location do not change the numbers, so not the hash
    assert ExperimentConfig(workers=1, cache_dir="/x").hash() == ExperimentConfig().hash()
    assert ExperimentConfig(steps=50, track_steps=(1, 50), eval_steps=(50,)).hash() != ExperimentConfig().hash()
    # the setting's own table is read by the setting: a wrong field there is named with the table
    with pytest.raises(ConfigError, match=r"unknown \[toy\] field\(s\) \['d_modle'\]"):
        ExperimentConfig(params={"d_modle": 3})
    with pytest.raises(ConfigError, match=r"belong to another setting"):
        ExperimentConfig.from_dict({"setting": "toy", "hf": {"base": "x"}})
    with pytest.raises(ConfigError, match="unknown setting 'toys'"):
        ExperimentConfig(setting="toys")
    with pytest.raises(ConfigError, match="blocks layer"):
        ExperimentConfig(params={"preset": "tiny"}, arms=("grad:v_rev@5",))


def test_results_folder_guards(tmp_path):
    cfg = ExperimentConfig(params={"preset": "tiny"}, seeds=(0,))
    record_config(tmp_path, cfg)
    recorded = read_json(tmp_path / "config.json")
    assert recorded["config_hash"] == cfg.hash() and "versions" in recorded["environment"]
    record_config(tmp_path, cfg)  # same config: fine
    with pytest.raises(ResultsFormatError, match="different config"):
        record_config(tmp_path, ExperimentConfig(params={"preset": "tiny"}, seeds=(1,)))
    write_json(tmp_path / "config.json", {**recorded, "format_version": 0})
    with pytest.raises(ResultsFormatError, match="results format 0"):
        record_config(tmp_path, cfg)


def _args(*argv):
    p = argparse.ArgumentParser()
    demo.add_arguments(p)
    return p.parse_args(list(argv))


def test_demo_options(tmp_path, capsys):
    cfg = demo.config_from_args(_args("--seeds", "3"))
    assert cfg.seeds == (0, 1, 2) and cfg.params.get("preset", "default") == "default" and cfg.steps == 100
    assert demo.config_from_args(_args("--seeds", "0,7")).seeds == (0, 7)
    short = demo.config_from_args(_args("--steps", "30"))
    assert short.track_steps == (1, 2, 5, 10, 20, 30) and short.eval_steps == (0, 30)
    assert demo.config_from_args(_args()).seeds == tuple(range(12))  # the demo's shipped-bases design
    quick = demo.config_from_args(_args("--quick"))
    assert quick.params["preset"] == "tiny" and len(quick.seeds) == 2
    with pytest.raises(ConfigError, match="--seeds"):
        demo.config_from_args(_args("--seeds", "two"))
    (tmp_path / "c.toml").write_text('seeds = [4]\n[toy]\npreset = "paper"\n')
    cfg = demo.config_from_args(_args("--config", str(tmp_path / "c.toml"), "--steps", "50"))
    assert (cfg.params["preset"], cfg.seeds, cfg.steps) == ("paper", (4,), 50)
    assert demo.run(_args("--print-config", "--preset", "tiny")) == 0
    printed = capsys.readouterr().out
    assert 'preset = "tiny"' in printed and "seeds = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]" in printed


def test_config_files_with_unknown_fields_or_bad_values(tmp_path):
    cases = {
        "seeds = [0]\n[toy]\nd_modle = 32\n": r"unknown \[toy\] field\(s\) \['d_modle'\]; valid fields are",
        '[toy]\npreset = "huge"\n': "unknown preset 'huge'; use one of",
        'preset = "tiny"\n': r"unknown config field\(s\) \['preset'\]",
        'steps = "100"\n': "wrong kind.*steps an integer",
        "seeds = 3\n": "'seeds' must be a list.*seeds = \\[0, 1\\]",
        'site = "resid"\n': "unknown site 'resid'",
        'arms = ["grad:vrev"]\n': "unknown arm 'grad:vrev'",
        "seeds = [0\n": "not valid TOML.*fix the syntax",
        'setting = "toys"\n': "unknown setting 'toys'",
        'arms = ["grad:v_rev@2"]\n[toy]\npreset = "tiny"\n': r"blocks layer\(s\) \[2\], but the model has 2 layers \(0..1\)",
    }
    for text, fragment in cases.items():
        path = tmp_path / "c.toml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=fragment):
            ExperimentConfig.from_toml(path)
