"""Peak memory is bounded by chunk size x threads + cache, not by the mosaic's size."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from tilefuse import fuse
    from tilefuse.allocator import retain_freed_memory
    from tilefuse.ngff import read_ome_zarr_level, write_ome_zarr
    from tilefuse.testing import PatternSource, pattern_layout

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    retain_freed_memory()  # as the CLI does: freed blocks are reused, never added
    from tilefuse.kernel import resolve_backend
    if resolve_backend() == "numba":  # numba + LLVM (~140 MiB) load once: an import, not data
        from tilefuse.fastkernel import warm_up
        warm_up()
    side = int(sys.argv[2])
    layout = pattern_layout((side, side), tile=512)
    arr = fuse(layout, chunk=512, cache_bytes=32 * 2**20)
    base = status("VmRSS")
    write_ome_zarr(arr, sys.argv[1], axes=("y", "x"), levels=2,
                   compute_kwargs={"scheduler": "threads", "num_workers": 2})
    peak = status("VmHWM")
    stored = read_ome_zarr_level(sys.argv[1], 0)
    window = np.asarray(stored[5000:5100, 3000:3100])
    expect = PatternSource((5000, 3000), (100, 100)).read()[0]
    print(json.dumps({"base": base, "peak": peak, "mosaic": int(arr.nbytes),
                      "exact": bool(np.array_equal(window, expect))}))
    """
)


def _fuse_in_child(out, side: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(out), str(side)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["exact"]
    result["growth"] = result["peak"] - result["base"]
    return result


def test_peak_memory_does_not_grow_with_the_mosaic(tmp_path):
    from tilefuse.info import estimate_peak_bytes

    small = _fuse_in_child(tmp_path / "small.ome.zarr", 12)
    big = _fuse_in_child(tmp_path / "big.ome.zarr", 28)
    print(f"peak RSS growth: {small['growth'] / 2**20:.0f} MiB for a "
          f"{small['mosaic'] / 2**20:.0f} MiB mosaic, {big['growth'] / 2**20:.0f} MiB for "
          f"{big['mosaic'] / 2**20:.0f} MiB")
    assert big["mosaic"] > 5 * small["mosaic"] and big["mosaic"] > 300 * 2**20
    # 5x the pixels, (nearly) the same memory: a few chunks per thread and the tile cache
    assert big["growth"] < 1.25 * small["growth"] + 24 * 2**20
    budget = estimate_peak_bytes(512 * 512, 1, 2, threads=2, cache_bytes=32 * 2**20)
    assert big["growth"] < budget
    assert big["growth"] < big["mosaic"] / 2
