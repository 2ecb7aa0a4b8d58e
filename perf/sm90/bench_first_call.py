"""First-call latency of a reduced Mixtral layer: cold JIT vs a restarted process with a warm cache.

    python -m perf.sm90.bench_first_call [--tokens 1,64,1024,8192]

Each row is a fresh Python process (so nothing is cached in memory) that builds a reduced
Mixtral-8x7B layer (E=8, k=2, H=1024, I=3584, bf16) and times, for each token count in turn, the
first call of ``cute_moe.moe`` (route, plan, permute, GEMM1+SwiGLU, GEMM2, combine, synchronized),
which includes every JIT it triggers, then the steady-state time of that call. Runs:

- cold: empty ``CUTE_MOE_CACHE_DIR`` and empty CuTe DSL file cache (``CUTE_DSL_CACHE_DIR``);
- warm: a second process on the caches the cold run filled (GEMMs loaded from exported objects);
- dsl_cache_only: our GEMM disk cache switched off, the DSL's own file cache warm (NVRTC cached):
  what a restart cost before the exported-kernel cache;
- warmup_api: ``cute_moe.warmup(layer, tokens)`` timed in a process with empty caches, then the
  first calls.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

_T0 = time.perf_counter()


def child(tokens: list[int], use_warmup: bool, gemm_disk_cache: bool) -> dict:
    import torch

    import cute_moe
    from cute_moe.gemm import disk_cache, interface

    disk_cache.ENABLED = gemm_disk_cache
    import_s = time.perf_counter() - _T0
    torch.manual_seed(0)
    shape = cute_moe.MIXTRAL_8X7B.scaled(hidden=1024, intermediate=3584)
    layer = cute_moe.nn.MoE(shape.hidden, shape.intermediate, shape.num_experts, shape.top_k,
                            renormalize=True, device="cuda")
    torch.cuda.synchronize()
    warmup_s = 0.0
    if use_warmup:
        t0 = time.perf_counter()
        cute_moe.warmup(layer, tokens=tokens, progress=False)
        warmup_s = time.perf_counter() - t0
    first, steady = {}, {}
    profile_path = os.environ.get("CUTE_MOE_FIRST_CALL_PROFILE")
    for t in tokens:
        x = torch.randn(t, shape.hidden, device="cuda", dtype=torch.bfloat16)
        torch.cuda.synchronize()
        prof = None
        if profile_path and not first:
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        t0 = time.perf_counter()
        layer(x)
        torch.cuda.synchronize()
        first[t] = time.perf_counter() - t0
        if prof is not None:
            import pstats

            prof.disable()
            with open(profile_path, "w") as f:
                pstats.Stats(prof, stream=f).sort_stats("cumulative").print_stats(40)
        assert cute_moe.last_backend() == "cute"
        t0 = time.perf_counter()
        for _ in range(10):
            layer(x)
        torch.cuda.synchronize()
        steady[t] = (time.perf_counter() - t0) / 10
    return {"import_s": import_s, "warmup_s": warmup_s, "first_call_s": first, "steady_s": steady,
            "stats": dict(interface.COMPILE_STATS)}


def run(name: str, tokens: list[int], env: dict, *flags: str, profile_dir: str = "") -> dict:
    cmd = [sys.executable, "-m", "perf.sm90.bench_first_call", "--child", "--tokens", ",".join(map(str, tokens)),
           *flags]
    if profile_dir:
        env = {**env, "CUTE_MOE_FIRST_CALL_PROFILE": os.path.join(profile_dir, f"first_call_{name}.txt")}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    if done.returncode:
        sys.exit(f"{name} run failed:\n{done.stderr[-4000:]}")
    r = json.loads(done.stdout.strip().splitlines()[-1])
    row = {"run": name, "process_s": wall, "import_s": r["import_s"], "warmup_s": r["warmup_s"],
           "first_calls_s": sum(r["first_call_s"].values()),
           "gemm_compiled": r["stats"]["compiled"], "gemm_from_disk": r["stats"]["disk"]}
    for t in tokens:
        row[f"first_T{t}_s"] = r["first_call_s"][str(t)]
        row[f"steady_T{t}_ms"] = r["steady_s"][str(t)] * 1e3
    print(json.dumps(row), flush=True)
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1,64,1024,8192")
    ap.add_argument("--profile-dir", default="", help="write a cProfile of each run's first call here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--warmup", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-gemm-disk-cache", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    tokens = [int(t) for t in args.tokens.split(",") if t]
    if args.child:
        print(json.dumps(child(tokens, args.warmup, not args.no_gemm_disk_cache)))
        return
    from perf.common import write_results

    rows = []
    with tempfile.TemporaryDirectory() as d:
        env = {"CUTE_MOE_CACHE_DIR": os.path.join(d, "cute_moe"), "CUTE_DSL_CACHE_DIR": os.path.join(d, "dsl")}
        rows.append(run("cold", tokens, env, profile_dir=args.profile_dir))
        rows.append(run("warm", tokens, env, profile_dir=args.profile_dir))
        rows.append(run("dsl_cache_only", tokens, env, "--no-gemm-disk-cache", profile_dir=args.profile_dir))
    with tempfile.TemporaryDirectory() as d:
        env = {"CUTE_MOE_CACHE_DIR": os.path.join(d, "cute_moe"), "CUTE_DSL_CACHE_DIR": os.path.join(d, "dsl")}
        rows.append(run("warmup_api_cold", tokens, env, "--warmup", profile_dir=args.profile_dir))
        rows.append(run("warmup_api_warm", tokens, env, "--warmup", profile_dir=args.profile_dir))

    def plot(ax, rows):
        ax.bar([r["run"] for r in rows], [r["first_calls_s"] + r["warmup_s"] for r in rows], color="tab:orange")
        ax.set_ylabel("s (warmup + first calls)")
        ax.set_title(f"First-call latency, reduced Mixtral, T={args.tokens}")
        ax.tick_params(axis="x", labelsize=7)

    cols = ["run", "process_s", "import_s", "warmup_s", "first_calls_s", "gemm_compiled", "gemm_from_disk",
            *[f"first_T{t}_s" for t in tokens]]
    paths = write_results("sm90_first_call", rows, {"title": "First call: cold JIT vs warm disk cache (reduced Mixtral)",
                                                    "tokens": tokens}, md_columns=cols, plot=plot)
    print("\n".join(map(str, paths)))


if __name__ == "__main__":
    main()
