"""Shared fixtures: every test that takes ``backend`` runs once per available backend."""

from __future__ import annotations

import pytest

from crossent import dispatch


@pytest.fixture(params=dispatch.available())
def backend(request: pytest.FixtureRequest) -> str:
    return request.param
