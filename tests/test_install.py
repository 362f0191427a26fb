"""Installing and running without Triton (macOS, Windows): the torch backend is enough."""

from __future__ import annotations

import pathlib

import pytest
import torch
from packaging.requirements import Requirement

from dpo_fast.loss import validation

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _requirements() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {Requirement(r).name: Requirement(r) for r in project["dependencies"]}


@pytest.mark.parametrize("platform, needed", [("linux", True), ("darwin", False), ("win32", False)])
def test_triton_is_required_on_linux_only(platform, needed):
    triton = _requirements()["triton"]
    assert triton.marker is not None, "triton needs an environment marker: it has no macOS/Windows wheels"
    assert triton.marker.evaluate({"sys_platform": platform}) is needed


def test_auto_backend_without_triton_takes_torch(monkeypatch):
    monkeypatch.setattr(validation, "triton_available", lambda: False)
    assert validation.resolve_backend("auto", torch.device("cuda")) == "torch"
    assert validation.resolve_backend("auto", torch.device("cpu")) == "torch"


def test_triton_backend_without_triton_says_what_to_install(monkeypatch):
    monkeypatch.setattr(validation, "triton_available", lambda: False)
    with pytest.raises(ValueError, match=r"backend='triton' needs the triton package"):
        validation.resolve_backend("triton", torch.device("cuda"))


def test_auto_backend_with_triton_on_cuda_takes_triton(monkeypatch):
    monkeypatch.setattr(validation, "triton_available", lambda: True)
    assert validation.resolve_backend("auto", torch.device("cuda")) == "triton"
