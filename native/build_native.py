"""cffi build script for ``ave._native``, the compiled part of AVE.

setup.py names it in ``cffi_modules``, so the extension is compiled from the C files
here whenever the package is built; nothing prebuilt is shipped or loaded by path.
Each C file comes with a header whose declarations (minus preprocessor lines) are
what Python sees.
"""
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
PARTS = ['fdtx', 'spawn']  # fdtx: descriptor passing, prctl; spawn: ave.cmd's child


def _declarations(part: str) -> str:
    with open(os.path.join(HERE, f'{part}.h')) as header:
        return ''.join(line for line in header if not line.startswith('#'))


ffibuilder = FFI()
# cffi knows size_t and ssize_t but not pid_t: an integer type whose size the
# compiler fills in.
ffibuilder.cdef('typedef int... pid_t;\n' + ''.join(_declarations(part) for part in PARTS))
ffibuilder.set_source(
    'ave._native',
    ''.join(f'#include "{part}.h"\n' for part in PARTS),
    sources=[os.path.relpath(os.path.join(HERE, f'{part}.c')) for part in PARTS],
    include_dirs=[os.path.relpath(HERE)],
    extra_compile_args=['-Wall', '-Wextra', '-Werror', '-O2'],
)

if __name__ == '__main__':
    ffibuilder.compile(verbose=True)
