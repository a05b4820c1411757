"""tests/conftest.py marks what a test uses, and that marking decides how the suite runs: the fast lane leaves out
`ray`, `s3` and `subprocess` tests, and under `-n 2 --dist loadgroup` every test of the session's Ray cluster runs on
one worker (and those that start Ray heads of their own in a second group). A test that starts Ray without its mark
would start a second session cluster on the other worker, or run in the fast lane."""

from __future__ import annotations

import pytest

from tests.conftest import RAY_FIXTURES, RAY_GROUPS


def _group(item: pytest.Item) -> str | None:
    mark = item.get_closest_marker("xdist_group")
    return (mark.args[0] if mark.args else mark.kwargs.get("name")) if mark else None


def test_every_test_that_starts_ray_is_marked_and_grouped(request):
    items = request.session.items  # what this run collected and selected (all of it in CI)
    ray = [item for item in items if RAY_FIXTURES & set(getattr(item, "fixturenames", ()))]
    if not ray:
        pytest.skip("no test of this run starts Ray (a single file, or the fast lane)")
    def expected(item: pytest.Item) -> str:
        names = set(item.fixturenames)
        return "ray" if "ray_cluster" in names else RAY_GROUPS[sorted(names & RAY_FIXTURES)[0]]

    assert [i.nodeid for i in ray if i.get_closest_marker("ray") is None or _group(i) != expected(i)] == []
    # and nothing else is pinned to a Ray group: both workers take the rest
    assert [i.nodeid for i in items if _group(i) in set(RAY_GROUPS.values()) and i not in ray] == []


def test_ray_fixtures_are_the_ones_that_start_ray():
    """Every fixture named in RAY_FIXTURES exists (a renamed fixture would silently drop its tests from the group)."""
    import tests.infra.test_cluster_join as join
    import tests.infra.test_ray_job as job
    import tests.conftest as conftest

    defined = {name for module in (conftest, join, job) for name in vars(module)}
    assert RAY_FIXTURES <= defined
