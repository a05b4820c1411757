"""tests/conftest.py marks what a test uses, and that marking decides how the suite runs: the fast lane leaves out
`ray`, `s3` and `subprocess` tests, and under `-n 2 --dist loadgroup` every `ray` test runs on one worker. A test
that starts Ray without its mark would run beside the session cluster on the other worker, or in the fast lane."""

from __future__ import annotations

import pytest

from tests.conftest import RAY_FIXTURES


def _group(item: pytest.Item) -> str | None:
    mark = item.get_closest_marker("xdist_group")
    return (mark.args[0] if mark.args else mark.kwargs.get("name")) if mark else None


def test_every_test_that_starts_ray_is_marked_and_grouped(request):
    items = request.session.items  # what this run collected and selected (all of it in CI)
    ray = [item for item in items if RAY_FIXTURES & set(getattr(item, "fixturenames", ()))]
    if not ray:
        pytest.skip("no test of this run starts Ray (a single file, or the fast lane)")
    assert [i.nodeid for i in ray if i.get_closest_marker("ray") is None or _group(i) != "ray"] == []
    # and nothing else is pinned to the Ray worker: the other worker takes the rest
    assert [i.nodeid for i in items if _group(i) == "ray" and i not in ray] == []


def test_ray_fixtures_are_the_ones_that_start_ray():
    """Every fixture named in RAY_FIXTURES exists (a renamed fixture would silently drop its tests from the group)."""
    import tests.infra.test_cluster_join as join
    import tests.infra.test_ray_job as job
    import tests.conftest as conftest

    defined = {name for module in (conftest, join, job) for name in vars(module)}
    assert RAY_FIXTURES <= defined
