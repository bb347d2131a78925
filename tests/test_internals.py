"""The private APIs skipnets relies on (``skipnets.internals``) still exist in the installed
Lightning, torch, torchvision and W&B, each names a test that runs its path, and the ones replaced
by public APIs stay out of the code."""

from __future__ import annotations

import re

import pytest
from conftest import ROOT

from skipnets.internals import PRIVATE_APIS


@pytest.mark.parametrize("api", PRIVATE_APIS, ids=lambda api: api.name.split(",")[0])
def test_each_private_api_is_still_there(api) -> None:
    assert api.present(), f"{api.name} is gone from the installed version: see {api.used_in}"
    assert (ROOT / api.tested_by).is_file()
    assert api.why and api.used_in


def test_replaced_private_apis_stay_out() -> None:
    replaced = ["_ddp_kwargs", "_accelerator_connector", "settings._offline", "._modules"]
    sources = [*(ROOT / "skipnets").rglob("*.py"), *(ROOT / "plugins").rglob("*.py")]
    found = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in sources
        for name in replaced
        if re.search(re.escape(name), path.read_text())
    ]
    assert not found
