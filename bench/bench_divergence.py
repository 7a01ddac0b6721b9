#!/usr/bin/env python3
"""Benchmark kdops.kd_loss (DESIGN.md section 3.1) against plain PyTorch and Liger-Kernel.

Providers (all compute the same loss: reduction "mean", t2_scale False):

  kdops    kdops.kd_loss(student, teacher, divergence=..., temperature=...); kdops:<backend>
           forces a backend (KDOPS_BACKEND), e.g. kdops:cuda, kdops:triton on a GPU
  liger    Liger-Kernel (CUDA only) on log_softmax(logits / T) of both inputs, in the inputs'
           dtype (bf16 stays bf16, as a Liger user would call it): fkl = LigerKLDIVLoss(
           reduction="batchmean", log_target=True)(log q, log p), jsd = LigerJSD(beta)(log q,
           log p), rkl = LigerJSD(beta=1) (Liger's documented reverse-KL endpoint), tvd =
           LigerTVDLoss("batchmean")(q, p) on softmax probabilities; skew_fkl / skew_rkl and fp16
           inputs are n/a. Skipped with a note on the CPU or when liger_kernel does not import.
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

Ceiling (CUDA; --copy-bw on elsewhere): one more worker times a device-to-device copy of a 2 GiB
bf16 buffer (bytes = read + write). Each result then gets bytes_floor = read student + read
teacher (+ write one student-dtype gradient for fwd_bwd), the least traffic the loss needs, and
frac_of_copy_bw = (bytes_floor / time) / copy bandwidth: 1.0 would be a kernel that streams its
data at copy speed.

The table is printed last and also written as markdown next to the JSON (<out>.md).

Examples:
  python bench/bench_divergence.py                       # full CPU run (about 10 min on 2 cores)
  python bench/bench_divergence.py --quick               # CI smoke test, seconds
  python bench/bench_divergence.py --device cuda         # GPU plan (8192x128256 bf16 headline,
                                                         # Liger, copy ceiling), a few minutes
  python bench/bench_divergence.py --shapes 4096x32000:fp32 --divergences fkl --providers eager
  python bench/bench_divergence.py --device cuda --providers kdops:cuda,kdops:triton,liger,eager
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import subprocess
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DIVERGENCES = ("fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd")
PROVIDERS = ("kdops", "liger", "eager", "compile")  # also the table order
PASSES = ("fwd", "fwd_bwd")
DTYPE_ORDER = {"fp32": 0, "bf16": 1, "fp16": 2, "fp64": 3}

DEFAULT_PROVIDERS = {"cpu": ["kdops", "eager", "compile", "liger"],
                     "cuda": ["kdops:cuda", "kdops:triton", "liger", "eager", "compile"]}

# Default CPU plan: (shape spec, divergences). The headline is fkl fwd_bwd at 4096x32000 fp32.
# Eager takes ~10 s per fkl fwd_bwd call at 4096x32000 on 2 CPU cores, so rkl and tvd run at the
# smaller shape only, to keep the full CPU run near 10 minutes.
DEFAULT_PLAN = [
    ("4096x32000:fp32", ("fkl", "jsd")),
    ("4096x32000:bf16", ("fkl", "jsd")),
    ("1024x32000:fp32", ("fkl", "jsd", "rkl", "tvd")),
]
# Default CUDA plan: a Llama-3 vocabulary at 8192 tokens in bf16 (4.2 GB of logits in, the
# headline, where Liger is compared), and the CPU headline shape for the memory target.
GPU_PLAN = [
    ("8192x128256:bf16", ("fkl", "jsd")),
    ("4096x32000:fp32", ("fkl",)),
]
QUICK_PLAN = [
    ("64x1000:fp32", ("fkl", "rkl", "jsd", "tvd")),
    ("64x1000:bf16", ("fkl",)),
]
HEADLINE = ("4096x32000:fp32", "fkl", "fwd_bwd")

# Relative tolerances for the cross-provider check of the loss value and of the gradient norm.
# All providers but liger see the same inputs and compute in float32, so only the summation order
# differs; bf16 gradients are rounded to bf16 by every provider, possibly at different points.
CHECK_RTOL = {"fp32": (1e-3, 1e-3), "fp16": (1e-3, 1e-2), "bf16": (1e-3, 2e-2)}
# Liger takes log-probabilities in the inputs' dtype: in bf16 every log-prob is rounded to 8 bits
# of mantissa (about 0.02 absolute at log p ~ -12) and LigerJSD returns a bf16 loss; emulated on
# the CPU at 64x128256 that moves the loss by 0.1-0.4% and the gradient norm by ~0.6%.
LIGER_CHECK_RTOL = {"fp32": (1e-3, 1e-3), "bf16": (2e-2, 5e-2)}
LIGER_DTYPES = ("fp32", "bf16")
LIGER_DIVERGENCES = ("fkl", "jsd", "rkl", "tvd")
# Testing only: let the liger provider run on CPU tensors (under TRITON_INTERPRET=1).
LIGER_CPU_ENV = "KDOPS_BENCH_LIGER_ON_CPU"
COPY_WORKER = "ceiling:copy"


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
    if provider == "liger":
        return liger_loss_fn(divergence, args)
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


def liger_na(divergence: str, dtype: str) -> str | None:
    """Why Liger-Kernel has no counterpart for a case (an n/a row), or None."""
    if divergence not in LIGER_DIVERGENCES:
        return f"Liger-Kernel has no {divergence} loss"
    if dtype not in LIGER_DTYPES:
        return f"Liger-Kernel's losses take fp32 or bf16, not {dtype}"
    return None


def liger_loss_fn(divergence: str, args) -> Callable:
    """The Liger-Kernel pipeline for one divergence: log_softmax (or softmax) in the inputs' dtype,
    then Liger's loss module; mean over rows like the other providers.

    torch's kl_div(input, target) is KL(target || input): with input = student log-probs and
    target = teacher log-probs it is KL(p || q) = fkl, and "batchmean" divides by N. LigerJSD's
    m = beta P + (1 - beta) Q has P = its second argument (teacher), the convention of kd_loss;
    beta = 1 is its reverse-KL endpoint KL(q || p) = rkl. LigerTVDLoss takes probabilities.
    """
    import torch

    why = liger_na(divergence, "fp32")
    if why is not None:
        raise ValueError(why)
    t = args.temperature
    if divergence == "fkl":
        from liger_kernel.transformers.kl_div import LigerKLDIVLoss

        module = LigerKLDIVLoss(reduction="batchmean", log_target=True)
    elif divergence in ("jsd", "rkl"):
        from liger_kernel.transformers.jsd import LigerJSD

        module = LigerJSD(beta=float(args.beta) if divergence == "jsd" else 1.0)
    else:  # tvd
        from liger_kernel.transformers.tvd import LigerTVDLoss

        module = LigerTVDLoss(reduction="batchmean")

        def liger_tvd(student, teacher):
            return module(torch.softmax(student / t, dim=-1), torch.softmax(teacher / t, dim=-1))

        return liger_tvd

    def liger_loss(student, teacher):
        return module(torch.log_softmax(student / t, dim=-1), torch.log_softmax(teacher / t, dim=-1))

    return liger_loss


def liger_impl(divergence: str) -> str | None:
    """Which Liger implementation runs (its dispatcher picks one for JSD; the KL and TVD modules
    call their Triton autograd functions directly)."""
    try:
        if divergence in ("jsd", "rkl"):
            import liger_kernel

            impls = liger_kernel.available_impls("jsd_loss_and_grad")
            return impls[0] if impls else None
        return {"fkl": "LigerKLDivLossFunction (triton)",
                "tvd": "LigerTVDLossFunction (triton)"}.get(divergence)
    except Exception as e:
        return f"unknown ({type(e).__name__})"


# --------------------------------------------------------------------------------------------------
# Worker: one provider, one or more shapes


def default_reps(n: int, v: int, args) -> tuple[int, int]:
    """(reps, extra warm-up calls after the first call)."""
    if args.reps is not None:
        return args.reps, (args.warmup if args.warmup is not None else 1)
    if args.quick:
        return 1, 0
    if args.device.startswith("cuda"):
        # Far above L2 either way; the big shapes take milliseconds per call, and torch.compile
        # spends its seconds in compilation, not in reps.
        big = n * v >= 1 << 28
        return (10 if big else 20), (args.warmup if args.warmup is not None else 3)
    big = n * v >= 1 << 26
    return (3 if big else 5), (args.warmup if args.warmup is not None else (0 if big else 1))


def copy_worker(args) -> int:
    """The copy-bandwidth ceiling, in a process of its own (one record with ``ceiling``)."""
    rec: dict[str, Any] = {"ceiling": "copy", "device": args.device}
    try:
        import torch

        if args.device.startswith("cuda") and ":" in args.device:
            torch.cuda.set_device(torch.device(args.device))
        reps = args.reps if args.reps is not None else 10
        warmup = args.warmup if args.warmup is not None else 3
        rec.update(H.copy_bandwidth(args.device, int(args.copy_mib * 2**20), reps=reps,
                                    warmup=warmup))
    except Exception as e:
        rec["error"] = H.error_text(e)
    H.emit_result(rec)
    return 0


def worker_main(args) -> int:
    if args.worker[0] == COPY_WORKER:
        return copy_worker(args)
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
                if provider == "liger":
                    rec["impl"] = liger_impl(d)
                rec["budget_bytes"] = rec["input_bytes"] + rec["grad_bytes"]
                try:
                    rec.update(run_case(loss_fns[d], student, teacher, p, device, reps, warmup,
                                        hwm_ok))
                    rec["peak_ratio"] = rec["peak_bytes"] / rec["budget_bytes"]
                except Exception as e:
                    rec["error"] = H.error_text(e, limit=500)
                H.emit_result(rec)
                # The exception (and its frames, which hold the call's tensors) is gone here:
                # give an out-of-memory case's blocks back before the next case.
                gc.collect()
                if "error" in rec and device.startswith("cuda"):
                    try:
                        torch.cuda.empty_cache()
                    except Exception:  # a sticky CUDA error: the next cases will say so
                        pass
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


def is_cuda(device: str) -> bool:
    return device.startswith("cuda")


def build_plan(args) -> list[tuple[str, tuple[str, ...]]]:
    base = QUICK_PLAN if args.quick else (GPU_PLAN if is_cuda(args.device) else DEFAULT_PLAN)
    if args.shapes:
        specs = [shape_key(s) for s in args.shapes.split(",") if s.strip()]
        divs = tuple(args.divergences.split(",")) if args.divergences else ("fkl", "jsd")
        return [(s, divs) for s in specs]
    if args.divergences:
        return [(shape_key(s), tuple(args.divergences.split(","))) for s, _ in base]
    return [(shape_key(s), d) for s, d in base]


def kdops_importable() -> str | None:
    """None if kdops.kd_loss is importable here, else the reason."""
    try:
        import kdops

        kdops.kd_loss
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def kdops_cuda_missing() -> str | None:
    """None if kdops registered a CUDA kernel for kd_loss, else why."""
    try:
        import kdops  # noqa: F401  (loads kdops._C, which registers the kernels)
        import torch

        if torch._C._dispatch_has_kernel_for_dispatch_key("kdops::kd_loss", "CUDA"):
            return None
        return ("kdops was built without CUDA kernels (no CUDA kernel registered for "
                "kdops::kd_loss): kdops:cuda not run")
    except Exception as e:
        return f"cannot tell whether kdops has CUDA kernels ({type(e).__name__}: {e})"


_LIGER_PROBE = """
import liger_kernel
from liger_kernel.transformers.kl_div import LigerKLDIVLoss
from liger_kernel.transformers.jsd import LigerJSD
try:
    from importlib.metadata import version
    v = version("liger_kernel")
