"""Benchmark of kdops.adaspec_loss (AdaSPEC's token-filtered distillation) against the eager
PyTorch form of the same step, and torch.compile of it.

The peer step (the released AdaSPECTrainer.compute_loss, github.com/yuezhouhu/adaspec): three
float32 log_softmax, two kl_div summed over the vocabulary, torch.quantile of the score
differences over the counted tokens, and the mean of the kept draft KLs. kdops reads the three
logit tensors once for both KLs, selects in O(N), and runs the fused forward-KL kernel on the kept
rows only (gradient stored in forward, zero rows elsewhere).

Each provider runs in its own process (bench/_harness.py): time of forward and of forward +
backward (median), and peak memory with the inputs included, as a ratio to inputs + one gradient
buffer. The floor of a fused step is reading the three tensors once (+ the kept fraction of draft
and target again and one gradient write); on CUDA, a device-to-device copy measured in the same
run gives the bandwidth, and each result is also reported as that floor's time over its own.

    python bench/bench_adaspec.py                   # CPU plan: 4096 x 32000 fp32
    python bench/bench_adaspec.py --quick           # CI smoke test (tiny shapes)
    python bench/bench_adaspec.py --device cuda     # GPU plan: 8192 x 32000 bf16

Targets: GPU >= 3x eager's speed at <= 1/3 of its peak memory; CPU >= 3x eager's speed.
Writes bench/results/adaspec_<device>[_quick].{json,md} (and a PNG unless --no-plot).
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402

PROVIDERS = {"cpu": "kdops,eager,compile", "cuda": "kdops:cuda,kdops:triton,eager,compile"}
PASSES = ("fwd", "fwd_bwd")
CPU_PLAN = ["4096x32000:fp32"]
GPU_PLAN = ["8192x32000:bf16"]
QUICK_PLAN = ["64x1000:fp32"]
COUNTED = 0.9  # share of tokens with a label (the rest are prompt / padding)


def parse_shape(spec: str) -> tuple[int, int, str]:
    dims, _, dtype = spec.partition(":")
    n, v = (int(x) for x in dims.split("x"))
    return n, v, dtype or "fp32"


# --------------------------------------------------------------------------------------------------
# The peer step


def eager_adaspec_loss(draft, reference, target, valid, fraction: float, temperature: float):
    import torch
    import torch.nn.functional as F

    log_p = torch.log_softmax(target.float() / temperature, dim=-1)
    p = log_p.exp()
    draft_kl = F.kl_div(torch.log_softmax(draft.float() / temperature, dim=-1), p, reduction="none").sum(-1)
    reference_kl = F.kl_div(torch.log_softmax(reference.float() / temperature, dim=-1), p,
                            reduction="none").sum(-1)
    scores = (draft_kl - reference_kl).detach()
    kept = valid & (scores >= torch.quantile(scores[valid], 1.0 - fraction))
    return (draft_kl * kept).sum() / kept.sum().clamp(min=1)


def make_loss_fn(provider: str, args):
    if provider.split(":")[0] == "kdops":  # kdops (default backend) or kdops:<backend>
        import kdops

        backend = provider.partition(":")[2] or None

        def fused(d, r, t, valid):
            with kdops.use_backend(backend) if backend else contextlib.nullcontext():
                return kdops.adaspec_loss(d, r, t, fraction=args.fraction, mask=valid,
                                          temperature=args.temperature)

        return fused
    if provider == "eager":
        return lambda d, r, t, valid: eager_adaspec_loss(d, r, t, valid, args.fraction, args.temperature)
    if provider == "compile":
        import torch

        compiled = torch.compile(eager_adaspec_loss, backend=args.compile_backend, dynamic=False)
        return lambda d, r, t, valid: compiled(d, r, t, valid, args.fraction, args.temperature)
    raise ValueError(provider)


# --------------------------------------------------------------------------------------------------
# Worker: one provider, every case of the plan


def worker_main(args) -> int:
    import torch

    provider = args.worker[0]
    device = args.device
    hwm_ok = device.startswith("cuda") or H.cpu_hwm_resettable()
    fn = make_loss_fn(provider, args)
    for spec in args.worker[1].split(","):
        n, v, dt = parse_shape(spec)
        gen = torch.Generator(device=device).manual_seed(args.seed)
        dtype = H.torch_dtype(dt)
        target = torch.randn(n, v, device=device, generator=gen) * 2.0
        # students: the target plus noise of a size that varies by token
        draft = (target + torch.randn(n, v, device=device, generator=gen)
                 * torch.rand(n, 1, device=device, generator=gen)).to(dtype)
        reference = (target + torch.randn(n, v, device=device, generator=gen)
                     * torch.rand(n, 1, device=device, generator=gen)).to(dtype)
        target = target.to(dtype)
        valid = torch.rand(n, device=device, generator=gen) < COUNTED
        input_bytes = 3 * draft.nbytes + valid.nbytes
        reps = args.reps or (1 if args.quick else (10 if device.startswith("cuda") else 3))
        for pass_ in PASSES:
            rec: dict[str, Any] = dict(provider=provider, N=n, V=v, dtype=dt, pass_=pass_,
                                       fraction=args.fraction, input_bytes=input_bytes,
                                       grad_bytes=draft.nbytes if pass_ == "fwd_bwd" else 0)
            rec["budget_bytes"] = rec["input_bytes"] + rec["grad_bytes"]
            try:
                rec.update(run_case(fn, draft, reference, target, valid, pass_, device, reps, hwm_ok))
                rec["peak_bytes"] = input_bytes + rec["mem_extra_bytes"]
                rec["peak_ratio"] = rec["peak_bytes"] / rec["budget_bytes"]
            except Exception as e:  # e.g. out of memory: a row with the error
                rec["error"] = H.error_text(e)
            H.emit_result(rec)
            gc.collect()
        del draft, reference, target, valid
        gc.collect()
    return 0


def run_case(fn, draft, reference, target, valid, pass_: str, device: str, reps: int, hwm_ok: bool):
    d = draft if pass_ == "fwd" else draft.detach().requires_grad_(True)

    def setup():
        d.grad = None

    def call():
        loss = fn(d, reference, target, valid)
        if pass_ == "fwd_bwd":
            loss.backward()
        return loss

    # the first call compiles (compile provider); its loss is cross-checked between providers
    return H.measure_call(call, setup=setup, device=device, reps=reps, memory_ok=hwm_ok,
                          first=lambda loss: {"loss": float(loss.detach().float())})


# --------------------------------------------------------------------------------------------------
# Parent: run the workers, report


def floor_bytes(r: dict) -> float:
    """Least traffic of the fused step: the three tensors once; with the gradient also the kept
    share of draft and target again and one gradient write."""
    elem = 4 if r["dtype"] == "fp32" else 2
    row = r["V"] * elem
    reads = 3 * r["N"] * row
    if r["pass_"] == "fwd_bwd":
        reads += 2 * r["fraction"] * COUNTED * r["N"] * row
        return reads + r["N"] * row
    return reads


def case_key(r: dict) -> tuple:
    return r["N"], r["V"], r["dtype"], r["pass_"]


def peak_over_eager(r: dict, base: dict | None) -> str:
    return H.fmt_ratio(r["peak_bytes"] / base["peak_bytes"] if base and base["peak_bytes"] else None)


def report(results: list[dict], copy: dict | None) -> tuple[list[str], list[list[str]]]:
    return H.speed_table(results, copy, case_key=case_key, floor_bytes=floor_bytes,
                         labels=[("case", lambda r: f"{r['N']}x{r['V']} {r['dtype']}")],
                         extras=[("peak/eager", peak_over_eager)])

def main(argv=None) -> int:
    ap = H.bench_parser(__doc__, plan_flag="--shapes", plan_help="comma list of NxV[:dtype]",
                        providers=PROVIDERS)
    ap.add_argument("--fraction", type=float, default=0.4)
    ap.add_argument("--temperature", type=float, default=1.0)
    args = H.parse_bench_args(ap, argv)
    if args.worker:
        return worker_main(args)

    cuda = args.device.startswith("cuda")
    plan, out = H.bench_plan(args, "adaspec", args.shapes, quick=QUICK_PLAN, cpu=CPU_PLAN,
                             gpu=GPU_PLAN)
    worker_args = H.common_worker_args(args)
    worker_args += ["--fraction", str(args.fraction), "--temperature", str(args.temperature)]

    copy = H.copy_bandwidth(args.device, int(args.copy_mib * 2**20)) if cuda else None
    providers = args.providers.split(",")
    results = H.run_providers(__file__, providers, plan, worker_args,
                              timeout=args.worker_timeout)

    headers, rows = report(results, copy)
    H.write_report(
        out, device=args.device, results=results, headers=headers, rows=rows, extra={"copy": copy},
        title="adaspec_loss benchmark",
        intro=f"fraction={args.fraction}, {COUNTED:.0%} of tokens counted. Times are medians; "
              "`vs eager` is the speedup over the eager PyTorch step in the same run; peak includes "
              "the inputs, budget = inputs + one gradient buffer.",
        plot=not args.no_plot, plot_title="adaspec_loss", providers=providers, case_key=case_key,
        case_label=lambda g: "{}x{} {} {}".format(*g))
    return 0


if __name__ == "__main__":
    sys.exit(main())
