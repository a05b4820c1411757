"""The dependency versions statekv is tested with, checked when the model code is imported.

statekv reaches into transformers' internals (processor layouts, cache classes, the attention interface) and
torch's (FLOP counting, SDPA backends): a release that changes them can change answers without failing. So
pyproject.toml bounds those two to the releases the test suite passed on, and `check_tested_versions` refuses to
run on others in one line, instead of giving wrong answers. The bounds are read from the installed package's own
metadata (pyproject.toml as installed), so they are written once. A source tree that is not installed has no
metadata and is not checked.

`STATEKV_ALLOW_UNTESTED=1` turns the refusal into a warning (the canary, `.ci/newest`, runs the tests on the newest
releases that way).
"""

from __future__ import annotations

import logging
import os
from importlib import metadata

from statekv.errors import StateKVError

logger = logging.getLogger(__name__)

CHECKED = ("transformers", "torch")  # what statekv reaches into; the others are used through public APIs
ALLOW_ENV = "STATEKV_ALLOW_UNTESTED"


class UntestedVersionError(StateKVError, ImportError):
    """An installed dependency is outside the versions statekv was tested with."""

    def __init__(self, name: str, installed: str, tested: str) -> None:
        self.name, self.installed, self.tested = name, installed, tested
        super().__init__(f"{name} {installed} is installed, but statekv is tested with {name}{tested}: install the "
                         f"tested set (pip install -c constraints.txt -e . in a checkout, or pip install "
                         f"'{name}{tested}'), or set {ALLOW_ENV}=1 to run anyway (answers may be wrong)")


def tested_bounds(names: tuple[str, ...] = CHECKED) -> dict[str, str]:
    """{name: specifier} of `names` as the installed statekv requires them; {} when statekv is not installed."""
    from packaging.requirements import Requirement

    try:
        requires = metadata.requires("statekv") or []
    except metadata.PackageNotFoundError:
        return {}
    bounds = {}
    for line in requires:
        req = Requirement(line)
        if req.name in names and (req.marker is None or req.marker.evaluate({"extra": ""})):
            bounds[req.name] = str(req.specifier)
    return bounds


def check_tested_versions(names: tuple[str, ...] = CHECKED) -> None:
    """UntestedVersionError (one line) if an installed dependency in `names` is outside statekv's tested bounds;
    only a warning with STATEKV_ALLOW_UNTESTED=1."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    for name, spec in tested_bounds(names).items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # pip's own resolution reports a missing dependency
        if SpecifierSet(spec).contains(Version(installed), prereleases=True):
            continue
        error = UntestedVersionError(name, installed, spec)
        if os.environ.get(ALLOW_ENV, "") not in ("", "0"):
            logger.warning("%s (%s is set)", error, ALLOW_ENV)
            continue
        raise error