except Exception:
    v = getattr(liger_kernel, "__version__", "unknown")
print("@@LIGER@@", v)
"""


def liger_probe(timeout: float = 180.0) -> tuple[str | None, str | None]:
    """(why liger_kernel cannot be used, or None; its version), found in a separate process so
    that a broken install can not take this one down and its imports stay out of it."""
    try:
        proc = subprocess.run([sys.executable, "-c", _LIGER_PROBE], capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"import liger_kernel took more than {timeout:.0f} s", None
    except OSError as e:
        return f"could not start Python to import liger_kernel ({e})", None
    for line in proc.stdout.splitlines():
        if line.startswith("@@LIGER@@"):
            return None, line[len("@@LIGER@@"):].strip() or "unknown"
    tail = [ln for ln in (proc.stderr or "").strip().splitlines() if ln.strip()]
    return f"import liger_kernel failed: {tail[-1] if tail else f'exit {proc.returncode}'}", None


def case_id(r: dict) -> tuple:
    return (r["N"], r["V"], r["dtype"], r["divergence"], r["pass_"])


def case_label(r: dict) -> str:
    return f"{r['N']}x{r['V']}:{r['dtype']} {r['divergence']} {r['pass_']}"


def usable(r: dict) -> bool:
    """A row with a measurement (not an error, not n/a)."""
    return "error" not in r and "na" not in r


def cross_check(results: list[dict]) -> list[str]:
    """Compare each provider's loss and gradient norm with eager's on the same case."""
    warnings = []
    eager = {case_id(r): r for r in results if r["provider"] == "eager" and usable(r)}
    for r in results:
        ref = eager.get(case_id(r))
        if r["provider"] == "eager" or not usable(r) or ref is None:
            continue
        table = LIGER_CHECK_RTOL if r["provider"] == "liger" else CHECK_RTOL
        rtol_loss, rtol_grad = table.get(r["dtype"], (2e-2, 5e-2))
        problems = []
        for key, rtol in (("loss", rtol_loss), ("grad_norm", rtol_grad)):
            a, b = r.get(key), ref.get(key)
            if a is None or b is None:
                continue
            if not (math.isfinite(a) and abs(a - b) <= rtol * max(abs(b), 1e-12)):
                problems.append(f"{key} {a:.6g} vs eager {b:.6g} (rtol {rtol:g})")
        r["check"] = "ok" if not problems else "MISMATCH: " + "; ".join(problems)
        if problems:
            warnings.append(f"{r['provider']} {case_label(r)}: " + "; ".join(problems))
    return warnings


SPEEDUP_BASES = ("eager", "compile", "liger")


def add_speedups(results: list[dict]) -> None:
    by = {case_id(r) + (r["provider"],): r for r in results if usable(r)}
    for r in results:
        if not usable(r):
            continue
        for base in SPEEDUP_BASES:
            b = by.get(case_id(r) + (base,))
            r[f"speedup_vs_{base}"] = (b["median_s"] / r["median_s"]
                                       if b is not None and b.get("median_s") and r.get("median_s")
                                       else None)


def copy_bandwidth_of(copy: dict | None) -> float | None:
    return copy.get("bandwidth_Bps") if copy and "error" not in copy else None


def add_ceilings(results: list[dict], copy: dict | None) -> None:
    """bytes_floor (read student + teacher, + write one student-dtype gradient for fwd_bwd: the
    least traffic the loss needs), its rate over the median time, and that rate as a fraction of
    the copy bandwidth measured in the same run (None when the copy was not measured)."""
    bw = copy_bandwidth_of(copy)
    for r in results:
        if not usable(r) or not r.get("median_s"):
            continue
        r["bytes_floor"] = r["input_bytes"] + r["grad_bytes"]
        r["floor_Bps"] = r["bytes_floor"] / r["median_s"]
        r["frac_of_copy_bw"] = r["floor_Bps"] / bw if bw else None


def provider_order(name: str) -> tuple[int, str]:
    base = name.split(":")[0]
    return (PROVIDERS.index(base) if base in PROVIDERS else len(PROVIDERS), name)


def case_order(r: dict) -> tuple:
    return (-r["N"] * r["V"], DTYPE_ORDER.get(r["dtype"], 9), DIVERGENCES.index(r["divergence"]),
            PASSES.index(r["pass_"]))


def table(results: list[dict], *, ceiling: bool) -> str:
    """The results as a markdown table (padded: it reads as plain text too). ``ceiling`` adds
    the floor-traffic rate and its fraction of the copy bandwidth (CUDA)."""
    liger = any(r["provider"] == "liger" and usable(r) for r in results)
    headers = ["shape", "dtype", "div", "pass", "provider", "time", "vs eager", "vs compile"]
    headers += ["vs liger"] if liger else []
    headers += ["peak MB", "peak/(in+grad)"]
    headers += ["floor GB/s", "of copy BW"] if ceiling else []
    rows = []
    for r in sorted(results, key=lambda r: case_order(r) + provider_order(r["provider"])):
        head = [f"{r['N']}x{r['V']}", r["dtype"], r["divergence"], r["pass_"], r["provider"]]
        if not usable(r):
            rows.append(head + ["n/a" if "error" not in r else "error (below)"]
                        + [""] * (len(headers) - len(head) - 1))
            continue
        flag = "" if r.get("check", "ok") == "ok" else " !"  # value differs from eager's
        row = head + [H.fmt_time(r["median_s"]), H.fmt_ratio(r.get("speedup_vs_eager")),
                      H.fmt_ratio(r.get("speedup_vs_compile"))]
        if liger:
            row.append(H.fmt_ratio(r.get("speedup_vs_liger")))
        row += [H.fmt_mb(r["peak_bytes"]), f"{r['peak_ratio']:.2f}{flag}"]
        if ceiling:
            rate, frac = r.get("floor_Bps"), r.get("frac_of_copy_bw")
            row += ["-" if rate is None else f"{rate / 1e9:.0f}",
                    "-" if frac is None else f"{frac:.2f}"]
        rows.append(row)
    align = ["l"] * 5 + ["r"] * (len(headers) - 5)
    return H.format_markdown_table(headers, rows, align=align)


def headline_lines(results: list[dict]) -> list[str]:
    lines = []
    for r in results:
        if ((f"{r['N']}x{r['V']}:{r['dtype']}", r["divergence"], r["pass_"]) == HEADLINE
                and r["provider"].split(":")[0] == "kdops" and usable(r)):
            verdict = "met" if r["peak_ratio"] <= 1.10 else "NOT met"
            lines.append(f"memory headline {r['provider']} fkl fwd_bwd 4096x32000 fp32: "
                         f"peak/(inputs+grad) = {r['peak_ratio']:.3f} (target <= 1.10: {verdict})")
    # kdops (its fastest backend) against Liger, case by case.
    by_case: dict[tuple, dict[str, dict]] = {}
    for r in results:
        if usable(r) and r.get("median_s"):
            by_case.setdefault(case_id(r), {})[r["provider"]] = r
    for key in sorted(by_case, key=lambda k: case_order(dict(zip(
            ("N", "V", "dtype", "divergence", "pass_"), k)))):
        rows = by_case[key]
        lg = rows.get("liger")
        kd = [r for p, r in rows.items() if p.split(":")[0] == "kdops"]
        if lg is None or not kd:
            continue
        best = min(kd, key=lambda r: r["median_s"])
        line = (f"vs Liger {case_label(best)}: {best['provider']} {H.fmt_time(best['median_s'])}, "
                f"liger {H.fmt_time(lg['median_s'])}: speedup "
                f"{lg['median_s'] / best['median_s']:.2f}x")
        if best.get("frac_of_copy_bw") is not None and lg.get("frac_of_copy_bw") is not None:
            line += (f"; of copy bandwidth {best['frac_of_copy_bw']:.2f} vs "
                     f"{lg['frac_of_copy_bw']:.2f}")
        line += (f"; peak/(in+grad) {best['peak_ratio']:.2f} vs {lg['peak_ratio']:.2f}")
        lines.append(line)
    return lines


def grouped(results: list[dict], key: str) -> list[str]:
    """One line per (provider, message) of the rows that carry ``key`` ("error" or "na")."""
    groups: dict[tuple[str, str], list[str]] = {}
    for r in results:
        if key in r:
            groups.setdefault((r["provider"], r[key]), []).append(case_label(r))
    out = []
    for (prov, msg), cases in groups.items():
        shown = ", ".join(cases[:4]) + (", ..." if len(cases) > 4 else "")
        out.append(f"{prov}: {msg} [{len(cases)} case{'s' if len(cases) > 1 else ''}: {shown}]")
    return out


def copy_line(copy: dict | None, device: str) -> str:
    if copy is None:
        if is_cuda(device):
            return "copy bandwidth: not measured (--copy-bw off)"
        return "copy bandwidth: not measured (CUDA runs only; --copy-bw on to measure it here)"
    if "error" in copy:
        return f"copy bandwidth: FAILED ({copy['error']})"
    return (f"copy bandwidth: {H.fmt_bandwidth(copy['bandwidth_Bps'])} (bf16 copy_ of "
            f"{copy['buffer_bytes'] / 2**30:.2f} GiB, read + write counted, median of "
            f"{copy['reps']}; best {H.fmt_bandwidth(copy['best_bandwidth_Bps'])})")


def markdown_report(args, info: dict, results: list[dict], copy: dict | None, ceiling: bool,
                    wall: float, notes: list[str], warnings: list[str], errors: list[str]) -> str:
    cuda = is_cuda(args.device)
    lines = [f"## kdops.kd_loss on {info.get('device_name')} ({args.device})", ""]
    lines.append(f"**{info.get('device_name')}**, {copy_line(copy, args.device)}; "
                 f"torch {info.get('torch')}"
                 + (f" (CUDA {info.get('torch_cuda')})" if cuda else
                    f", {info.get('torch_num_threads')} threads")
                 + f", triton {info.get('triton')}, kdops {info.get('kdops')}"
                 + (f", liger-kernel {info['liger_kernel']}" if info.get("liger_kernel") else "")
                 + f"; {info.get('timestamp')}.")
    lines.append("")
    timing = ("median of CUDA-event timings" if cuda else "median of perf_counter timings")
    mem = ("torch.cuda.max_memory_allocated during one call" if cuda else
           "peak RSS during one call")
    settings = (f"T={args.temperature}, jsd beta={args.beta}, reduction mean over rows; "
                f"time = {timing}; peak MB = inputs + {mem}; peak/(in+grad) = peak / (inputs + "
                f"one student-sized gradient, 0 for fwd); speedups = other provider's time / this "
                f"row's time; ! = value differs from eager's.")
    if ceiling:
        settings += (" floor = read student + teacher (+ write one gradient for fwd_bwd) per "
                     "call; floor GB/s = floor / time; of copy BW = that / copy bandwidth.")
    lines += [settings + f" Total {wall:.0f} s.", "", table(results, ceiling=ceiling), ""]
    for title, items in (("Headline", headline_lines(results)), ("Notes", notes),
                         ("Warnings (value mismatch)", warnings), ("Errors", errors)):
        if items:
            lines.append(f"{title}:")
            lines += ["- " + " / ".join(str(x).splitlines())[:600] for x in items]
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def plot(results: list[dict], path: str, device: str, info: dict) -> None:
    ok = [r for r in results if usable(r)]
    groups = sorted({case_id(r) for r in ok},
                    key=lambda k: (-k[0] * k[1], DTYPE_ORDER.get(k[2], 9), DIVERGENCES.index(k[3]),
                                   PASSES.index(k[4])))
    providers = sorted({r["provider"] for r in ok}, key=provider_order)
    idx = {case_id(r) + (r["provider"],): r for r in ok}
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
                    "(default cpu: 4096x32000:fp32,4096x32000:bf16,1024x32000:fp32; "
                    "cuda: 8192x128256:bf16 (fkl, jsd), 4096x32000:fp32 (fkl))")
    ap.add_argument("--divergences", help=f"comma list from {','.join(DIVERGENCES)} "
                    "(default: per shape, fkl,jsd at least)")
    ap.add_argument("--providers", default=None, help="comma list from kdops,liger,eager,compile "
                    "and kdops:<backend> (forces KDOPS_BACKEND, e.g. kdops:cuda,kdops:triton on a "
                    "GPU); default cpu: kdops,eager,compile (liger is CUDA only), cuda: "
                    "kdops:cuda,kdops:triton,liger,eager,compile; kdops and liger are skipped with "
                    "a note when not importable")
    ap.add_argument("--passes", default=",".join(PASSES), help="comma list from fwd,fwd_bwd")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i]")
    ap.add_argument("--out", help="JSON path (default bench/results/divergence_<device>.json; "
                    "with --quick, divergence_<device>_quick.json); the markdown table goes next "
                    "to it (.md)")
    ap.add_argument("--plot", help="PNG path (default: next to the JSON; needs matplotlib)")
    ap.add_argument("--no-plot", action="store_true", help="do not draw the PNG")
    ap.add_argument("--reps", type=int, help="timed reps per case (default: cpu 3 for N*V >= 2^26 "
                    "else 5; cuda 10 for N*V >= 2^28 else 20; quick 1)")
    ap.add_argument("--warmup", type=int, help="extra untimed calls after the first call")
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--beta", type=float, default=0.5, help="jsd mixture weight")
    ap.add_argument("--alpha", type=float, default=0.1, help="skew_fkl / skew_rkl weight")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend "
                    "(default inductor; aot_eager with --quick, to skip code generation)")
    ap.add_argument("--copy-bw", choices=("auto", "on", "off"), default="auto",
                    help="measure the copy-bandwidth ceiling (auto: on CUDA only)")
    ap.add_argument("--copy-mib", type=float, default=2048.0,
                    help="size of each copy buffer in MiB (default 2048)")
    ap.add_argument("--worker-timeout", type=float, default=None,
                    help="seconds per worker (default cpu 3600, cuda 300)")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds for the whole run; workers not started by then are skipped "
                    "(error rows) and a running one is stopped at it (default: 300 for the "
                    "default CUDA plan, else none)")
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

    cuda = is_cuda(args.device)
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda: torch.cuda.is_available() is False")
    if args.worker_timeout is None:
        args.worker_timeout = 300.0 if cuda else 3600.0
    if args.deadline is None:
        args.deadline = 300.0 if (cuda and not args.shapes and not args.quick) else 0.0
    dev_tag = args.device.split(":")[0]
    out = args.out or os.path.join(HERE, "results",
                                   f"divergence_{dev_tag}{'_quick' if args.quick else ''}.json")
    md_path = os.path.splitext(out)[0] + ".md"

    explicit = bool(args.providers)
    providers = (args.providers.split(",") if explicit
                 else list(DEFAULT_PROVIDERS["cuda" if cuda else "cpu"]))
    bad = {p for p in providers if p not in PROVIDERS and not p.startswith("kdops:")}
    if bad:
        ap.error(f"--providers: unknown {sorted(bad)}; expected from {list(PROVIDERS)} or "
                 "kdops:<backend> (cpu, cuda, triton, reference)")
    providers = list(dict.fromkeys(providers))  # no duplicates
    notes: list[str] = []
    unavailable: dict[str, str] = {}  # provider -> why it cannot run (its rows are errors)
    if any(p.split(":")[0] == "kdops" for p in providers):
        why = kdops_importable()
        if why is not None:
            msg = f"kdops is not importable ({why})"
            if explicit:  # asked for explicitly: keep it, the rows will show the error
                notes.append(msg)
            else:
                providers = [p for p in providers if p.split(":")[0] != "kdops"]
                notes.append(msg + ": kdops rows skipped")
            print("note: " + notes[-1], file=sys.stderr)
        elif cuda and "kdops:cuda" in providers:
            missing = kdops_cuda_missing()
            if missing is not None:
                unavailable["kdops:cuda"] = missing
    liger_version = None
    if "liger" in providers:
        if not cuda and not os.environ.get(LIGER_CPU_ENV):
            providers.remove("liger")
            notes.append("liger: Liger-Kernel runs CUDA tensors only: skipped on the CPU")
        else:
            why, liger_version = liger_probe()
            if why is not None:
                if explicit:
                    unavailable["liger"] = why
                    notes.append(f"liger: {why}")
                else:
                    providers.remove("liger")
                    notes.append(f"liger: {why}: skipped")
                print("note: " + notes[-1], file=sys.stderr)

    plan = build_plan(args)
    info = H.machine_info(args.device)
    kd = sys.modules.get("kdops")
    info["kdops"] = getattr(kd, "__version__", "unknown") if kd is not None else None
    info["liger_kernel"] = liger_version
    hwm_ok = cuda or H.cpu_hwm_resettable()
    if not hwm_ok:
        notes.append("peak RSS cannot be reset here: one worker per case, memory measured on the "
                     "first call (for compile, compilation included)")
    run_copy = args.copy_bw == "on" or (args.copy_bw == "auto" and cuda)
    passes = args.passes.split(",")

    def row(prov, spec, d, p, **extra):
        n, v, dt = parse_shape(spec)
        return dict(provider=prov, N=n, V=v, dtype=dt, divergence=d, pass_=p, **extra)

    # Rows written here rather than by a worker: n/a (Liger has no such loss) and providers that
    # cannot run at all. The rest is split into worker jobs.
    results: list[dict] = []
    runnable: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
    for prov in providers:
        runnable[prov] = []
        for spec, divs in plan:
            keep = []
            for d in divs:
                na = liger_na(d, parse_shape(spec)[2]) if prov == "liger" else None
                if na is not None:
                    results += [row(prov, spec, d, p, na=na) for p in passes]
                elif prov in unavailable:
                    results += [row(prov, spec, d, p, error=unavailable[prov]) for p in passes]
                else:
                    keep.append(d)
            if keep:
                runnable[prov].append((spec, tuple(keep)))

    # Worker jobs: the copy ceiling first; then one per provider and shape, shape by shape (so
    # that under the deadline the headline shape is complete first); quick: one per provider,
    # all shapes; without a resettable high-water mark, one per provider, shape, divergence, pass.
    jobs: list[dict] = []
    if run_copy:
        jobs.append(dict(provider=COPY_WORKER, specs="-", divs=(), passes=[], cases=[]))
    if args.quick and hwm_ok:
        for prov in providers:
            todo = runnable[prov]
            if todo:
                jobs.append(dict(provider=prov, passes=passes, divs=(),
                                 specs=",".join(f"{s}@{'+'.join(d)}" for s, d in todo),
                                 cases=[(s, d, p) for s, ds in todo for d in ds for p in passes]))
    else:
        for spec in dict.fromkeys(s for s, _ in plan):
            for prov in providers:
                for s, divs in runnable[prov]:
                    if s != spec:
                        continue
                    if hwm_ok:
                        jobs.append(dict(provider=prov, specs=spec, divs=divs, passes=passes,
                                         cases=[(spec, d, p) for d in divs for p in passes]))
                    else:
                        jobs += [dict(provider=prov, specs=spec, divs=(d,), passes=[p],
                                      cases=[(spec, d, p)]) for d in divs for p in passes]

    def worker_args(job):
        wargs = [job["provider"], job["specs"], "--passes", ",".join(job["passes"]) or "fwd",
                 "--device", args.device, "--temperature", str(args.temperature),
                 "--beta", str(args.beta), "--alpha", str(args.alpha), "--seed", str(args.seed),
                 "--compile-backend", args.compile_backend, "--copy-mib", str(args.copy_mib)]
        if job["divs"]:
            wargs += ["--divergences", ",".join(job["divs"])]
        if args.quick:
            wargs.append("--quick")
        if args.reps is not None:
            wargs += ["--reps", str(args.reps)]
        if args.warmup is not None:
            wargs += ["--warmup", str(args.warmup)]
        return wargs

    errors: list[str] = []
    copy: dict | None = None
    t_all = time.perf_counter()
    load_samples: list[float] = []  # 1-min load average after each worker
    for i, job in enumerate(jobs, 1):
        prov = job["provider"]
        label = f"[{i}/{len(jobs)}] {prov:12s} {job['specs']}"
        elapsed = time.perf_counter() - t_all
        if args.deadline and elapsed >= args.deadline:
            msg = f"not run: the run reached its deadline of {args.deadline:.0f} s (--deadline)"
            print(f"{label} {msg}", file=sys.stderr, flush=True)
            recs, err, took = [], msg, 0.0
        else:
            timeout = args.worker_timeout
            if args.deadline:
                timeout = min(timeout, args.deadline - elapsed)
            print(f"{label} ...", end="", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            recs, err = H.run_worker(os.path.abspath(__file__), worker_args(job), timeout=timeout)
            took = time.perf_counter() - t0
            print(f" {took:.0f} s", file=sys.stderr, flush=True)
            if err:
                errors.append(f"{prov} {job['specs']}: {err}")
                print(f"{prov} {job['specs']}: " + err.replace("\n", "\n  "), file=sys.stderr)
        if hasattr(os, "getloadavg"):
            load_samples.append(os.getloadavg()[0])
        if prov == COPY_WORKER:
            copy = next((r for r in recs if r.get("ceiling") == "copy"), None)
            if copy is None:
                copy = {"ceiling": "copy", "error": (err or "no result").splitlines()[0]}
            elif "error" in copy:
                errors.append(f"copy bandwidth: {copy['error']}")
            continue
        results += recs
        # A case the worker did not report (it crashed, timed out, or never ran) is an error row.
        got = {(f"{r['N']}x{r['V']}:{r['dtype']}", r["divergence"], r["pass_"]) for r in recs}
        why = ("no result: " + (err or "the worker ended without one").splitlines()[0])[:300]
        results += [row(prov, s, d, p, error=why) for s, d, p in job["cases"]
                    if (s, d, p) not in got]
    wall = time.perf_counter() - t_all

    add_speedups(results)
    warnings = cross_check(results)
    ceiling = run_copy
    if ceiling:
        add_ceilings(results, copy)
        info["copy_bandwidth_Bps"] = copy_bandwidth_of(copy)
    errors += grouped(results, "error")
    notes += grouped(results, "na")
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

    md = markdown_report(args, info, results, copy, ceiling, wall, notes, warnings, errors)
    payload = {
        "benchmark": "divergence",
        "op": "kdops.kd_loss",
        "machine": info,
        "config": {k: v for k, v in vars(args).items() if k != "worker"} | {
            "providers": providers, "plan": [[s, list(d)] for s, d in plan],
            "memory": "peak_bytes = input_bytes + (high-water mark - baseline with inputs "
                      "allocated); peak_ratio = peak_bytes / (input_bytes + grad_bytes)",
            "fwd": "no input requires grad", "fwd_bwd": "student requires grad, teacher detached",
            "bytes_floor": "input_bytes + grad_bytes (read student and teacher, write one "
                           "gradient for fwd_bwd); floor_Bps = bytes_floor / median_s; "
                           "frac_of_copy_bw = floor_Bps / ceilings.copy.bandwidth_Bps",
            "liger": "log_softmax(logits / T) in the inputs' dtype, then LigerKLDIVLoss("
                     "batchmean, log_target) (fkl), LigerJSD(beta) (jsd), LigerJSD(beta=1) "
                     "(rkl), LigerTVDLoss(batchmean) on softmax (tvd)",
        },
        "ceilings": {"copy": copy},
        "wall_s": wall,
        "notes": notes,
        "warnings": warnings,
        "errors": errors,
        "markdown": md_path,
        "results": [{("pass" if k == "pass_" else k): v for k, v in r.items()}
                    for r in sorted(results, key=lambda r: case_order(r)
                                    + provider_order(r["provider"]))],
    }
    H.write_json(out, payload)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(md_path)), exist_ok=True)
        with open(md_path, "w") as f:
            f.write(md)
    except OSError as e:
        print(f"could not write {md_path}: {e}", file=sys.stderr)
    if not args.no_plot and not args.quick:
        try:
            plot(results, args.plot or os.path.splitext(out)[0] + ".png", args.device, info)
        except Exception as e:  # a plot is never worth the run
            print(f"no plot: {type(e).__name__}: {e}")
    print(f"results: {out}")
    print(f"markdown: {md_path}")
    print()
    print(md, end="")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
