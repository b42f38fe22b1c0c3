"""The extension builds and loads, links the libfabric it was built against, and every status
code of the C API maps to its own exception class in `pplx._ffi.check`."""

import pytest

import pplx._ffi as ffi


def test_native_loads_and_reports_libfabric_version():
    major = ffi.lib.pplx_fabric_version() >> 16
    minor = ffi.lib.pplx_fabric_version() & 0xFFFF
    # DESIGN.md: libfabric >= 1.17 is required.
    assert (major, minor) >= (1, 17), (major, minor)
    assert ffi.lib.pplx_version() > 0


def test_every_status_code_has_a_name_and_an_exception():
    codes = {name: getattr(ffi.lib, name) for name in dir(ffi.lib) if name.startswith("PPLX_ERR_")}
    assert len(codes) >= 10, codes
    classes = set()
    for name, rc in codes.items():
        assert rc < 0, name
        text = ffi.strerror(rc)
        assert text and "Unknown" not in text, (name, text)
        with pytest.raises(ffi.FabricError) as info:
            ffi.check(rc, "probe")
        assert info.value.code == rc
        assert str(info.value).startswith(f"probe: {text}"), str(info.value)
        classes.add(type(info.value))
    assert len(classes) == len(codes), "two status codes share an exception class"
    # libfabric's own codes fall back to the base class with libfabric's text.
    with pytest.raises(ffi.FabricError, match="Resource temporarily unavailable"):
        ffi.check(-11)
    assert ffi.check(0) == 0 and ffi.check(7) == 7
