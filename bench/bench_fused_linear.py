#!/usr/bin/env python3
"""Benchmark kdops.fused_linear_kd_loss (DESIGN.md 3.3) against materialized logits and Liger-Kernel.

Each case is a student and a teacher LM head: hidden states [N, H] and weights [V, H] for both
(the teacher given as hidden + weight), reduction "mean" over rows, no bias, no softcap.

Providers:

  kdops    kdops.fused_linear_kd_loss(h, W, teacher_hidden=th, teacher_weight=tW, ...) with its
           default chunk size; kdops:<backend> forces the divergence backend (KDOPS_BACKEND)
  eager    the logits materialized, h @ W.T and th @ tW.T (the teacher's under no_grad), then the
           divergence in plain PyTorch float32 (bench_divergence.eager_loss)
  compile  torch.compile of that same eager function (compiled and warmed up before timing)
  liger    Liger-Kernel's LigerFusedLinearJSD(jsd_beta, temperature) (CUDA only; skipped when
           liger_kernel does not import or lacks it): jsd, and fkl as its beta = 0 endpoint

Passes: fwd (nothing requires grad) and fwd_bwd (loss.backward(); the student's hidden states and
weight require grad, the teacher is constant).

Memory: peak = inputs + the high-water mark above them during one call (CPU: peak RSS via VmHWM,
CUDA: torch.cuda.max_memory_allocated), as in bench_divergence.py; "vs eager" columns are the
ratios of eager's time / peak to this row's. Every provider runs in a worker process of its own.

Plans:
  default cpu   1024x1024x32000 fp32, fkl and jsd: a few minutes on 2 cores
  --target      the CPU target 4096x1024x32000 fp32 (fkl, jsd): kdops' fwd_bwd peak at most 1/4 of
                eager's and its time at most eager's (checked and printed as the headline)
  cuda          1024x4096x128256 and 8192x4096x128256 bf16 (fkl, jsd), Liger included
  --quick       64x64x1000 fp32 in seconds (CI smoke test; compile uses aot_eager)

Examples:
  python bench/bench_fused_linear.py --quick
  python bench/bench_fused_linear.py --target
  python bench/bench_fused_linear.py --device cuda
  python bench/bench_fused_linear.py --shapes 2048x1024x32000:fp32 --divergences fkl --providers kdops,eager
"""

from __future__ import annotations

import argparse
import functools
import gc
import math
import os
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402
from bench_divergence import eager_loss  # noqa: E402  (the same divergence math in plain torch)

HERE = os.path.dirname(os.path.abspath(__file__))
PROVIDERS = ("kdops", "liger", "eager", "compile")
PASSES = ("fwd", "fwd_bwd")
DIVERGENCES = ("fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd")
LIGER_DIVERGENCES = ("fkl", "jsd")  # LigerFusedLinearJSD; fkl is its beta = 0 endpoint

QUICK_PLAN = ["64x64x1000:fp32"]
CPU_PLAN = ["1024x1024x32000:fp32"]
TARGET_PLAN = ["4096x1024x32000:fp32"]
GPU_PLAN = ["1024x4096x128256:bf16", "8192x4096x128256:bf16"]
# The CPU target (issue): at 4096x1024x32000 fp32, kdops' fwd_bwd peak <= 1/4 of eager's and its
# time <= eager's.
TARGET_MEMORY_RATIO = 0.25
# Loss and gradient-norm agreement with eager (float32 arithmetic everywhere; bf16 logits differ
# by rounding; Liger's JSD runs in the inputs' dtype).
CHECK_RTOL = {"fp32": 1e-3, "bf16": 2e-2, "fp16": 1e-2}
LIGER_CHECK_RTOL = {"fp32": 1e-3, "bf16": 5e-2}


