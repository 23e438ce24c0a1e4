"""Turns the PTX seed of scripts/cuda-preflight.sh into sm_90a machine code (issue 6).

CubeCL's compilation cache keeps each CUDA kernel as the PTX that NVRTC wrote, and hands those
bytes to the driver's `cuModuleLoadData`, which JIT-compiles PTX to machine code on every load
(about 0.05-0.1 s a kernel, some 750 kernels in the device run). `cuModuleLoadData` takes a cubin
as well, so this script compiles each entry's PTX to an sm_90a cubin with nvJitLink (the compiler
the driver uses) and writes the same entries with the cubin in place of the PTX. The device then
loads them without compiling anything. An sm_90a cubin runs on compute capability 9.0 only (H100,
H200), and on a driver at least as new as the nvJitLink that made it; scripts/gpu-bench.sh checks
both, and loads PROBE on the card before it uses the seed.

    python cubin_seed.py PTX_DB CUBIN_DB PROBE NVJITLINK_LIB

PTX_DB: the SQLite database with CubeCL's `cuda/*/ptx_sm90` and `cuda-second-line/*/ptx_sm90`
entries; CUBIN_DB: written anew, the same entries with cubins; PROBE: one of the cubins as a
plain file; NVJITLINK_LIB: path to libnvJitLink.so. Needs `cbor2` (CubeCL's entries are CBOR).
"""

import ctypes
import os
import sqlite3
import sys
import time

import cbor2

NVJITLINK_INPUT_PTX = 2


def compile_cubin(nvjitlink, ptx: bytes, name: str) -> bytes:
    """sm_90a machine code for one module's PTX, as the driver's JIT would make it."""
    handle = ctypes.c_void_p()
    options = (ctypes.c_char_p * 1)(b"-arch=sm_90a")
    if nvjitlink.nvJitLinkCreate(ctypes.byref(handle), 1, options) != 0:
        sys.exit("cubin_seed: nvJitLinkCreate failed")
    source = ptx.rstrip(b"\0") + b"\0"
    if (nvjitlink.nvJitLinkAddData(handle, NVJITLINK_INPUT_PTX, source, len(source), b"kernel") != 0
            or nvjitlink.nvJitLinkComplete(handle) != 0):
        size = ctypes.c_size_t()
        nvjitlink.nvJitLinkGetErrorLogSize(handle, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value + 1)
        nvjitlink.nvJitLinkGetErrorLog(handle, log)
        sys.exit(f"cubin_seed: the PTX of {name} does not compile for sm_90a: {log.value.decode(errors='replace')}")
    size = ctypes.c_size_t()
    nvjitlink.nvJitLinkGetLinkedCubinSize(handle, ctypes.byref(size))
    cubin = ctypes.create_string_buffer(size.value)
    nvjitlink.nvJitLinkGetLinkedCubin(handle, cubin)
    nvjitlink.nvJitLinkDestroy(ctypes.byref(handle))
    return cubin.raw


def main() -> None:
    ptx_db, cubin_db, probe, library = sys.argv[1:5]
    nvjitlink = ctypes.CDLL(library)
    if os.path.exists(cubin_db):
        os.remove(cubin_db)
    db = sqlite3.connect(cubin_db)
    db.execute("attach database ? as ptx", (ptx_db,))
    db.execute("create table meta as select * from ptx.meta")
    db.execute(db.execute("select sql from ptx.sqlite_master where name = 'entries'").fetchone()[0])
    db.execute("insert into entries select * from ptx.entries where namespace like 'cuda-second-line/%/ptx_sm90'")
    rows = db.execute("select namespace, key, value, origin from ptx.entries where namespace like 'cuda/%/ptx_sm90'").fetchall()
    started, ptx_bytes, cubin_bytes = time.time(), 0, 0
    for i, (namespace, key, value, origin) in enumerate(rows):
        entry = cbor2.loads(value)
        # `ptx` is a Vec<c_char>: signed bytes on x86-64, one CBOR integer each.
        ptx = bytes(b & 0xFF for b in entry["ptx"])
        cubin = compile_cubin(nvjitlink, ptx, entry["entrypoint_name"])
        if i == 0:
            with open(probe, "wb") as f:
                f.write(cubin)
        entry["ptx"] = [b - 256 if b > 127 else b for b in cubin]
        db.execute("insert into entries values (?, ?, ?, ?)", (namespace, key, cbor2.dumps(entry), origin))
        ptx_bytes, cubin_bytes = ptx_bytes + len(ptx), cubin_bytes + len(cubin)
    db.commit()
    db.execute("detach database ptx")
    db.execute("vacuum")
    db.close()
    print(f"cubin seed: {len(rows)} kernels compiled to sm_90a in {time.time() - started:.0f} s "
          f"(PTX {ptx_bytes / 2**20:.1f} MiB -> cubins {cubin_bytes / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
