"""cffi out-of-line API builder for pplx._native.

The cdef is the text of native/include/pplx_fabric.h between its CDEF markers, so the
header stays the single source of truth (STYLE.md, 9). Built by setup.py
(cffi_modules) or by hand: `python native/build_ffi.py` builds into the source tree.
"""

import glob
import os
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
HEADER = os.path.join(HERE, "include", "pplx_fabric.h")


def _cdef_text() -> str:
    with open(HEADER) as f:
        text = f.read()
    m = re.search(r"/\* CDEF BEGIN \*/(.*)/\* CDEF END \*/", text, re.S)
    if m is None:
        raise RuntimeError(f"{HEADER}: CDEF BEGIN/END markers not found")
    return m.group(1)


ffibuilder = FFI()
ffibuilder.cdef(_cdef_text())
ffibuilder.set_source(
    "pplx._native",
    '#include "pplx_fabric.h"',
    sources=sorted(os.path.relpath(p) for p in glob.glob(os.path.join(HERE, "src", "*.c"))),
    include_dirs=[os.path.relpath(os.path.join(HERE, "include"))],
    libraries=["fabric", "pthread"],
    extra_compile_args=[
        "-std=gnu11",
        "-O2",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-Wno-unused-parameter",
    ],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=os.path.dirname(HERE), verbose=True)
