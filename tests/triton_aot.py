"""The triton backend's kernels compiled ahead of time for an H100 (sm_90a), no GPU needed: every
kernel in the tile layout the backend picks (``_common.tile``) for a range of vocabularies, with
its options off and all on, each compiled by Triton and assembled by the ``ptxas`` Triton ships;
a kernel that spills registers to local memory (slow) is a failure, and so is a loop
kernel whose blocks do not load whole 16-byte vectors from rows of any alignment.

``python triton_aot.py`` runs the whole matrix; ``python triton_aot.py quick`` a subset (what
the test suite runs). Prints one line per kernel (registers, spill bytes) and exits 1 on any
spill or compile error.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from typing import Any

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default, without its warning
os.environ["TRITON_INTERPRET"] = "0"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from crossent.backends.triton import _ce, _common, _partial, _softmax  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
ALL = {"HAS_W": True, "SMOOTH": True, "ZLOSS": True, "SOFTCAP": True, "TEMP": True}
PLAIN = {"HAS_W": False, "SMOOTH": False, "ZLOSS": False, "SOFTCAP": False, "TEMP": False}
FLOATS = ("eps_b", "z_b", "cap_b", "temp_b", "ignore_index", "start", "total")


def ptxas() -> str:
    """The newest ``ptxas`` in Triton's wheel (the one that reads the PTX version it emits)."""
    for name in ("ptxas-blackwell", "ptxas"):
        path = os.path.join(BIN, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"no ptxas under {BIN}")


