#!/usr/bin/env bash
# Installs what pplx needs on a fresh Debian/Ubuntu machine (as root), idempotently:
#   - apt: libfabric-dev (headers + libfabric.so), a C compiler, python3-venv
#   - a virtualenv at $VENV (default .venv) with torch, triton and pplx (editable, with dev extras)
# Used by `make demo` and `make test`; safe to run again (it skips what is present).
set -euo pipefail
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
# torch: on these machines `torch==2.13.0` is a CPU wheel on local disk; elsewhere override,
# e.g. TORCH_SPEC="torch" for whatever CUDA build pip picks.
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
# Triton for the CPU interpreter: 3.8 matches torch 2.13/2.14 (3.9 dropped make_block_ptr and
# rejects some masks in the interpreter; see DESIGN.md). CUDA torch wheels bring their own.
TRITON_SPEC=${TRITON_SPEC:-triton==3.8.0}

need_apt=()
[ -f /usr/include/rdma/fabric.h ] || need_apt+=(libfabric-dev)
command -v fi_info >/dev/null 2>&1 || need_apt+=(libfabric-bin)
command -v cc >/dev/null 2>&1 || need_apt+=(gcc)
command -v make >/dev/null 2>&1 || need_apt+=(make)
"$PYTHON" -c "import ensurepip, venv" >/dev/null 2>&1 || need_apt+=(python3-venv python3-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "[bootstrap] apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[bootstrap] creating virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip setuptools wheel cffi >/dev/null
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "[bootstrap] pip install $TORCH_SPEC"
  "$PY" -m pip install -q "$TORCH_SPEC"
fi
if ! "$PY" -c "import triton" >/dev/null 2>&1; then
  echo "[bootstrap] pip install $TRITON_SPEC"
  "$PY" -m pip install -q "$TRITON_SPEC"
fi
# (Re)install only when the extension is missing or older than its sources / metadata, or
# a dev tool is missing (editable install: Python edits need nothing).
so=$(ls pplx/_native*.so 2>/dev/null | head -n 1 || true)
if [ -z "$so" ] || [ -n "$(find native pyproject.toml setup.py -newer "$so" \( -name '*.c' -o -name '*.h' -o -name '*.py' -o -name '*.toml' \) 2>/dev/null | head -n 1)" ] \
   || ! "$PY" -c "import pplx._ffi, pytest, hypothesis, ruff, nbclient" >/dev/null 2>&1; then
  echo "[bootstrap] pip install -e .[dev] (builds the libfabric extension)"
  log=$(mktemp)
  if ! "$PY" -m pip install -q --no-build-isolation -e ".[dev]" >"$log" 2>&1; then
    cat "$log" >&2
    exit 1
  fi
  # setuptools' deprecation banners are noise here; anything else is shown.
  grep -v -e Warning -e '^\s*!!' -e '\*\*\*\*' -e '^\s*$' -e 'Location .* is ignored' \
    -e 'Please ' -e 'See https' -e 'By 20' -e 'corresp' -e 'with strategy' -e "return '" \
    -e 'name as your package' -e 'folders in your working' "$log" || true
  rm -f "$log"
fi
"$PY" -c "import pplx._ffi as f; print('[bootstrap] pplx native', f.lib.pplx_version(), 'libfabric', hex(f.lib.pplx_fabric_version()))"
