"""The test set-up installs what was tested: the dev extra at the versions of constraints-test.txt (issue #23 item 10)."""

import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PINS = {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in
        (line.split("==") for line in (ROOT / "constraints-test.txt").read_text().splitlines() if "==" in line)}


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_makefile_installs_the_dev_extra_under_the_constraints():
    make = (ROOT / "Makefile").read_text()
    assert re.search(r"pip install .*-c constraints-test\.txt .*-e \"\.\[dev\]\"", make)
    assert re.search(r"^\$\(STAMP\): .*constraints-test\.txt", make, flags=re.M)  # a new pin reinstalls


def test_every_package_of_the_dev_extra_is_pinned():
    dev = [Requirement(r) for r in metadata.requires("mpirouter") or []]
    wanted = {normal(r.name) for r in dev if r.marker is None or r.marker.evaluate({"extra": "dev"})}
    assert wanted - set(PINS) == set()


@pytest.mark.skipif(not (Path(sys.prefix) / ".mpirouter-installed").is_file(), reason="not the venv that make setup made")
def test_the_venv_make_setup_made_has_the_pinned_versions():
    drifted = {}
    for name, pinned in PINS.items():
        try:
            installed = re.sub(r"\+.*", "", metadata.version(name))
        except metadata.PackageNotFoundError:
            continue
        if installed != pinned:
            drifted[name] = (pinned, installed)
    assert drifted == {}, "rerun .ci/pin-constraints after changing the dev extra, or make setup after changing a pin"
