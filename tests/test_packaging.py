"""The wheel ships every folder of models/ that holds files, and carries the license."""
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

import tomllib


@pytest.mark.skipif(not (ROOT / "pyproject.toml").is_file(), reason="run from an installed wheel, not a checkout")
def test_every_model_folder_is_a_listed_package():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = set(config["tool"]["setuptools"]["packages"])
    folders = {p.name for p in (ROOT / "models").iterdir()
               if p.is_dir() and not p.name.startswith(("_", ".")) and any(f.is_file() for f in p.iterdir())}
    missing = sorted(f"fgcompile.models.{f}" for f in folders if f"fgcompile.models.{f}" not in packages)
    assert not missing, f"add {missing} to [tool.setuptools] packages in pyproject.toml"
    assert config["project"]["license"] == "Apache-2.0"
    assert "Apache License" in (ROOT / "LICENSE").read_text()[:200]
