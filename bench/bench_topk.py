"""Benchmark of kdops.topk_kd_loss (sparse top-k teacher KD) against the PyTorch pipeline that
top-k distillation code uses today, eager and under torch.compile.

The peer pipeline (as in axolotl's and TRL's top-k KD losses): upcast the student logits to
float32, log_softmax over the full vocabulary, gather at the teacher's ids, renormalize the
teacher's K log-probabilities, and sum the divergence over K. kdops computes the same loss in one
fused sweep and stores the gradient in forward.

Each provider runs in its own process (bench/_harness.py): time of forward and of forward +
backward (median), and peak memory with the inputs included, as a ratio to inputs + one gradient
buffer. The floor of a fused kernel is reading the student logits once and writing their gradient
once (forward only: reading them once); on CUDA, a device-to-device copy measured in the same run
gives the bandwidth, and each result is also reported as that floor's time over its own.

    python bench/bench_topk.py                      # CPU default plan
    python bench/bench_topk.py --quick              # CI smoke test (tiny shapes)
    python bench/bench_topk.py --device cuda        # GPU plan: 8192 x 128256 bf16, K = 64

Writes bench/results/topk_<device>[_quick].{json,md} (and a PNG unless --no-plot).
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
CPU_PLAN = ["4096x32000x64:fp32", "4096x32000x64:bf16"]
GPU_PLAN = ["8192x128256x64:bf16", "1024x128256x64:bf16"]
QUICK_PLAN = ["64x1000x16:fp32"]
DIVERGENCES = ("fkl", "jsd")


def parse_shape(spec: str) -> tuple[int, int, int, str]:
    dims, _, dtype = spec.partition(":")
    n, v, k = (int(x) for x in dims.split("x"))
    return n, v, k, dtype or "fp32"


# --------------------------------------------------------------------------------------------------
# The peer pipeline


def eager_topk_loss(student, ids, logprobs, divergence: str, temperature: float, beta: float):
    import torch

    b = torch.log_softmax(logprobs / temperature, dim=-1)
    p = b.exp()
    a = student.float() / temperature
    if divergence == "fkl":
        lq = torch.log_softmax(a, dim=-1).gather(-1, ids)
        rows = (p * (b - lq)).sum(-1)
    else:  # jsd on the K support, the student renormalized over the ids
        lq = torch.log_softmax(a.gather(-1, ids), dim=-1)
        q = lq.exp()
        lm = torch.log(beta * p + (1 - beta) * q)
        rows = beta * (p * (b - lm)).sum(-1) + (1 - beta) * (q * (lq - lm)).sum(-1)
    return rows.mean()


def make_loss_fn(provider: str, divergence: str, args):
    if provider.split(":")[0] == "kdops":  # kdops (default backend) or kdops:<backend>
        import kdops

        backend = provider.partition(":")[2] or None

        def fused(s, ids, lp):
            with kdops.use_backend(backend) if backend else contextlib.nullcontext():
                return kdops.topk_kd_loss(s, ids, lp, divergence=divergence,
                                          temperature=args.temperature, beta=args.beta)

        return fused
    if provider == "eager":
        return lambda s, ids, lp: eager_topk_loss(s, ids, lp, divergence, args.temperature, args.beta)
    if provider == "compile":
        import torch

        compiled = torch.compile(eager_topk_loss, backend=args.compile_backend, dynamic=False)
        return lambda s, ids, lp: compiled(s, ids, lp, divergence, args.temperature, args.beta)
    raise ValueError(provider)


# --------------------------------------------------------------------------------------------------
# Worker: one provider, every case of the plan


def worker_main(args) -> int:
    import torch

    provider = args.worker[0]
    device = args.device
    hwm_ok = device.startswith("cuda") or H.cpu_hwm_resettable()
    for spec in args.worker[1].split(","):
        n, v, k, dt = parse_shape(spec)
        gen = torch.Generator(device=device).manual_seed(args.seed)
        student = (torch.randn(n, v, device=device, generator=gen) * 2.0).to(H.torch_dtype(dt))
        teacher = torch.randn(n, v, device=device, generator=gen) * 2.0
        logprobs, ids = torch.log_softmax(teacher, -1).topk(k, dim=-1)
        del teacher
        input_bytes = student.nbytes + ids.nbytes + logprobs.nbytes
        reps = args.reps or (1 if args.quick else (10 if device.startswith("cuda") else 3))
        for divergence in DIVERGENCES:
            fn = make_loss_fn(provider, divergence, args)
            for pass_ in PASSES:
                rec: dict[str, Any] = dict(provider=provider, N=n, V=v, K=k, dtype=dt,
                                           divergence=divergence, pass_=pass_,
                                           input_bytes=input_bytes,
                                           grad_bytes=student.nbytes if pass_ == "fwd_bwd" else 0)
                rec["budget_bytes"] = rec["input_bytes"] + rec["grad_bytes"]
                try:
                    rec.update(run_case(fn, student, ids, logprobs, pass_, device, reps, hwm_ok))
                    rec["peak_bytes"] = input_bytes + rec["mem_extra_bytes"]
                    rec["peak_ratio"] = rec["peak_bytes"] / rec["budget_bytes"]
                except Exception as e:  # e.g. out of memory: a row with the error
                    rec["error"] = H.error_text(e)
                H.emit_result(rec)
                gc.collect()
        del student, ids, logprobs
        gc.collect()
    return 0


def run_case(fn, student, ids, logprobs, pass_: str, device: str, reps: int, hwm_ok: bool):
    s = student if pass_ == "fwd" else student.detach().requires_grad_(True)

    def setup():
        s.grad = None

    def call():
        loss = fn(s, ids, logprobs)
        if pass_ == "fwd_bwd":
            loss.backward()
        return loss

    # the first call compiles (compile provider); its loss is cross-checked between providers
    return H.measure_call(call, setup=setup, device=device, reps=reps, memory_ok=hwm_ok,
                          first=lambda loss: {"loss": float(loss.detach().float())})


# --------------------------------------------------------------------------------------------------
# Parent: run the workers, report


def floor_bytes(r: dict) -> int:
    """Least traffic of a fused kernel: read the student once (+ write its gradient)."""
    elem = 4 if r["dtype"] == "fp32" else 2
    return r["N"] * r["V"] * elem * (2 if r["pass_"] == "fwd_bwd" else 1)


def case_key(r: dict) -> tuple:
    return r["N"], r["V"], r["K"], r["dtype"], r["divergence"], r["pass_"]


def report(results: list[dict], copy: dict | None) -> tuple[list[str], list[list[str]]]:
    return H.speed_table(results, copy, case_key=case_key, floor_bytes=floor_bytes, labels=[
        ("case", lambda r: f"{r['N']}x{r['V']} K={r['K']} {r['dtype']}"),
        ("divergence", lambda r: r["divergence"])])

def main(argv=None) -> int:
    ap = H.bench_parser(__doc__, plan_flag="--shapes", plan_help="comma list of NxVxK[:dtype]",
                        providers=PROVIDERS, worker_timeouts={"cpu": 3600, "cuda": 60})
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--beta", type=float, default=0.5)
    args = H.parse_bench_args(ap, argv)
    if args.worker:
        return worker_main(args)

    cuda = args.device.startswith("cuda")
    plan, out = H.bench_plan(args, "topk", args.shapes, quick=QUICK_PLAN, cpu=CPU_PLAN,
                             gpu=GPU_PLAN)
    worker_args = H.common_worker_args(args)
    worker_args += ["--temperature", str(args.temperature), "--beta", str(args.beta)]

    copy = H.copy_bandwidth(args.device, int(args.copy_mib * 2**20)) if cuda else None
    providers = args.providers.split(",")
    results = H.run_providers(__file__, providers, plan, worker_args,
                              timeout=args.worker_timeout)

    headers, rows = report(results, copy)
    H.write_report(
        out, device=args.device, results=results, headers=headers, rows=rows, extra={"copy": copy},
        title="topk_kd_loss benchmark",
        intro="Times are medians; `vs eager` is the speedup over the eager PyTorch pipeline in the "
              "same run; peak includes the inputs, budget = inputs + one gradient buffer.",
        plot=not args.no_plot, plot_title="topk_kd_loss", providers=providers, case_key=case_key,
        case_label=lambda g: "{}x{} K{} {} {} {}".format(*g))
    return 0


if __name__ == "__main__":
    sys.exit(main())
