"""One-command device check: GPU tests, the program on 4 ranks sharing the GPU, benchmarks.

    python programs/gpu_check.py --json gpu_check.json   # on a GPU machine (< 8 minutes)
    python programs/gpu_check.py --device cpu            # the same steps on the CPU (dry run)
    python programs/gpu_check.py --device cpu --steps allreduce,decode   # what CI runs

Steps: (1) environment: GPU, MPI library, CUDA-awareness, which transport path runs;
(2) tests/test_gpu.py on 1 and 4 ranks; (3) programs/transformer.py with 4 ranks
(sharing one GPU round-robin) on both fixtures and the built-in model in several
layouts, each checked against the CPU float32 reference (tokens equal in float32;
bfloat16 runs within verify.logit_tolerance); (4) the ring all-reduce beside MPI's
Allreduce on the same device buffers, 4 ranks, busbw; (5) the decode benchmark
(programs/bench_gpu_decode.py): ms per output token and fraction of the HBM roofline for
the Qwen3-0.6B, Qwen3-8B and Qwen3-30B-A3B shapes in bfloat16, batch 1 and 64, on 1
rank and on 4 ranks sharing the GPU (tiny float32 shapes with --device cpu). Ends with
one table; exit status non-zero if any step failed.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

import mpipar  # noqa: E402

mpipar.pin_threads()  # one BLAS thread per rank, before numpy and MPI load
from mpipar.launch import clean_env, run_mpi  # noqa: E402

FIXTURES = os.environ.get("MPIPAR_FIXTURES", os.path.join(ROOT, "tests", "fixtures"))
LAYOUTS = ["--tp 4", "--tp 2 --pp 2 --prefill-chunks 3", "--tp 2 --dp 2 --ep 4",
           "--pp 4 --prefill-chunks 4"]
BF16_RUNS = [("qwen3-tiny", "--tp 4 --dtype bfloat16"),
             ("qwen3-moe-tiny", "--tp 2 --dp 2 --ep 4 --dtype bfloat16"),
             (None, "--tp 2 --pp 2 --prefill-chunks 3 --dtype bfloat16")]
STEPS = ("tests", "layouts", "allreduce", "decode")
DECODE_PRESETS = ("qwen3-0.6b", "qwen3-8b", "qwen3-30b-a3b")


def environment(device):
    code = ("import mpipar, json; from mpipar import backend; from mpi4py import MPI; "
            "out = {'mpi': MPI.Get_library_version().splitlines()[0].strip(), "
            "'cuda_aware': backend.cuda_aware()}\n"
            "cp = backend._cupy()\n"
            "if cp is not None:\n"
            "    p = cp.cuda.runtime.getDeviceProperties(0)\n"
            "    out['gpu'] = p['name'].decode(); out['gpus'] = cp.cuda.runtime.getDeviceCount()\n"
            "print(json.dumps(out))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    info = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {}
    info["path"] = ("cpu" if device == "cpu" else
                    "cuda-aware" if info.get("cuda_aware") else "host staging")
    return info


def step(rows, name, fn):
    t = time.monotonic()
    try:
        ok, detail = fn()
    except Exception as e:  # a step's failure is reported, the others still run
        ok, detail = False, f"{type(e).__name__}: {e}"
    rows.append((name, "pass" if ok else "FAIL", f"{time.monotonic() - t:.0f}s", detail))
    print(f"[{rows[-1][1]}] {name}: {detail}", flush=True)


def pytest_step(n, env, device):
    proc = run_mpi(n, ["-m", "pytest", "-q", "-rs", os.path.join(ROOT, "tests", "test_gpu.py")],
                   timeout=300, env=env, cwd=ROOT)
    tail = [line for line in proc.stdout.splitlines() if " passed" in line or "skipped" in line]
    ran = any(" passed" in line for line in tail)  # on a GPU, all-skipped is a failure
    ok = proc.returncode == 0 and (ran or device == "cpu")
    return ok, (tail[-1] if tail else proc.stdout[-300:] + proc.stderr[-300:])


def program(n, args, env, timeout=180):
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        proc = run_mpi(n, [os.path.join(ROOT, "programs", "transformer.py"), *args, "--quiet",
                           "--json", f.name], timeout=timeout, env=env, cwd=ROOT)
        if proc.returncode != 0:
            return None, (proc.stdout[-400:] + proc.stderr[-400:]).strip()
        return json.load(open(f.name)), ""


def layouts_step(env):
    results = []
    for model in ("qwen3-tiny", "qwen3-moe-tiny", None):
        args = ["--model", os.path.join(FIXTURES, model)] if model else []
        for lay in LAYOUTS:
            if model == "qwen3-tiny" and "--ep" in lay:
                continue
            rec, err = program(4, [*args, *lay.split(), "--check"], env)
            results.append((model or "builtin", lay, rec["check"] if rec else f"error {err}"))
    for model, lay in BF16_RUNS:
        args = ["--model", os.path.join(FIXTURES, model)] if model else []
        rec, err = program(4, [*args, *lay.split(), "--check"], env)
        results.append((model or "builtin", lay, rec["check"] if rec else f"error {err}"))
    bad = [r for r in results if not r[2].startswith("pass")]
    return not bad, f"{len(results) - len(bad)}/{len(results)} runs pass" + (
        f"; failed: {bad}" if bad else "")


def allreduce_step(env, device, table, path):
    """Ring vs MPI Allreduce on the same (device) buffers, 4 ranks sharing the GPU."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        args = [os.path.join(ROOT, "programs", "bench_allreduce.py"), "--json", f.name,
                "--max-size", str(64 << 20 if device == "gpu" else 1 << 20), "--device", device]
        proc = run_mpi(4, args, timeout=200, env=env, cwd=ROOT)
        if proc.returncode != 0:
            return False, (proc.stdout[-300:] + proc.stderr[-300:]).strip()
        recs = json.load(open(f.name))
    big = [r for r in recs if r["size_bytes"] == max(x["size_bytes"] for x in recs)]
    for r in big:
        table[f"all-reduce busbw, {r['method']}, 4 ranks, {r['size_bytes'] >> 20} MiB, "
              f"{path}"] = f"{r['busbw_gbs']:.2f} GB/s"
    return True, f"{path}: " + ", ".join(f"{r['method']} {r['busbw_gbs']:.2f} GB/s" for r in big)


