"""cffi build script for ``ave._native``, the compiled part of AVE.

setup.py names it in ``cffi_modules``, so the extension is compiled from native/fdtx.c
whenever the package is built; nothing prebuilt is shipped or loaded by path.
"""
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

ffibuilder = FFI()
with open(os.path.join(HERE, 'fdtx.h')) as header:
    ffibuilder.cdef(''.join(line for line in header if not line.startswith('#')))
ffibuilder.set_source(
    'ave._native',
    '#include "fdtx.h"',
    sources=[os.path.relpath(os.path.join(HERE, 'fdtx.c'))],
    include_dirs=[os.path.relpath(HERE)],
    extra_compile_args=['-Wall', '-Wextra', '-Werror', '-O2'],
)

if __name__ == '__main__':
    ffibuilder.compile(verbose=True)
