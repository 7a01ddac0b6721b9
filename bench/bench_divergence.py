#!/usr/bin/env python3
"""Benchmark kdops.kd_loss (DESIGN.md section 3.1) against plain PyTorch.

Providers (all compute the same loss: reduction "mean", t2_scale False, arithmetic in float32):

  kdops    kdops.kd_loss(student, teacher, divergence=..., temperature=...)
  eager    the formula in plain PyTorch eager float32 (see ``eager_loss`` below)
  compile  torch.compile of that same eager function (compiled and warmed up before timing; the
           first call, compilation included, is reported separately as first_call_s)

Passes:

  fwd      loss only; nothing requires grad (evaluation: no gradient is computed or stored)
  fwd_bwd  loss + loss.backward(); the student requires grad, the teacher is detached

Every provider runs in its own worker process (this script re-invoked with
``--worker PROVIDER SHAPES``), one per provider and shape, so that peak memory, allocator state and
torch.compile caches of one provider never leak into another. Memory is reported as the peak with
the inputs included (inputs + what the call allocates at most), and as a ratio to
"inputs + one gradient buffer" (the student and teacher logits plus one student-sized gradient;
for the fwd pass the gradient term is 0, so the ratio is peak / inputs). The kdops target
(DESIGN.md section 2, fused gradient) is a ratio of at most 1.1 for fkl fwd_bwd at 4096x32000 fp32.

Examples:
  python bench/bench_divergence.py                       # full CPU run (about 10 min on 2 cores)
  python bench/bench_divergence.py --quick               # CI smoke test, seconds
  python bench/bench_divergence.py --device cuda         # GPU: CUDA events, max_memory_allocated
  python bench/bench_divergence.py --shapes 4096x32000:fp32 --divergences fkl --providers eager
  python bench/bench_divergence.py --device cuda --providers kdops:cuda,kdops:triton,eager,compile
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DIVERGENCES = ("fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd")
PROVIDERS = ("kdops", "eager", "compile")
PASSES = ("fwd", "fwd_bwd")
DTYPE_ORDER = {"fp32": 0, "bf16": 1, "fp16": 2, "fp64": 3}

# Default plan: (shape spec, divergences). The headline is fkl fwd_bwd at 4096x32000 fp32.
# Eager takes ~10 s per fkl fwd_bwd call at 4096x32000 on 2 CPU cores, so rkl and tvd run at the
# smaller shape only, to keep the full CPU run near 10 minutes.
DEFAULT_PLAN = [
    ("4096x32000:fp32", ("fkl", "jsd")),
    ("4096x32000:bf16", ("fkl", "jsd")),
    ("1024x32000:fp32", ("fkl", "jsd", "rkl", "tvd")),
]
QUICK_PLAN = [
    ("64x1000:fp32", ("fkl", "rkl", "jsd", "tvd")),
    ("64x1000:bf16", ("fkl",)),
]
HEADLINE = ("4096x32000:fp32", "fkl", "fwd_bwd")

# Relative tolerances for the cross-provider check of the loss value and of the gradient norm.
# All providers see the same inputs and compute in float32, so only the summation order differs;
# bf16 gradients are rounded to bf16 by every provider, possibly at different points.
CHECK_RTOL = {"fp32": (1e-3, 1e-3), "fp16": (1e-3, 1e-2), "bf16": (1e-3, 2e-2)}


# --------------------------------------------------------------------------------------------------
# Shapes


def parse_shape(spec: str) -> tuple[int, int, str]:
    """'4096x32000:fp32' -> (4096, 32000, 'fp32'); the dtype defaults to fp32."""
    dims, _, dtype = spec.strip().partition(":")
    dtype = dtype or "fp32"
    try:
        n, v = (int(x) for x in dims.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--shapes: expected NxV[:dtype] such as 4096x32000:bf16, got {spec!r}")
    if dtype not in H.DTYPE_NAMES:
        raise SystemExit(f"--shapes: dtype must be one of {sorted(H.DTYPE_NAMES)}, got {dtype!r}")
    if n < 1 or v < 1:
        raise SystemExit(f"--shapes: N and V must be positive, got {spec!r}")
    return n, v, dtype


def shape_key(spec: str) -> str:
    n, v, dtype = parse_shape(spec)
    return f"{n}x{v}:{dtype}"


# --------------------------------------------------------------------------------------------------
# The math, plain PyTorch float32


def eager_loss(student, teacher, divergence: str, temperature: float, beta: float, alpha: float):
    """Per-row divergence of DESIGN.md 3.1, mean over rows, computed in float32.

    log q = log_softmax(student / T), log p = log_softmax(teacher / T);
    F.kl_div(input=log y, target=log x, log_target=True) is x (log x - log y) elementwise.
    Mixtures m = w p + (1 - w) q are taken in log space, log m = logaddexp(log p + log w,
    log q + log(1 - w)) (the two-term logsumexp), so nothing underflows; w = 0 or 1 gives log q
    or log p exactly (jsd beta = 0 / 1 is then fkl / rkl, as DESIGN.md 3.1 requires).
    """
    import torch
    import torch.nn.functional as F

    log_q = torch.log_softmax(student.float() / temperature, dim=-1)
    log_p = torch.log_softmax(teacher.float() / temperature, dim=-1)

    def kl(log_x, log_y):  # KL(x || y) per row
        return F.kl_div(log_y, log_x, log_target=True, reduction="none").sum(-1)

    def log_mix(w):  # log(w p + (1 - w) q)
        if w == 0.0:
            return log_q
        if w == 1.0:
            return log_p
        return torch.logaddexp(log_p + math.log(w), log_q + math.log1p(-w))

    if divergence == "fkl":
        rows = kl(log_p, log_q)
    elif divergence == "rkl":
        rows = kl(log_q, log_p)
    elif divergence == "jsd":
        if beta == 0.0:
            rows = kl(log_p, log_q)
        elif beta == 1.0:
            rows = kl(log_q, log_p)
        else:
            log_m = log_mix(beta)
            rows = beta * kl(log_p, log_m) + (1.0 - beta) * kl(log_q, log_m)
    elif divergence == "skew_fkl":
        rows = kl(log_p, log_mix(alpha))
    elif divergence == "skew_rkl":
        rows = kl(log_q, log_mix(1.0 - alpha))
    elif divergence == "tvd":
        rows = 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    else:
        raise ValueError(f"unknown divergence {divergence!r}")
    return rows.mean()


def make_loss_fn(provider: str, divergence: str, args) -> Callable:
    import functools

    if provider == "eager":
        return functools.partial(eager_loss, divergence=divergence, temperature=args.temperature,
                                 beta=args.beta, alpha=args.alpha)
    if provider == "compile":
        import torch

        # A fresh compiled function per divergence; shapes are static within a worker.
        return torch.compile(
            functools.partial(eager_loss, divergence=divergence, temperature=args.temperature,
                              beta=args.beta, alpha=args.alpha),
            backend=args.compile_backend, dynamic=False)
    if provider == "kdops" or provider.startswith("kdops:"):
        if ":" in provider:  # kdops:<backend> forces a backend (DESIGN.md section 1)
            os.environ["KDOPS_BACKEND"] = provider.split(":", 1)[1]
        import kdops

        kwargs: dict[str, Any] = {"divergence": divergence, "temperature": args.temperature}
        if divergence == "jsd":
            kwargs["beta"] = args.beta
        if divergence.startswith("skew"):
            kwargs["alpha"] = args.alpha
        return functools.partial(kdops.kd_loss, **kwargs)
    raise ValueError(f"unknown provider {provider!r}")


# --------------------------------------------------------------------------------------------------
# Worker: one provider, one or more shapes


def default_reps(n: int, v: int, args) -> tuple[int, int]:
    """(reps, extra warm-up calls after the first call)."""
    if args.reps is not None:
        return args.reps, (args.warmup if args.warmup is not None else 1)
    if args.quick:
        return 1, 0
    if args.device.startswith("cuda"):
        return 20, (args.warmup if args.warmup is not None else 3)
    big = n * v >= 1 << 26
    return (3 if big else 5), (args.warmup if args.warmup is not None else (0 if big else 1))


def worker_main(args) -> int:
    import torch

    # SHAPES: comma list of NxV:dtype, each optionally followed by @div+div (default --divergences)
    provider = args.worker[0]
    work = []
    for item in args.worker[1].split(","):
        spec, _, divs = item.partition("@")
        work.append((spec, divs.split("+") if divs else args.divergences.split(",")))
    device = args.device
    if device.startswith("cuda") and ":" in device:
        torch.cuda.set_device(torch.device(device))
    hwm_ok = device.startswith("cuda") or H.cpu_hwm_resettable()
    passes = args.passes.split(",")
    try:
        loss_fns = {d: make_loss_fn(provider, d, args) for _, divs in work for d in divs}
        # Objects alive now (torch's modules and the like) are never garbage: keep them out of
        # the gc.collect() calls before each measurement, which would otherwise take ~0.1 s each.
        gc.collect()
        gc.freeze()
    except Exception as e:  # e.g. kdops not importable
        for spec, divs in work:
            n, v, dt = parse_shape(spec)
            for d in divs:
                for p in passes:
                    H.emit_result(dict(provider=provider, N=n, V=v, dtype=dt, divergence=d,
                                       pass_=p, error=f"{type(e).__name__}: {e}"))
        return 0

    for spec, divergences in work:
        n, v, dt = parse_shape(spec)
        dtype = H.torch_dtype(dt)
        reps, warmup = default_reps(n, v, args)
        # Same seed for every provider, so the loss values can be compared across workers.
        try:
            gen = torch.Generator(device=device).manual_seed(args.seed)
            student = (torch.randn(n, v, device=device, generator=gen) * 2.0).to(dtype)
            teacher = (torch.randn(n, v, device=device, generator=gen) * 2.0).to(dtype)
            H.synchronize(device)
        except Exception as e:  # e.g. out of memory for the inputs alone
            for d in divergences:
                for p in passes:
                    H.emit_result(dict(provider=provider, N=n, V=v, dtype=dt, divergence=d, pass_=p,
                                       error=f"inputs: {type(e).__name__}: {str(e)[:200]}"))
            student = teacher = None
            gc.collect()
            continue
        input_bytes = student.nbytes + teacher.nbytes
        for d in divergences:
            for p in passes:
                rec: dict[str, Any] = dict(
                    provider=provider, N=n, V=v, dtype=dt, divergence=d, pass_=p,
                    temperature=args.temperature, beta=args.beta if d == "jsd" else None,
                    alpha=args.alpha if d.startswith("skew") else None,
                    compile_backend=args.compile_backend if provider == "compile" else None,
                    input_bytes=input_bytes, grad_bytes=student.nbytes if p == "fwd_bwd" else 0,
                    warmup=warmup)
                rec["budget_bytes"] = rec["input_bytes"] + rec["grad_bytes"]
                try:
                    rec.update(run_case(loss_fns[d], student, teacher, p, device, reps, warmup,
                                        hwm_ok))
                    rec["peak_ratio"] = rec["peak_bytes"] / rec["budget_bytes"]
                except Exception as e:
                    rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    if device.startswith("cuda"):
                        torch.cuda.empty_cache()
                gc.collect()
                H.emit_result(rec)
        del student, teacher
        gc.collect()
    return 0


def run_case(fn, student, teacher, pass_: str, device: str, reps: int, warmup: int, hwm_ok: bool):
    import torch

    if pass_ == "fwd":
        s = student  # requires_grad False: evaluation, no gradient anywhere

        def setup():
            pass

        def call():
            return fn(s, teacher)
    else:
        s = student.detach().requires_grad_(True)  # a leaf sharing the input's storage

        def setup():
            s.grad = None

        def call():
            loss = fn(s, teacher)
            loss.backward()
            return loss

    out: dict[str, Any] = {}

    def measure_memory():
        setup()
        with H.PeakMemory(device) as m:
            res = call()
            H.synchronize(device)
        del res
        out.update(mem_baseline_bytes=m.baseline, mem_raw_peak_bytes=m.peak,
                   mem_extra_bytes=m.extra, mem_method=m.method)

    if not hwm_ok:
        # ru_maxrss cannot be reset: only the first call of the process can be measured (the
        # parent then runs one worker per case). For compile it includes the compilation.
        measure_memory()

    # First call: compiles (compile provider) and gives the values for the cross-provider check.
    setup()
    H.synchronize(device)
    t0 = time.perf_counter()
    loss = call()
    H.synchronize(device)
    out["first_call_s"] = time.perf_counter() - t0
    out["loss"] = float(loss.detach().float())
    if pass_ == "fwd_bwd":
        g = s.grad
        out["grad_norm"] = (float(torch.linalg.vector_norm(g, dtype=torch.float32))
                            if g is not None else None)
        out["grad_dtype"] = str(g.dtype).replace("torch.", "") if g is not None else None
        del g
    del loss

    # With a resettable high-water mark, memory is measured on the first timed call.
    mem = H.PeakMemory(device) if hwm_ok else None
    times = H.time_fn(call, device=device, reps=max(1, reps), warmup=warmup, setup=setup,
                      memory=mem)
    out.update(H.summarize_times(times))
    if mem is not None:
        out.update(mem_baseline_bytes=mem.baseline, mem_raw_peak_bytes=mem.peak,
                   mem_extra_bytes=mem.extra, mem_method=mem.method)
    setup()
    out["peak_bytes"] = student.nbytes + teacher.nbytes + out["mem_extra_bytes"]
    return out


# --------------------------------------------------------------------------------------------------
# Parent: plan, run the workers, report


def build_plan(args) -> list[tuple[str, tuple[str, ...]]]:
    base = QUICK_PLAN if args.quick else DEFAULT_PLAN
    if args.shapes:
        specs = [shape_key(s) for s in args.shapes.split(",") if s.strip()]
        divs = tuple(args.divergences.split(",")) if args.divergences else ("fkl", "jsd")
        return [(s, divs) for s in specs]
    if args.divergences:
        return [(s, tuple(args.divergences.split(","))) for s, _ in base]
    return [(shape_key(s), d) for s, d in base]


def kdops_importable() -> str | None:
    """None if kdops.kd_loss is importable here, else the reason."""
    try:
        import kdops

        kdops.kd_loss
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def cross_check(results: list[dict]) -> list[str]:
    """Compare each provider's loss and gradient norm with eager's on the same case."""
    warnings = []
    eager = {(r["N"], r["V"], r["dtype"], r["divergence"], r["pass_"]): r
             for r in results if r["provider"] == "eager" and "error" not in r}
    for r in results:
        ref = eager.get((r["N"], r["V"], r["dtype"], r["divergence"], r["pass_"]))
        if r["provider"] == "eager" or "error" in r or ref is None:
            continue
        rtol_loss, rtol_grad = CHECK_RTOL.get(r["dtype"], (1e-3, 1e-2))
        problems = []
        for key, rtol in (("loss", rtol_loss), ("grad_norm", rtol_grad)):
            a, b = r.get(key), ref.get(key)
            if a is None or b is None:
                continue
            if not (math.isfinite(a) and abs(a - b) <= rtol * max(abs(b), 1e-12)):
                problems.append(f"{key} {a:.6g} vs eager {b:.6g}")
        r["check"] = "ok" if not problems else "MISMATCH: " + "; ".join(problems)
        if problems:
            warnings.append(f"{r['provider']} {r['N']}x{r['V']}:{r['dtype']} {r['divergence']} "
                            f"{r['pass_']}: " + "; ".join(problems))
    return warnings


def add_speedups(results: list[dict]) -> None:
    by = {}
    for r in results:
        if "error" not in r:
            by[(r["N"], r["V"], r["dtype"], r["divergence"], r["pass_"], r["provider"])] = r
    for r in results:
        if "error" in r:
            continue
        key = (r["N"], r["V"], r["dtype"], r["divergence"], r["pass_"])
        for base in ("eager", "compile"):
            b = by.get(key + (base,))
            r[f"speedup_vs_{base}"] = (b["median_s"] / r["median_s"]
                                       if b is not None and r.get("median_s") else None)


def provider_order(name: str) -> tuple[int, str]:
    base = name.split(":")[0]
    return (PROVIDERS.index(base) if base in PROVIDERS else len(PROVIDERS), name)


def case_order(r: dict) -> tuple:
    return (-r["N"] * r["V"], DTYPE_ORDER.get(r["dtype"], 9), DIVERGENCES.index(r["divergence"]),
            PASSES.index(r["pass_"]))


def table(results: list[dict]) -> str:
    rows = []
    for r in sorted(results, key=lambda r: case_order(r) + provider_order(r["provider"])):
        head = [f"{r['N']}x{r['V']}", r["dtype"], r["divergence"], r["pass_"], r["provider"]]
        if "error" in r:
            rows.append(head + ["error (below)"] + [""] * 4)
            continue
        flag = "" if r.get("check", "ok") == "ok" else " !"  # value differs from eager's
        rows.append(head + [H.fmt_time(r["median_s"]), H.fmt_ratio(r.get("speedup_vs_eager")),
                            H.fmt_ratio(r.get("speedup_vs_compile")), H.fmt_mb(r["peak_bytes"]),
                            f"{r['peak_ratio']:.2f}{flag}"])
    return H.format_table(["shape", "dtype", "div", "pass", "provider", "time", "vs eager",
                           "vs compile", "peak MB", "peak/(in+grad)"], rows)


def plot(results: list[dict], path: str, device: str, info: dict) -> None:
    ok = [r for r in results if "error" not in r]
    groups = sorted({(r["N"], r["V"], r["dtype"], r["divergence"], r["pass_"]) for r in ok},
                    key=lambda k: (-k[0] * k[1], DTYPE_ORDER.get(k[2], 9), DIVERGENCES.index(k[3]),
                                   PASSES.index(k[4])))
    providers = sorted({r["provider"] for r in ok}, key=provider_order)
    idx = {(r["N"], r["V"], r["dtype"], r["divergence"], r["pass_"], r["provider"]): r for r in ok}
    speed = {p: [idx[g + (p,)].get("speedup_vs_eager") if g + (p,) in idx else None for g in groups]
             for p in providers}
    mem = {p: [idx[g + (p,)]["peak_ratio"] if g + (p,) in idx else None for g in groups]
           for p in providers}
    labels = [f"{n}x{v} {dt} {d} {p}" for n, v, dt, d, p in groups]
    written = H.plot_bars(path, labels, speed, ylabel="speedup vs eager", hline=1.0, log=True,
                          title=f"kd_loss on {info.get('device_name')} (torch {info.get('torch')})",
                          second=("peak / (inputs + grad)", mem, 1.1))
    if written:
        print(f"plot: {written}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--quick", action="store_true",
                    help="tiny shapes, one rep, torch.compile with the aot_eager backend "
                    "(CI smoke test)")
    ap.add_argument("--shapes", help="comma list of NxV[:dtype], dtype fp32|bf16|fp16 "
                    "(default: 4096x32000:fp32,4096x32000:bf16,1024x32000:fp32)")
    ap.add_argument("--divergences", help=f"comma list from {','.join(DIVERGENCES)} "
                    "(default: per shape, fkl,jsd at least)")
    ap.add_argument("--providers", default=None, help="comma list from kdops,eager,compile and "
                    "kdops:<backend> (forces KDOPS_BACKEND, e.g. kdops:cuda,kdops:triton on a "
                    "GPU); "
                    "default kdops,eager,compile, kdops skipped with a message when not importable")
    ap.add_argument("--passes", default=",".join(PASSES), help="comma list from fwd,fwd_bwd")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i]")
    ap.add_argument("--out", help="JSON path (default bench/results/divergence_<device>.json; "
                    "with --quick, divergence_<device>_quick.json)")
    ap.add_argument("--plot", help="PNG path (default: next to the JSON; needs matplotlib)")
    ap.add_argument("--no-plot", action="store_true", help="do not draw the PNG")
    ap.add_argument("--reps", type=int, help="timed reps per case (default: cpu 3 for N*V >= 2^26 "
                    "else 5, cuda 20, quick 1)")
    ap.add_argument("--warmup", type=int, help="extra untimed calls after the first call")
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--beta", type=float, default=0.5, help="jsd mixture weight")
    ap.add_argument("--alpha", type=float, default=0.1, help="skew_fkl / skew_rkl weight")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend "
                    "(default inductor; aot_eager with --quick, to skip code generation)")
    ap.add_argument("--worker-timeout", type=float, default=3600.0, help="seconds per worker")
    ap.add_argument("--worker", nargs=2, metavar=("PROVIDER", "SHAPES"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.compile_backend is None:
        args.compile_backend = "aot_eager" if args.quick else "inductor"
    for name, allowed in (("passes", PASSES),):
        bad = set(getattr(args, name).split(",")) - set(allowed)
        if bad:
            ap.error(f"--{name}: unknown {sorted(bad)}; expected from {list(allowed)}")
    if args.divergences:
        bad = set(args.divergences.split(",")) - set(DIVERGENCES)
        if bad:
            ap.error(f"--divergences: unknown {sorted(bad)}; expected from {list(DIVERGENCES)}")

    if args.worker:
        return worker_main(args)

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: torch.cuda.is_available() is False")
    dev_tag = args.device.split(":")[0]
    out = args.out or os.path.join(HERE, "results",
                                   f"divergence_{dev_tag}{'_quick' if args.quick else ''}.json")

    providers = args.providers.split(",") if args.providers else list(PROVIDERS)
    bad = {p for p in providers if p not in PROVIDERS and not p.startswith("kdops:")}
    if bad:
        ap.error(f"--providers: unknown {sorted(bad)}; expected from {list(PROVIDERS)} or "
                 "kdops:<backend> (cpu, cuda, triton, reference)")
    notes = []
    if any(p.split(":")[0] == "kdops" for p in providers):
        why = kdops_importable()
        if why is not None:
            msg = f"kdops is not importable ({why})"
            if args.providers:  # asked for explicitly: keep it, the rows will show the error
                notes.append(msg)
            else:
                providers.remove("kdops")
                notes.append(msg + ": kdops rows skipped")
            print("note: " + notes[-1], file=sys.stderr)

    plan = build_plan(args)
    info = H.machine_info(args.device)
    kd = sys.modules.get("kdops")
    info["kdops"] = getattr(kd, "__version__", "unknown") if kd is not None else None
    hwm_ok = args.device.startswith("cuda") or H.cpu_hwm_resettable()
    if not hwm_ok:
        notes.append("peak RSS cannot be reset here: one worker per case, memory measured on the "
                     "first call (for compile, compilation included)")

    # Worker jobs: one per provider and shape (quick: one per provider, all shapes); without a
    # resettable high-water mark, one per provider, shape, divergence and pass.
    jobs = []
    for prov in providers:
        if args.quick and hwm_ok:
            jobs.append((prov, ",".join(f"{spec}@{'+'.join(divs)}" for spec, divs in plan),
                         (), args.passes.split(",")))
        else:
            for spec, divs in plan:
                if hwm_ok:
                    jobs.append((prov, spec, divs, args.passes.split(",")))
                else:
                    jobs += [(prov, spec, (d,), [p]) for d in divs for p in args.passes.split(",")]

    def worker_args(prov, specs, divs, passes):
        wargs = [prov, specs, "--passes", ",".join(passes),
                 "--device", args.device, "--temperature", str(args.temperature),
                 "--beta", str(args.beta), "--alpha", str(args.alpha), "--seed", str(args.seed),
                 "--compile-backend", args.compile_backend]
        if divs:
            wargs += ["--divergences", ",".join(divs)]
        if args.quick:
            wargs.append("--quick")
        if args.reps is not None:
            wargs += ["--reps", str(args.reps)]
        if args.warmup is not None:
            wargs += ["--warmup", str(args.warmup)]
        return wargs

    def run_job(job):
        t0 = time.perf_counter()
        recs, err = H.run_worker(os.path.abspath(__file__), worker_args(*job),
                                 timeout=args.worker_timeout)
        return recs, err, time.perf_counter() - t0

    results: list[dict] = []
    errors: list[str] = []
    t_all = time.perf_counter()
    outcomes = []
    load_samples: list[float] = []  # 1-min load average after each worker
    for i, job in enumerate(jobs, 1):
        print(f"[{i}/{len(jobs)}] {job[0]:8s} {job[1]} ...", end="", file=sys.stderr, flush=True)
        outcomes.append(run_job(job))
        print(f" {outcomes[-1][2]:.0f} s", file=sys.stderr, flush=True)
        if hasattr(os, "getloadavg"):
            load_samples.append(os.getloadavg()[0])
    for (prov, specs, _, _), (recs, err, _) in zip(jobs, outcomes):
        results += recs
        if err:
            errors.append(f"{prov} {specs}: {err}")
            print(f"{prov} {specs}: " + err.replace("\n", "\n  "), file=sys.stderr)
        errors += [f"{r['provider']} {r['N']}x{r['V']}:{r['dtype']} {r['divergence']} "
                   f"{r['pass_']}: {r['error']}" for r in recs if "error" in r]
    wall = time.perf_counter() - t_all

    add_speedups(results)
    warnings = cross_check(results)
    print()
    print(table(results))
    print(f"\n{args.device} ({info['device_name']}), torch {info['torch']}, "
          f"{info['torch_num_threads']} threads; T={args.temperature}, jsd beta={args.beta}; "
          f"reduction mean; time = median; peak includes the inputs; for fwd the grad term is 0. "
          f"Total {wall:.0f} s.")
    head = [r for r in results
            if (f"{r['N']}x{r['V']}:{r['dtype']}", r["divergence"], r["pass_"]) == HEADLINE
            and r["provider"].split(":")[0] == "kdops" and "error" not in r]
    for r in head:
        verdict = "met" if r["peak_ratio"] <= 1.10 else "NOT met"
        print(f"headline {r['provider']} fkl fwd_bwd 4096x32000 fp32: peak/(inputs+grad) = "
              f"{r['peak_ratio']:.3f} (target <= 1.10: {verdict})")
    try:
        info["loadavg_at_end"] = list(os.getloadavg())
        # Only the load before the first worker says something about other processes: the
        # workers themselves keep every core busy.
        busy = info.get("loadavg_at_start", [0.0])[0]
        if busy > 0.5 * (os.cpu_count() or 1):
            notes.append(f"the machine was busy before the run (1-min load average {busy:.1f} on "
                         f"{os.cpu_count()} CPUs): timings may be disturbed by other processes")
        # During the run a worker accounts for about torch_num_threads of the load by itself.
        info["loadavg_after_each_worker"] = load_samples
        own = min(info["torch_num_threads"], os.cpu_count() or 1) if args.device == "cpu" else 1
        if load_samples and max(load_samples) > own + 0.5 * (os.cpu_count() or 1):
            notes.append(f"other processes were running during the run (1-min load average up to "
                         f"{max(load_samples):.1f} on {os.cpu_count()} CPUs, the benchmark "
                         f"accounts for about {own}): timings are disturbed")
    except OSError:
        pass
    for n in notes:
        print("note: " + n)
    for w in warnings:
        print("WARNING value mismatch: " + w)
    for e in errors:
        print("ERROR " + e)

    payload = {
        "benchmark": "divergence",
        "op": "kdops.kd_loss",
        "machine": info,
        "config": {k: v for k, v in vars(args).items() if k != "worker"} | {
            "providers": providers, "plan": [[s, list(d)] for s, d in plan],
            "memory": "peak_bytes = input_bytes + (high-water mark - baseline with inputs "
                      "allocated); peak_ratio = peak_bytes / (input_bytes + grad_bytes)",
            "fwd": "no input requires grad", "fwd_bwd": "student requires grad, teacher detached",
        },
        "wall_s": wall,
        "notes": notes,
        "warnings": warnings,
        "errors": errors,
        "results": [{("pass" if k == "pass_" else k): v for k, v in r.items()} for r in results],
    }
    H.write_json(out, payload)
    print(f"results: {out}")
    if not args.no_plot and not args.quick:
        plot(results, args.plot or os.path.splitext(out)[0] + ".png", args.device, info)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
