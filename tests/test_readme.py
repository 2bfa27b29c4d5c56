"""The README documents every flag of every script, and its commands are the ones CI runs."""

from __future__ import annotations

import importlib

import pytest
from helpers import REPO

from vlcap import cli

SCRIPTS = ["data2csv", "csv2json", "train", "infer", "make_offline_model", "make_coco_folder"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_flag_is_in_the_readme(name):
    readme = (REPO / "README.md").read_text()
    module = importlib.import_module(name)
    flags = ["--" + k.lower().replace("_", "-") for k in cli.settings_of(vars(module))]
    assert flags, f"{name} has no settings?"
    missing = [f for f in flags if f"`{f}" not in readme and f"{f}`" not in readme]
    assert not missing, f"README does not mention {name}.py's {missing}"


def test_ci_runs_the_readmes_commands():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    for command in ["python -m venv .venv && .venv/bin/pip install -r requirements.txt", ".venv/bin/python -m pytest"]:
        assert command in readme and command in ci
