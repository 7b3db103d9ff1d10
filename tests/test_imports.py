"""Every module imports and every command parses on the installed torch/timm (CI also runs this
file on the lowest declared versions and on the GPU machine's torch)."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import vitdistill
from vitdistill.cli import build_parser

OPTIONAL = {"vitdistill.data.hf": "datasets", "vitdistill.export.onnx": "onnx"}  # extras


def modules() -> list[str]:
    return sorted(
        m.name for m in pkgutil.walk_packages(vitdistill.__path__, "vitdistill.") if m.name != "vitdistill.__main__"
    )  # runs the CLI


@pytest.mark.parametrize("name", modules())
def test_module_imports(name):
    if name in OPTIONAL:
        pytest.importorskip(OPTIONAL[name])
    importlib.import_module(name)


def test_every_command_has_help(capsys):
    parser = build_parser()
    commands = [
        ["train"],
        ["eval"],
        ["demo"],
        ["cache"],
        ["labelmaps"],
        ["verify"],
        ["analyze"],
        ["bench", "throughput"],
        ["bench", "gpu"],
        ["recipes"],
        ["config"],
        ["export"],
        ["compare"],
    ]
    for command in commands:
        with pytest.raises(SystemExit) as done:
            parser.parse_args([*command, "--help"])
        assert done.value.code == 0
        assert "usage: vitdistill " + " ".join(command) in capsys.readouterr().out


def test_every_packaged_recipe_validates():
    from vitdistill import list_recipes, load_recipe

    for name in list_recipes():
        assert load_recipe(name).name == name