def decode_step(env, device, table):
    """programs/bench_gpu_decode.py, one job per preset (a slow one loses only its rows)."""
    presets = DECODE_PRESETS if device == "gpu" else ("tiny-dense", "tiny-moe")
    done, failed = 0, []
    for preset in presets:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            proc = subprocess.run([sys.executable, os.path.join(ROOT, "programs",
                                                                "bench_gpu_decode.py"),
                                   "--device", device, "--presets", preset, "--json", f.name,
                                   "--timeout", "280"],
                                  capture_output=True, text=True, timeout=300,
                                  env=clean_env(env), cwd=ROOT)
            if proc.returncode != 0:
                failed.append(f"{preset}: {(proc.stdout[-300:] + proc.stderr[-300:]).strip()}")
                continue
            rows = json.load(open(f.name))
        for r in rows:
            table[f"decode {r['preset']} {r['dtype']}, {r['ranks']} rank(s) {r['layout']}, "
                  f"batch {r['batch']}"] = (f"{r['ms_per_token']:.2f} ms/token, "
                                            f"{100 * r['roofline_fraction']:.1f}% of roofline "
                                            f"({r['weight_gb_per_step']:.3f} GB/step at "
                                            f"{r['copy_gbs']:.0f} GB/s)")
            done += 1
    return not failed, f"{done} configurations" + (f"; failed: {failed}" if failed else "")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    p.add_argument("--json", help="write the summary here")
    p.add_argument("--steps", default=",".join(STEPS),
                   help=f"comma-separated subset of {','.join(STEPS)}")
    args = p.parse_args()
    steps = args.steps.split(",")
    if set(steps) - set(STEPS):
        p.error(f"--steps: unknown {sorted(set(steps) - set(STEPS))}")
    env = {"MPIPAR_DEVICE": args.device, "MPIPAR_FIXTURES": FIXTURES}
    info = environment(args.device)
    table = {"device": info.get("gpu", "cpu"), "MPI": info.get("mpi", "?"),
             "transport path": info["path"]}
    print(json.dumps(info), flush=True)
    rows = []
    if "tests" in steps:
        step(rows, "GPU unit tests, 1 rank", lambda: pytest_step(1, env, args.device))
        step(rows, "GPU unit tests, 4 ranks", lambda: pytest_step(4, env, args.device))
    if "layouts" in steps:
        step(rows, "transformer.py layouts, 4 ranks", lambda: layouts_step(env))
    if "allreduce" in steps:
        step(rows, "all-reduce ring vs MPI", lambda: allreduce_step(env, args.device, table,
                                                                     info["path"]))
    if "decode" in steps:
        step(rows, "decode benchmark", lambda: decode_step(env, args.device, table))
    print("\n| step | result | time | detail |\n| --- | --- | --- | --- |")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print("\n| fact | value |\n| --- | --- |")
    for k, v in table.items():
        print(f"| {k} | {v} |")
    if args.json:
        json.dump({"steps": rows, "facts": table}, open(args.json, "w"), indent=1)
    sys.exit(0 if all(r[1] == "pass" for r in rows) else 1)


if __name__ == "__main__":
    main()
