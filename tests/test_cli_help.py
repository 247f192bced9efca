"""A terminal that teaches: every option has help text and its default, every command has
examples, and the README's option tables say the same as ``--help`` (both directions)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import click
import pytest
import yaml
from conftest import cli

from pipeline.cli import main
from pipeline.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
COMMANDS = ("run", "export", "inspect", "demo")
OPTION = re.compile(r"--[a-z][a-z0-9-]*")


def long_options(command: click.Command) -> set[str]:
    names = set()
    for param in command.params:
        if isinstance(param, click.Option):
            names |= {n for n in (*param.opts, *param.secondary_opts) if n.startswith("--")}
    return names - {"--help"}


def readme_options(command: str) -> set[str]:
    """Options in the first column of the README's table "Options of `pipeline COMMAND`"."""
    match = re.search(rf"^### Options of `pipeline {command}`\n(.*?)(?=^#)", README, re.S | re.M)
    assert match, f"README has no section 'Options of `pipeline {command}`'"
    rows = [line for line in match.group(1).splitlines() if line.startswith("| `")]
    return {name for row in rows for name in OPTION.findall(row.split("|")[1])}


@pytest.mark.parametrize("command", ["run", "export", "inspect"])
def test_readme_table_and_help_list_the_same_options(command):
    in_help = long_options(main.commands[command])
    in_readme = readme_options(command)
    assert in_help - in_readme == set(), "in --help, missing from the README table"
    assert in_readme - in_help == set(), "in the README table, not an option"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_help_and_a_default_and_the_command_examples(command):
    cmd = main.commands[command]
    ctx = click.Context(cmd, info_name=command, parent=click.Context(main, info_name="pipeline"))
    for param in cmd.params:
        if not isinstance(param, click.Option) or "--help" in param.opts:
            continue
        assert param.help and len(param.help) > 10, param.opts
        _, extra = param.get_help_record(ctx)
        assert "[default:" in extra or "[required]" in extra, (param.opts, extra)
    assert cmd.epilog and "Examples" in cmd.epilog and f"pipeline {command} " in cmd.epilog
    text = cli(command, "--help").output
    assert "Examples" in text and "[default:" in text


def test_run_help_shows_the_defaults_of_the_config():
    text = re.sub(r"\s+", " ", cli("run", "--help").output)
    assert "--batch-size INTEGER Tiles per forward pass" in text
    assert "[default: 8]" in text and "[default: 0.4]" in text and "[default: uint8]" in text


def test_given_options_override_the_config_file_and_defaults_do_not(tmp_path, monkeypatch):
    """A --config value stays unless the option is given on the command line."""
    import pipeline.run as run_module

    seen = {}

    def fake_run(inputs, out, model, cfg, **kwargs):  # records the resolved config only
        seen["cfg"] = cfg
        raise run_module.ConfigError("stop here", where="test")

    monkeypatch.setattr(run_module, "run", fake_run)
    config = tmp_path / "c.yaml"
    config.write_text("batch_size: 3\ndtype: float32\n")
    image = tmp_path / "a.tif"
    import numpy as np
    import tifffile

    tifffile.imwrite(image, np.zeros((8, 8), np.uint8))
    cli("run", image, "--out", tmp_path / "o.zarr", "--config", config, "--dtype", "float16")
    assert seen["cfg"].batch_size == 3 and seen["cfg"].dtype == "float16"


def test_default_config_lists_every_key_and_points_only_at_what_exists():
    path = ROOT / "configs" / "default.yaml"
    keys = set(yaml.safe_load(path.read_text()))
    assert keys == {f.name for f in dataclasses.fields(RunConfig)}
    for section in re.findall(r'section "([^"]+)"', path.read_text()):
        assert re.search(rf"^#+ {re.escape(section)}$", README, re.M), section
    for key in keys:  # the README's table has an option for every key
        assert f"--{key.replace('_', '-')}" in README, key


def test_export_stores_class_names_read_back_and_says_when_untrained(tmp_path):
    from pipeline.backends import read_model_spec

    path = tmp_path / "m.onnx"
    args = ("export", path, "--in-channels", "3", "--classes", "3", "--base", "4", "--depth", "2")
    result = cli(*args, "--class-names", "tumor,stroma")
    assert result.exit_code == 0, result.output
    assert "random (untrained)" in result.output and "--weights" in result.output
    spec = read_model_spec(path)
    assert spec.class_names == ("tumor", "stroma")
    assert "background, tumor, stroma" in cli("inspect", path).output
    bad = cli("export", tmp_path / "m2.onnx", "--classes", "2", "--class-names", "a,b,c,d")
    assert bad.exit_code == 2 and "4 class names" in bad.output
    assert not (tmp_path / "m2.onnx").exists()
