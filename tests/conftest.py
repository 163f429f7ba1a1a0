"""Fixtures shared by every test area.

Each test gets its own home directory, so nothing ever reads or writes the real
~/.ave or /etc/ave, and tests can run in any order.
"""
import pytest


@pytest.fixture
def home(tmp_path):
    """A private, empty AVE home directory for one test."""
    path = tmp_path / 'home'
    path.mkdir()
    return str(path)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Point HOME at a temp dir so code that falls back to ~ stays in the sandbox."""
    fake = tmp_path / 'fake-home'
    fake.mkdir()
    monkeypatch.setenv('HOME', str(fake))
    yield
