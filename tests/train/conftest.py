"""Fixtures of the in-process training tests."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="module")
def restore_env():
    """The trainer gives this process the env of a world of one; leave os.environ as we found it."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
