"""Benchmark of the Gromov-Wasserstein approximations: kdops.gw_1d and kdops.sorted_gw.

gw_1d (two uniform n-point samples on the line, float32) against:
  - quadratic: the same two monotone matchings evaluated by the direct O(n^2) double sum, where
    its [n, n] matrices fit (n <= 4096);
  - pot: POT's ot.gromov_wasserstein2 (a local solver over couplings, O(n^3) per iteration) on
    the [n, n] cost matrices, small n only, when POT is installed; reported with the value it
    reaches (lower is better: gw_1d is an upper bound on the GW value over permutations);
  - compile: torch.compile of kdops.gw_1d.
sorted_gw (B rows of V node features each side, the InfiGFusion shape B = 8, V = 128256) against
the eager code such a method would write (sort both rows, zero-pad, L1) and its torch.compile.

Each provider runs in its own process (bench/_harness.py): time of forward and of forward +
backward (median), peak memory with the inputs included, and the value reached.

    python bench/bench_gw.py                  # CPU default plan
    python bench/bench_gw.py --quick          # CI smoke test
    python bench/bench_gw.py --device cuda    # GPU plan

Writes bench/results/gw_<device>[_quick].{json,md} (and a PNG unless --no-plot).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PROVIDERS = "kdops,compile,eager,quadratic,pot"
PLAN = ["gw_1d:100", "gw_1d:1000", "gw_1d:10000", "gw_1d:100000", "gw_1d:1000000",
        "sorted_gw:8x128256"]
QUICK_PLAN = ["gw_1d:100", "gw_1d:1000", "gw_1d:1000000", "sorted_gw:2x1000"]
QUADRATIC_MAX_N = 4096
POT_MAX_N = 1000


def parse_case(spec: str) -> tuple[str, int, int]:
    """'gw_1d:N' -> ('gw_1d', 1, N); 'sorted_gw:BxV' -> ('sorted_gw', B, V)."""
    op, _, dims = spec.partition(":")
    if op == "gw_1d":
        return op, 1, int(dims)
    b, v = (int(s) for s in dims.split("x"))
    return op, b, v


def supports(provider: str, op: str, n: int) -> bool:
    if provider == "quadratic":
        return op == "gw_1d" and n <= QUADRATIC_MAX_N
    if provider == "pot":
        return op == "gw_1d" and n <= POT_MAX_N
    if provider == "eager":
        return op == "sorted_gw"
    return True


# --------------------------------------------------------------------------------------------------
# The peers


def eager_sorted_gw(f_s, f_t):
    import torch
    import torch.nn.functional as F

    n = max(f_s.shape[-1], f_t.shape[-1])
    g_s = torch.sort(f_s.float(), dim=-1, descending=True).values
    g_t = torch.sort(f_t.float(), dim=-1, descending=True).values
    g_s = F.pad(g_s, (0, n - g_s.shape[-1]))
    g_t = F.pad(g_t, (0, n - g_t.shape[-1]))
    return (g_s - g_t).abs().sum(-1).mean()


def quadratic_gw_1d(x, y):
    """The monotone matchings' cost by the direct double sum over [n, n] distance matrices."""
    import torch

    def cost(a, b):
        da = (a[:, None] - a[None, :]).square()
        db = (b[:, None] - b[None, :]).square()
        return (da - db).square().sum() / a.shape[0] ** 2

    xs, ys = torch.sort(x).values, torch.sort(y).values
    return torch.minimum(cost(xs, ys), cost(xs, ys.flip(0)))


def pot_gw(x, y):
    import numpy as np
    import ot
    import torch

    n = x.shape[0]
    uniform = np.full(n, 1.0 / n)
    c_x = (x[:, None] - x[None, :]).square().double().cpu().numpy()
    c_y = (y[:, None] - y[None, :]).square().double().cpu().numpy()
    return torch.tensor(ot.gromov_wasserstein2(c_x, c_y, uniform, uniform, loss_fun="square_loss"))


def make_fn(provider: str, op: str, args):
    import torch

    import kdops

    ours = kdops.gw_1d if op == "gw_1d" else (lambda a, b: kdops.sorted_gw(a, b))
    if provider == "kdops":
        return ours
    if provider == "compile":
        return torch.compile(ours, backend=args.compile_backend, dynamic=False)
    return {"eager": eager_sorted_gw, "quadratic": quadratic_gw_1d, "pot": pot_gw}[provider]


# --------------------------------------------------------------------------------------------------
# Worker: one provider, every case of the plan it supports


