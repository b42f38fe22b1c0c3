"""The extension builds and loads, and links the libfabric it was built against."""

import pplx._ffi as ffi


def test_native_loads_and_reports_libfabric_version():
    major = ffi.lib.pplx_fabric_version() >> 16
    minor = ffi.lib.pplx_fabric_version() & 0xFFFF
    # DESIGN.md: libfabric >= 1.17 is required.
    assert (major, minor) >= (1, 17), (major, minor)
    assert ffi.lib.pplx_version() > 0
