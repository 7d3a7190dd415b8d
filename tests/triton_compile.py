"""Compiles one of the project's Triton kernels for sm_90 (Hopper) without a GPU and prints what
its PTX holds. Run as a script, outside Triton's interpreter (the tests set TRITON_INTERPRET):

    python tests/triton_compile.py '{"module": ..., "kernel": ..., "types": [...], "constexprs": {...},
                                     "aligned": [...], "num_warps": 4, "num_stages": 3}'

`types` are the runtime arguments' Triton types in order; `aligned` names those a launch on the GPU
marks divisible by 16 (pointers, sizes, strides), which decides vector loads and async copies."""
import importlib
import json
import os
import re
import subprocess
import sys


def compile_for_hopper(spec):
    """(in a pytest process) the PTX summary of compiling `spec`, from a clean subprocess."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, __file__, json.dumps(spec)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(spec):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    names = fn.arg_names
    signature = dict(zip(names, spec["types"] + ["constexpr"] * (len(names) - len(spec["types"]))))
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in spec["aligned"]}
    source = ASTSource(fn=fn, signature=signature, constexprs=spec["constexprs"], attrs=attrs)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
    ptx = kernel.asm["ptx"]
    print(json.dumps({"wgmma": sorted(set(re.findall(r"wgmma\.mma_async\.[\w.]+", ptx))),
                      "mma_sync": ptx.count("mma.sync"), "cp_async": ptx.count("cp.async.cg"),
                      "tma_loads": ptx.count("cp.async.bulk.tensor"),
                      # (cache qualifiers such as L1::evict_first sit between ld.global and .v4)
                      "vector_loads": len(re.findall(r"ld\.global[\w.:]*\.v4", ptx)),
                      "vector_stores": len(re.findall(r"st\.global[\w.:]*\.v4", ptx)),
                      "byte_stores": len(re.findall(r"st\.global(?:\.[a-z]+)*\.b8", ptx))}))


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    main(json.loads(sys.argv[1]))
