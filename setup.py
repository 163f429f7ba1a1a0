"""Packaging for AVE.

The FdTx extension is compiled from native/fdtx.c by cffi while the package is built,
so every install (pip, editable, Debian) carries a native module made for its host.
"""
from setuptools import find_packages, setup

setup(
    name='ave',
    version='0.1.0',
    description='Control plane of device test labs: broker, sessions and equipment',
    packages=find_packages(include=['ave', 'ave.*']),
    python_requires='>=3.11',
    setup_requires=['cffi>=1.15'],
    # h11 parses HTTP and prometheus_client renders the metrics of the broker's
    # status page (ave.broker.http); both are in Debian as python3-*.
    install_requires=['psutil', 'pyudev', 'pexpect', 'cffi>=1.15', 'h11>=0.14',
                      'prometheus_client>=0.16'],
    package_data={'ave.broker.http': ['page/*.html', 'page/*.js', 'page/*.css'],
                  'ave': ['py.typed', '_native.pyi']},
    # mypy checks the type hints in `make test`, as part of the test suite.
    extras_require={'test': ['pytest', 'pytest-timeout', 'mypy', 'types-psutil']},
    cffi_modules=['native/build_native.py:ffibuilder'],
    entry_points={
        'console_scripts': [
            'ave-config = ave.config_cli:main',
            'ave-broker = ave.broker.cli:main',
            'ave = ave.cli.main:main',
        ],
        # Loaded by every pytest run in an environment where AVE is installed; it
        # adds options, a marker and fixtures, and does nothing for a test that
        # uses none of them.
        'pytest11': [
            'ave = ave.pytest_plugin',
        ],
        # The built-in equipment registers exactly as a lab's own plug-in would.
        'ave.equipment': [
            'workspace = ave.equipment.workspace:WORKSPACE',
            'relay = ave.equipment.relay:RELAY',
            'handset = ave.equipment.handset:HANDSET',
            'serial = ave.equipment.serial:SERIAL',
        ],
    },
)