def worker_main(args) -> int:
    import torch

    provider, device = args.worker[0], args.device
    hwm_ok = device.startswith("cuda") or H.cpu_hwm_resettable()
    for spec in args.worker[1].split(","):
        op, b, n = parse_case(spec)
        if not supports(provider, op, n):
            continue
        gen = torch.Generator(device=device).manual_seed(args.seed)
        shape = (n,) if op == "gw_1d" else (b, n)
        a = torch.randn(*shape, device=device, generator=gen)
        c = torch.randn(*shape, device=device, generator=gen) * 2.0
        reps = args.reps or (1 if args.quick else (10 if device.startswith("cuda") else 3))
        fn = make_fn(provider, op, args)
        passes = ("fwd",) if provider == "pot" else ("fwd", "fwd_bwd")
        for pass_ in passes:
            rec: dict[str, Any] = dict(provider=provider, op=op, B=b, n=n, pass_=pass_,
                                       input_bytes=a.nbytes + c.nbytes)
            try:
                rec.update(run_case(fn, a, c, pass_, device, reps, hwm_ok))
                rec["peak_bytes"] = rec["input_bytes"] + rec["mem_extra_bytes"]
            except Exception as e:  # e.g. out of memory: a row with the error
                rec["error"] = H.error_text(e)
            H.emit_result(rec)
            gc.collect()
    return 0


def run_case(fn, a, c, pass_: str, device: str, reps: int, hwm_ok: bool) -> dict[str, Any]:
    # both sides require grad in fwd_bwd: the mutual-distillation case, the most work
    a = a if pass_ == "fwd" else a.detach().requires_grad_(True)
    c = c if pass_ == "fwd" else c.detach().requires_grad_(True)

    def setup():
        a.grad = c.grad = None

    def call():
        value = fn(a, c)
        if pass_ == "fwd_bwd":
            value.sum().backward()
        return value

    # the first call compiles (compile provider)
    return H.measure_call(call, setup=setup, device=device, reps=reps, memory_ok=hwm_ok,
                          first=lambda value: {"value": float(value.detach().double().sum())})


# --------------------------------------------------------------------------------------------------
# Parent: run the workers, report


def case_label(r: dict) -> str:
    return f"gw_1d n={r['n']}" if r["op"] == "gw_1d" else f"sorted_gw {r['B']}x{r['n']}"


def case_key(r: dict) -> tuple:
    return r["op"], r["B"], r["n"], r["pass_"]


def case_key_label(key: tuple) -> str:
    op, b, n, pass_ = key
    return f"{case_label(dict(op=op, B=b, n=n))} {pass_}"


def report(results: list[dict]) -> tuple[list[str], list[list[str]]]:
    ours = {case_key(r): r for r in results if r["provider"] == "kdops" and "error" not in r}
    headers = ["case", "pass", "provider", "time", "kdops speedup", "peak", "value",
               "value - kdops"]
    rows = []
    for r in results:
        if "error" in r:
            rows.append([case_label(r), r["pass_"], r["provider"], r["error"][:60], "", "", "", ""])
            continue
        base = ours.get(case_key(r))
        speedup = r["median_s"] / base["median_s"] if base else None
        gap = f"{r['value'] - base['value']:+.3g}" if base else ""
        rows.append([case_label(r), r["pass_"], r["provider"], H.fmt_time(r["median_s"]),
                     H.fmt_ratio(speedup), H.fmt_mb(r["peak_bytes"]), f"{r['value']:.6g}", gap])
    return headers, rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="small cases, one rep (CI smoke test)")
    ap.add_argument("--cases", help="comma list of gw_1d:N and sorted_gw:BxV")
    ap.add_argument("--providers", help=f"comma list of {PROVIDERS} (default: all)")
    ap.add_argument("--reps", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile-backend", default=None)
    ap.add_argument("--worker-timeout", type=float, default=None,
                    help="seconds per provider's worker (default cpu 1800, cuda 120)")
    ap.add_argument("--out")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.compile_backend is None:
        args.compile_backend = "aot_eager" if args.quick else "inductor"
    if args.worker:
        return worker_main(args)

    cuda = args.device.startswith("cuda")
    providers = (args.providers or PROVIDERS).split(",")
    if "pot" in providers and not _pot_installed():
        print("note: POT is not installed (pip install pot): no pot rows", file=sys.stderr)
        providers.remove("pot")
    plan = args.cases.split(",") if args.cases else (QUICK_PLAN if args.quick else PLAN)
    tag = args.device.split(":")[0] + ("_quick" if args.quick else "")
    out = args.out or os.path.join(HERE, "results", f"gw_{tag}.json")
    results = H.run_providers(__file__, providers, plan, H.common_worker_args(args),
                              timeout=args.worker_timeout or (120 if cuda else 1800))

    headers, rows = report(results)
    H.write_report(
        out, device=args.device, results=results, headers=headers, rows=rows,
        title="gw_1d / sorted_gw benchmark",
        intro="Times are medians; `kdops speedup` is the provider's time over kdops' in the same "
              "run; peak includes the inputs; `value` is the loss reached (gw_1d: lower is "
              "better, ours is an upper bound on the GW value over permutations).",
        plot=not args.no_plot, plot_title="GW approximations", providers=providers,
        case_key=case_key, case_label=case_key_label)
    return 0


def _pot_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("ot") is not None


if __name__ == "__main__":
    sys.exit(main())
