"""cffi out-of-line API builder for pplx._native.

The cdef is the text between the CDEF markers of each public header in native/include/
(pplx_fabric.h first, then the others by name), so the headers stay the single source of
truth (STYLE.md, 9). Built by setup.py
(cffi_modules) or by hand: `python native/build_ffi.py` builds into the source tree.
"""

import glob
import os
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
MAIN_HEADER = os.path.join(HERE, "include", "pplx_fabric.h")


def _headers() -> list[str]:
    others = sorted(glob.glob(os.path.join(HERE, "include", "*.h")))
    return [MAIN_HEADER] + [h for h in others if h != MAIN_HEADER]


def _cdef_text() -> str:
    parts = []
    for header in _headers():
        with open(header) as f:
            text = f.read()
        m = re.search(r"/\* CDEF BEGIN \*/(.*)/\* CDEF END \*/", text, re.S)
        if m is None:
            raise RuntimeError(f"{header}: CDEF BEGIN/END markers not found")
        parts.append(m.group(1))
    return "\n".join(parts)


ffibuilder = FFI()
ffibuilder.cdef(_cdef_text())
ffibuilder.set_source(
    "pplx._native",
    "\n".join(f'#include "{os.path.basename(h)}"' for h in _headers()),
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
