"""Every YAML file in configs/ is a valid config, and the shipped workflow scripts parse."""

import subprocess
from pathlib import Path

import pytest

from pipeline.config import RunConfig, resolve_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_config_file_is_valid(path):
    cfg = resolve_config(path)
    assert isinstance(cfg, RunConfig)


def test_default_config_matches_the_code_defaults():
    assert resolve_config(ROOT / "configs" / "default.yaml") == RunConfig()


@pytest.mark.parametrize(
    "path",
    sorted((ROOT / "workflows").glob("*.sh")) + sorted((ROOT / "workflows").glob("*.sbatch")),
    ids=lambda p: p.name,
)
def test_workflow_scripts_parse_and_refuse_missing_arguments(path):
    subprocess.run(["bash", "-n", str(path)], check=True)
    result = subprocess.run(["bash", str(path)], capture_output=True, text=True)
    assert result.returncode == 2 and "usage" in result.stderr
