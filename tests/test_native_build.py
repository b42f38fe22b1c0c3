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


def test_c_api_under_address_sanitizer(tmp_path):
    """native/src/*.c plus tests/fabric/native_smoke.c, compiled with ASan and UBSan, on shm
    and tcp: no memory error, no leak, and the data checks inside pass."""
    import os
    import shutil
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    srcs = sorted(
        os.path.join(root, "native", "src", f)
        for f in os.listdir(os.path.join(root, "native", "src"))
        if f.endswith(".c")
    )
    exe = str(tmp_path / "native_smoke")
    flags = ["-std=gnu11", "-g", "-O1", "-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
    build = subprocess.run(
        [
            cc,
            *flags,
            "-I",
            os.path.join(root, "native", "include"),
            os.path.join(root, "tests", "fabric", "native_smoke.c"),
            *srcs,
            "-lfabric",
            "-lpthread",
            "-o",
            exe,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if build.returncode != 0 and "asan" in build.stderr.lower():
        pytest.skip(f"this compiler has no AddressSanitizer runtime: {build.stderr[-300:]}")
    assert build.returncode == 0, build.stderr
    env = dict(os.environ, IPATH_NO_BACKTRACE="1", UBSAN_OPTIONS="halt_on_error=1")
    for provider in ("shm", "tcp"):
        run = subprocess.run([exe, provider], capture_output=True, text=True, timeout=120, env=env)
        assert run.returncode == 0 and run.stdout.strip().endswith("OK"), (
            provider,
            run.stdout[-2000:],
            run.stderr[-4000:],
        )