def compile_spills(fn: Any, ptrs: dict[str, str], consts: dict[str, Any], warps: int
                   ) -> tuple[int, int]:  # fmt: skip
    """``(registers, spill-store bytes)`` of ``fn`` compiled for sm_90a."""
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "i64" if n in FLOATS else "i32")
           for n in fn.arg_names}  # fmt: skip
    kernel = triton.compile(ASTSource(fn, sig, consts), target=TARGET,
                            options={"num_warps": warps})  # fmt: skip
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(kernel.asm["ptx"])
    try:
        done = subprocess.run([ptxas(), "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                              capture_output=True, text=True, check=True)  # fmt: skip
    finally:
        os.unlink(f.name)
    text = done.stdout + done.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores", text)
    assert regs and spill, text
    return int(regs.group(1)), int(spill.group(1))


def cases(quick: bool) -> list[tuple[str, Any, dict[str, str], dict[str, Any], int]]:
    """``(label, kernel, pointer types, constexprs, warps)`` for every kernel, layout, dtype
    and option set of the matrix."""
    vocabs = [1000, 8192, 32000] if quick else [5, 10, 33, 100, 200, 1000, 4099, 8192, 16384,
                                                  32000]  # fmt: skip
    dtypes = ["bf16"] if quick else ["bf16", "fp32"]
    out = []
    for v in vocabs:
        for dt in dtypes:
            size = 2 if dt == "bf16" else 4
            acc = {"ACC": tl.float32, "DEPTH": 4}
            for opts in (PLAIN, ALL):
                tag = "all" if opts is ALL else "plain"
                rows, block, one, warps = _common.tile(v, size)
                grad = {"WANT_GRAD": True, "HAS_SCALE": True, "ROW_SCALE": False}
                layout = {"ROWS": rows, "BLOCK": block, "ONE_TILE": one}
                ptrs = {"X": f"*{dt}", "T": "*i64", "W": "*fp32", "WSUM": "*fp32",
                        "GRAD": f"*{dt}", "SCALE": "*fp32", "LOSS": "*fp32", "LSE": "*fp32",
                        "TG": f"*{dt}", "PARTS": "*fp64", "COEF": "*fp64"}  # fmt: skip
                if one:
                    out.append((f"index V={v} {dt} {tag}", _ce.ce_index_kernel, ptrs,
                                {**opts, **grad, **acc, "ROWS": rows, "BLOCK": block},
                                warps))  # fmt: skip
                else:
                    out.append((f"index V={v} {dt} {tag}", _ce.ce_index_loop_kernel, ptrs,
                                {**opts, **grad, **acc, "BLOCK": block, "ALIGN": 16 // size},
                                warps))  # fmt: skip
                out.append((f"prob V={v} {dt} {tag}", _ce.ce_prob_kernel, ptrs,
                            {**opts, **grad, **acc, **layout}, warps))  # fmt: skip
                if quick:
                    continue
                loop = {"ROWS": rows, "BLOCK": block}
                no_z = {k: opts[k] for k in ("HAS_W", "SMOOTH", "SOFTCAP", "TEMP")}
                part_ptrs = {**ptrs, "LSE": "*fp64"}
                out.append((f"partial V={v} {dt} {tag}", _partial.ce_partial_kernel, ptrs,
                            {**no_z, **acc, **loop}, warps))  # fmt: skip
                out.append((f"partial grad V={v} {dt} {tag}", _partial.ce_partial_grad_kernel,
                            part_ptrs, {**no_z, **acc, **loop, "HAS_SCALE": True,
                                        "ROW_SCALE": True}, warps))  # fmt: skip
            for log in (False, True):
                rows, block, one, warps = _common.tile(v, size, softmax=True)
                sm = {"LOG": log, "ACC": tl.float32, "ROWS": rows, "BLOCK": block,
                      "ONE_TILE": one}  # fmt: skip
                name = "log_softmax" if log else "softmax"
                out.append((f"{name} V={v} {dt}", _softmax.softmax_kernel,
                            {"X": f"*{dt}", "Y": f"*{dt}"}, sm, warps))  # fmt: skip
                out.append((f"{name} backward V={v} {dt}", _softmax.softmax_backward_kernel,
                            {"G": f"*{dt}", "Y": f"*{dt}", "DX": f"*{dt}"}, sm, warps))  # fmt: skip
    return out


def vector_loads() -> tuple[bool, str]:
    """Whether the loop kernel's body loads and stores 16-byte vectors on rows whose stride and
    length are not multiples of 16 (50257 classes): ``(ok, counts)``."""
    fn = _ce.ce_index_loop_kernel
    names = list(fn.arg_names)
    ptrs = {"X": "*bf16", "T": "*i64", "W": "*fp32", "WSUM": "*fp32", "GRAD": "*bf16",
            "SCALE": "*fp32", "LOSS": "*fp32", "LSE": "*fp32"}  # fmt: skip
    consts = {**PLAIN, "WANT_GRAD": True, "HAS_SCALE": True, "ROW_SCALE": False,
              "ACC": tl.float32, "DEPTH": 4, "BLOCK": 8192, "ALIGN": 8}  # fmt: skip
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "i64" if n in FLOATS else "i32")
           for n in names}  # fmt: skip
    # the pointers 16-byte aligned (as torch allocates), nothing known of strides or sizes
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in ptrs}
    kernel = triton.compile(ASTSource(fn, sig, consts, attrs), target=TARGET,
                            options={"num_warps": 16})  # fmt: skip
    ptx = kernel.asm["ptx"]
    loads, stores = ptx.count("ld.global.v4"), ptx.count("st.global.v4")
    return loads > 0 and stores > 0, f"{loads} vector loads, {stores} vector stores"


def main(quick: bool) -> int:
    failures = 0
    ok, counts = vector_loads()
    failures += not ok
    print(f"{'PASS' if ok else 'FAIL'} loop kernel on rows of 50257 bfloat16: {counts}")
    for label, fn, ptrs, consts, warps in cases(quick):
        try:
            regs, spill = compile_spills(fn, ptrs, consts, warps)
        except Exception as exc:  # a compile error is a failure of its own line
            failures += 1
            print(f"FAIL {label}: {type(exc).__name__}: {str(exc)[:300]}")
            continue
        ok = spill == 0
        failures += not ok
        print(f"{'PASS' if ok else 'FAIL'} {label}: {warps} warps, {regs} registers, "
              f"{spill} bytes spilled")  # fmt: skip
    print(f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(len(sys.argv) > 1 and sys.argv[1] == "quick"))
