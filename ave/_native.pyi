# Type information for the cffi extension built from native/*.c (native/build_native.py).
# cffi's objects are dynamic: the C functions and constants are typed by the C headers.
from typing import Any

ffi: Any
lib: Any
