"""Session cache of real training runs on CPU ranks (see dist_jobs.py)."""

from __future__ import annotations

import pytest
from dist_jobs import Runs


@pytest.fixture(scope="session")
def runs(tmp_path_factory, prepared_data) -> Runs:
    return Runs(tmp_path_factory.mktemp("dist_runs"), prepared_data.overrides)
