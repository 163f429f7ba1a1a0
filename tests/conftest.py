"""Fixtures shared by every test area.

Each test gets its own home directory, so nothing ever reads or writes the real
~/.ave or /etc/ave, and tests can run in any order.
"""
import os
from pathlib import Path

import pytest

from support import DATA, HANDSET_SERIAL


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


@pytest.fixture
def adb(tmp_path, monkeypatch):
    """The stand-in adb (tests/data/bin) first on PATH; ``adb(serial, state, boot)``
    makes a handset it answers for, and returns that handset's directory."""
    root = tmp_path / 'adb'
    root.mkdir()
    monkeypatch.setenv('AVE_TEST_ADB', str(root))
    monkeypatch.setenv('PATH', f'{DATA / "bin"}{os.pathsep}{os.environ["PATH"]}')

    def handset(serial: str = HANDSET_SERIAL, state: str = 'device',
                boot_completed: str = '1') -> Path:
        directory = root / serial
        (directory / 'fs').mkdir(parents=True, exist_ok=True)
        (directory / 'state').write_text(state + '\n')
        (directory / 'boot_completed').write_text(boot_completed + '\n')
        return directory
    return handset