def parse_shape(spec: str) -> tuple[int, int, int, str]:
    """'4096x1024x32000:fp32' -> (N, H, V, 'fp32')."""
    dims, _, dtype = spec.strip().partition(":")
    dtype = dtype or "fp32"
    try:
        n, h, v = (int(x) for x in dims.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--shapes: expected NxHxV[:dtype] such as 4096x1024x32000:fp32, got {spec!r}")
    if dtype not in H.DTYPE_NAMES or min(n, h, v) < 1:
        raise SystemExit(f"--shapes: positive sizes and a dtype from {sorted(H.DTYPE_NAMES)}, got {spec!r}")
    return n, h, v, dtype


# --------------------------------------------------------------------------------------------------
# Providers: f(student_hidden, student_weight, teacher_hidden, teacher_weight) -> loss


def eager_fused_linear(h, w, th, tw, *, divergence, temperature, beta, alpha):
    """Both logits materialized, then the divergence in plain float32 PyTorch."""
    import torch

    with torch.no_grad():
        teacher = th @ tw.T
    return eager_loss(h @ w.T, teacher, divergence, temperature, beta, alpha)


def make_loss_fn(provider: str, divergence: str, args) -> Callable:
    options = dict(divergence=divergence, temperature=args.temperature, beta=args.beta, alpha=args.alpha)
    if provider == "eager":
        return functools.partial(eager_fused_linear, **options)
    if provider == "compile":
        import torch

        return torch.compile(functools.partial(eager_fused_linear, **options), backend=args.compile_backend,
                             dynamic=False)
    if provider == "liger":
        from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD

        module = LigerFusedLinearJSD(jsd_beta=args.beta if divergence == "jsd" else 0.0,
                                     temperature=args.temperature)
        return lambda h, w, th, tw: module(h, w, th, tw)
    if provider == "kdops" or provider.startswith("kdops:"):
        if ":" in provider:
            os.environ["KDOPS_BACKEND"] = provider.split(":", 1)[1]
        import kdops

        def kdops_loss(h, w, th, tw):
            return kdops.fused_linear_kd_loss(h, w, teacher_hidden=th, teacher_weight=tw, **options)

        return kdops_loss
    raise ValueError(f"unknown provider {provider!r}")


def liger_missing() -> str | None:
    try:
        from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD  # noqa: F401
    except Exception as e:
        return f"liger_kernel's LigerFusedLinearJSD does not import ({type(e).__name__}: {e})"
    return None


# --------------------------------------------------------------------------------------------------
# Worker


def run_case(fn, inputs, pass_: str, device: str, reps: int, warmup: int) -> dict[str, Any]:
    import torch

    h, w, th, tw = inputs
    if pass_ == "fwd":
        leaves = ()

        def call():
            return fn(h, w, th, tw)
    else:
        leaves = (h.detach().requires_grad_(), w.detach().requires_grad_())  # share the storage

        def call():
            loss = fn(leaves[0], leaves[1], th, tw)
            loss.backward()
            return loss

    def setup():
        for x in leaves:
            x.grad = None

    def first(loss):
        values: dict[str, Any] = {"loss": float(loss.detach().float())}
        if leaves:
            values["grad_norms"] = [float(torch.linalg.vector_norm(x.grad, dtype=torch.float32))
                                    for x in leaves]
        return values

    # main() refuses a CPU whose peak RSS cannot be reset, so memory is always measured here
    return H.measure_call(call, setup=setup, device=device, reps=reps, memory_ok=True, warmup=warmup,
                          first=first)


def worker_main(args) -> int:
    import torch

    provider, specs = args.worker
    device = args.device
    divergences = args.divergences.split(",")
    passes = args.passes.split(",")
    try:
        fns = {d: make_loss_fn(provider, d, args) for d in divergences}
        gc.collect()
        gc.freeze()  # keep torch's long-lived objects out of the collections before each measurement
    except Exception as e:
        for spec in specs.split(","):
            n, h, v, dt = parse_shape(spec)
            for d in divergences:
                for p in passes:
                    H.emit_result(dict(provider=provider, N=n, H=h, V=v, dtype=dt, divergence=d, pass_=p,
                                       error=f"{type(e).__name__}: {e}"[:300]))
        return 0
    for spec in specs.split(","):
        n, hidden, vocab, dt = parse_shape(spec)
        dtype = H.torch_dtype(dt)
        gen = torch.Generator(device=device).manual_seed(args.seed)
        scale = 2.0 / math.sqrt(hidden)  # logits of about N(0, 4), as in bench_divergence

        def randn(*shape, std=1.0):
            return (torch.randn(shape, device=device, generator=gen) * std).to(dtype)

        inputs = (randn(n, hidden), randn(vocab, hidden, std=scale), randn(n, hidden), randn(vocab, hidden, std=scale))
        H.synchronize(device)
        input_bytes = sum(x.nbytes for x in inputs)
        big = n * vocab >= 1 << 26
        reps = args.reps or (1 if args.quick else (3 if big or device == "cpu" else 10))
        warmup = args.warmup if args.warmup is not None else (0 if args.quick or big else 1)
        for d in divergences:
            for p in passes:
                rec: dict[str, Any] = dict(provider=provider, N=n, H=hidden, V=vocab, dtype=dt, divergence=d, pass_=p,
                                           input_bytes=input_bytes, warmup=warmup)
                if provider == "liger" and d not in LIGER_DIVERGENCES:
                    rec["na"] = f"Liger-Kernel has no fused-linear {d}"
                    H.emit_result(rec)
                    continue
                try:
                    rec.update(run_case(fns[d], inputs, p, device, reps, warmup))
                    rec["peak_bytes"] = input_bytes + rec["mem_extra_bytes"]
                except Exception as e:
                    rec["error"] = H.error_text(e)
                H.emit_result(rec)
                gc.collect()
                if "error" in rec and device.startswith("cuda"):
                    torch.cuda.empty_cache()
        del inputs
        gc.collect()
    return 0


# --------------------------------------------------------------------------------------------------
# Parent: plan, workers, report


def case_key(r: dict) -> tuple:
    return (r["N"], r["H"], r["V"], r["dtype"], r["divergence"], r["pass_"])


def usable(r: dict) -> bool:
    return "error" not in r and "na" not in r


def compare(results: list[dict]) -> list[str]:
    """Ratios to eager (time and peak) and the loss / gradient-norm check against eager."""
    warnings = []
    eager = {case_key(r): r for r in results if r["provider"] == "eager" and usable(r)}
    for r in results:
        ref = eager.get(case_key(r))
        if not usable(r) or ref is None:
            continue
        r["speedup_vs_eager"] = ref["median_s"] / r["median_s"]
        r["peak_vs_eager"] = r["peak_bytes"] / ref["peak_bytes"]
        if r["provider"] == "eager":
            continue
        rtol = (LIGER_CHECK_RTOL if r["provider"] == "liger" else CHECK_RTOL).get(r["dtype"], 5e-2)
        pairs = [("loss", r["loss"], ref["loss"])]
        pairs += [(f"grad_norm[{i}]", a, b) for i, (a, b) in enumerate(zip(r.get("grad_norms", []),
                                                                          ref.get("grad_norms", [])))]
        bad = [f"{name} {a:.6g} vs eager {b:.6g}" for name, a, b in pairs
               if not (math.isfinite(a) and abs(a - b) <= rtol * max(abs(b), 1e-12))]
        r["check"] = "ok" if not bad else "MISMATCH: " + "; ".join(bad)
        if bad:
            warnings.append(f"{r['provider']} {label(r)}: " + "; ".join(bad) + f" (rtol {rtol:g})")
    return warnings


def label(r: dict) -> str:
    return f"{r['N']}x{r['H']}x{r['V']}:{r['dtype']} {r['divergence']} {r['pass_']}"


def provider_order(name: str) -> tuple:
    base = name.split(":")[0]
    return (PROVIDERS.index(base) if base in PROVIDERS else len(PROVIDERS), name)


def table(results: list[dict]) -> str:
    headers = ["N x H x V", "dtype", "div", "pass", "provider", "time", "vs eager", "peak MB", "peak/eager",
               "first call"]
    rows = []
    order = {p: i for i, p in enumerate(PASSES)}
    for r in sorted(results, key=lambda r: (r["N"] * r["V"], r["dtype"], r["divergence"], order[r["pass_"]],
                                            provider_order(r["provider"]))):
        head = [f"{r['N']}x{r['H']}x{r['V']}", r["dtype"], r["divergence"], r["pass_"], r["provider"]]
        if not usable(r):
            rows.append(head + ["n/a" if "na" in r else "error (below)"] + [""] * 4)
            continue
        flag = "" if r.get("check", "ok") == "ok" else " !"
        ratio = r.get("peak_vs_eager")
        rows.append(head + [H.fmt_time(r["median_s"]) + flag, H.fmt_ratio(r.get("speedup_vs_eager")),
                            H.fmt_mb(r["peak_bytes"]), "-" if ratio is None else f"{ratio:.2f}",
                            H.fmt_time(r["first_call_s"])])
    return H.format_markdown_table(headers, rows, align=["l"] * 5 + ["r"] * 5)


def target_lines(results: list[dict]) -> list[str]:
    lines = []
    for r in results:
        n, h, v, dt = parse_shape(TARGET_PLAN[0])
        if ((r["N"], r["H"], r["V"], r["dtype"], r["pass_"]) == (n, h, v, dt, "fwd_bwd")
                and r["provider"].startswith("kdops") and usable(r) and "peak_vs_eager" in r):
            met = r["peak_vs_eager"] <= TARGET_MEMORY_RATIO and r["speedup_vs_eager"] >= 1.0
            lines.append(f"CPU target {label(r)} {r['provider']}: peak {r['peak_vs_eager']:.3f} of eager's "
                         f"(<= {TARGET_MEMORY_RATIO}), speed {r['speedup_vs_eager']:.2f}x eager's (>= 1): "
                         f"{'met' if met else 'NOT met'}")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--quick", action="store_true", help="tiny shape, one rep (CI smoke test)")
    ap.add_argument("--target", action="store_true", help="the CPU target plan 4096x1024x32000 fp32")
    ap.add_argument("--shapes", help="comma list of NxHxV[:dtype] (overrides the plan)")
    ap.add_argument("--divergences", default="fkl,jsd", help=f"comma list from {','.join(DIVERGENCES)}")
    ap.add_argument("--providers", help="comma list from kdops,liger,eager,compile and kdops:<backend> "
                    "(default: kdops,eager,compile, plus liger on CUDA)")
    ap.add_argument("--passes", default=",".join(PASSES))
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i]")
    ap.add_argument("--out", help="JSON path (default bench/results/fused_linear_<device>[_quick|_target].json; "
                    "the markdown table goes next to it)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--reps", type=int, help="timed reps (default: 1 quick, 3 cpu or large, else 10)")
    ap.add_argument("--warmup", type=int, help="untimed calls after the first (default 1; 0 for large or quick)")
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile-backend", default=None, help="default inductor (aot_eager with --quick)")
    ap.add_argument("--worker-timeout", type=float, default=1800.0)
    ap.add_argument("--worker", nargs=2, metavar=("PROVIDER", "SHAPES"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.compile_backend is None:
        args.compile_backend = "aot_eager" if args.quick else "inductor"
    bad = set(args.divergences.split(",")) - set(DIVERGENCES)
    if bad:
        ap.error(f"--divergences: unknown {sorted(bad)}")
    if args.worker:
        return worker_main(args)

    cuda = args.device.startswith("cuda")
    if not cuda and not H.cpu_hwm_resettable():
        ap.error("peak RSS cannot be reset on this machine (/proc/self/clear_refs): CPU memory unmeasurable")
    plan = (args.shapes.split(",") if args.shapes else QUICK_PLAN if args.quick else GPU_PLAN if cuda
            else TARGET_PLAN if args.target else CPU_PLAN)
    plan = [f"{n}x{h}x{v}:{dt}" for n, h, v, dt in map(parse_shape, plan)]
    providers = args.providers.split(",") if args.providers else ["kdops", "eager", "compile"] + (
        ["liger"] if cuda else [])
    notes = []
    if "liger" in providers:
        why = "Liger-Kernel runs CUDA tensors only" if not cuda else liger_missing()
        if why:
            providers.remove("liger")
            notes.append(f"liger skipped: {why}")
    tag = "_quick" if args.quick else "_target" if args.target else ""
    out = args.out or os.path.join(HERE, "results", f"fused_linear_{args.device.split(':')[0]}{tag}.json")

    results: list[dict] = []
    errors: list[str] = []
    t_all = time.perf_counter()
    for spec in plan:
        for prov in providers:
            wargs = [prov, spec, "--device", args.device, "--divergences", args.divergences, "--passes", args.passes,
                     "--temperature", str(args.temperature), "--beta", str(args.beta), "--alpha", str(args.alpha),
                     "--seed", str(args.seed), "--compile-backend", args.compile_backend]
            wargs += ["--quick"] if args.quick else []
            wargs += ["--reps", str(args.reps)] if args.reps else []
            wargs += ["--warmup", str(args.warmup)] if args.warmup is not None else []
            print(f"{prov:12s} {spec} ...", end="", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            recs, err = H.run_worker(os.path.abspath(__file__), wargs, timeout=args.worker_timeout)
            print(f" {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
            if err:
                errors.append(f"{prov} {spec}: {err}")
            results += recs
    wall = time.perf_counter() - t_all
    warnings = compare(results)
    errors += [f"{r['provider']} {label(r)}: {r['error']}" for r in results if "error" in r]

    info = H.machine_info(args.device)
    md = [f"## kdops.fused_linear_kd_loss on {info.get('device_name')} ({args.device})", "",
          f"torch {info['torch']}, {info['torch_num_threads']} threads, {info['timestamp']}; T={args.temperature}, "
          f"jsd beta={args.beta}, reduction mean; teacher = hidden + weight (same H); time = median; peak = inputs + "
          f"high-water mark during one call; ! = value differs from eager's. Total {wall:.0f} s.", "",
          table(results), ""]
    for title, items in (("Target", target_lines(results)), ("Notes", notes), ("Warnings", warnings),
                         ("Errors", errors)):
        if items:
            md += [f"{title}:"] + ["- " + " / ".join(x.splitlines())[:600] for x in items] + [""]
    md_text = "\n".join(md)
    H.write_json(out, {"benchmark": "fused_linear", "op": "kdops.fused_linear_kd_loss", "machine": info,
                       "config": {k: v for k, v in vars(args).items() if k != "worker"} | {
                           "plan": plan, "providers": providers},
                       "wall_s": wall, "notes": notes, "warnings": warnings, "errors": errors,
                       "results": [{("pass" if k == "pass_" else k): v for k, v in r.items()} for r in results]})
    md_path = os.path.splitext(out)[0] + ".md"
    with open(md_path, "w") as f:
        f.write(md_text)
    if not args.no_plot and not args.quick:
        ok = [r for r in results if usable(r)]
        groups = sorted({case_key(r) for r in ok})
        by = {case_key(r) + (r["provider"],): r for r in ok}
        names = sorted({r["provider"] for r in ok}, key=provider_order)
        H.plot_bars(os.path.splitext(out)[0] + ".png", [f"{n}x{h}x{v} {dt} {d} {p}" for n, h, v, dt, d, p in groups],
                    {p: [by.get(g + (p,), {}).get("speedup_vs_eager") for g in groups] for p in names},
                    ylabel="speedup vs eager", title="fused_linear_kd_loss", hline=1.0, log=True,
                    second=("peak / eager peak", {p: [by.get(g + (p,), {}).get("peak_vs_eager") for g in groups]
                                                  for p in names}, TARGET_MEMORY_RATIO))
    print(f"results: {out}\nmarkdown: {md_path}\n\n{md_text}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
