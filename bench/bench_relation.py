"""Benchmark of kdops.relation_kd_loss (token relation distillation, TRG / relation KD) against
the PyTorch code that computes it today, eager and under torch.compile.

The peer pipeline materializes the relation matrices: L2-normalize the tokens, R = F F^T / tau
per sequence ([B, N, N] for student and teacher), log_softmax over each row, then KL(p || q) per
row (kl), the mean squared difference of the softmaxes (mse), or logsumexp - diagonal of the
cross matrix (infonce), averaged over the tokens. kdops forms the relations a block of rows at a
time (block x N strips, never N x N) and recomputes them in backward from per-row statistics.

Passes: ``fwd`` (nothing requires grad) and ``fwd_bwd`` (forward + backward, the student's
features require grad, the teacher is detached). Each provider runs each case in a process of its
own (bench/_harness.py), a case's providers one after the other: median time and peak memory with
the inputs included; ``vs eager`` columns are ratios to eager's time and memory in the same run. Cases whose [B, N, N] matrices would not fit
in memory (estimated below) run kdops only.

    python bench/bench_relation.py                    # CPU plan (includes B=2, N=2048, D=256 fp32)
    python bench/bench_relation.py --quick            # CI smoke test (tiny shapes, a few seconds)
    python bench/bench_relation.py --device cuda      # GPU plan: B=8, N=4096, D=768 bf16; N=16384

Writes bench/results/relation_<device>[_quick].{json,md} (and a PNG unless --no-plot).
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402

PROVIDERS = {"cpu": "kdops,eager,compile", "cuda": "kdops,eager,compile"}
PASSES = ("fwd", "fwd_bwd")
# BxNxD:dtype:kind[:raw]; raw: normalize=False (every provider skips the L2 normalization, as TRG's
# contextual loss does). The first two are the CPU target (at least eager's speed at 1/10 of its
# peak memory, forward + backward).
CPU_PLAN = [
    "2x2048x256:fp32:kl", "2x2048x256:fp32:kl:raw", "2x2048x256:fp32:mse", "2x2048x256:fp32:infonce",
    "2x2048x256:bf16:kl", "2x512x64:fp32:kl", "2x1024x1024:fp32:kl", "1x8192x64:fp32:kl",
    "1x16384x64:fp32:kl",
]
GPU_PLAN = ["8x4096x768:bf16:kl", "8x4096x768:bf16:mse", "8x4096x768:bf16:infonce", "1x16384x768:bf16:kl"]
QUICK_PLAN = ["2x64x16:fp32:kl", "2x64x16:fp32:infonce"]
# tau: 0.5 on L2-normalized tokens; sqrt(D) on raw ones (TRG's contextual loss), where 0.5 would
# make every softmax one-hot.
NORMALIZED_TEMPERATURE = 0.5


def temperature(d: int, normalize: bool) -> float:
    return NORMALIZED_TEMPERATURE if normalize else d**0.5
# glibc serves allocations below its mmap threshold from the heap and, after the warm-up call has
# freed blocks of every size the call needs (the threshold rises up to 32 MiB as mmapped blocks
# are freed), reuses pages that are already resident: the RSS peak would then miss most of a
# call's allocations. A fixed 64 KiB threshold maps every larger block on its own and returns it
# when freed, so the RSS peak follows the live memory; the peers' big temporaries are mapped
# either way, so timings barely move.
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
# The peers hold about this many [B, N, N] float32 matrices at their peak (forward + backward:
# two relations, two log-softmaxes, their exponentials and products, and the gradients).
PEER_MATRICES = 12


def parse_case(spec: str) -> tuple[int, int, int, str, str, bool]:
    """"BxNxD[:dtype[:kind[:raw]]]" -> (B, N, D, dtype, kind, normalize)."""
    dims, *rest = spec.split(":")
    dtype, kind, raw = (rest + ["fp32", "kl", ""][len(rest):])[:3]
    if raw not in ("", "raw"):
        raise ValueError(f"the fourth field of a case is 'raw' or nothing; got {spec!r}")
    b, n, d = (int(x) for x in dims.split("x"))
    return b, n, d, dtype, kind, raw != "raw"


def peer_fits(b: int, n: int, device: str) -> bool:
    """Whether eager / compile can materialize the case's relations in this machine's memory."""
    need = PEER_MATRICES * b * n * n * 4
    if device.startswith("cuda"):
        import torch

        return need < 0.8 * torch.cuda.get_device_properties(device).total_memory
    with open("/proc/meminfo") as f:
        total = int(f.readline().split()[1]) * 1024
    return need < 0.5 * total


# --------------------------------------------------------------------------------------------------
# The peer pipeline


def eager_relation_loss(student, teacher, kind: str, normalize: bool, tau: float):
    import torch
    import torch.nn.functional as F

    fs, ft = student.float(), teacher.float()
    if normalize:
        fs, ft = F.normalize(fs, dim=-1), F.normalize(ft, dim=-1)
    if kind == "infonce":
        c = fs @ ft.transpose(1, 2) / tau
        return (torch.logsumexp(c, -1) - c.diagonal(dim1=-2, dim2=-1)).mean()
    log_q = torch.log_softmax(fs @ fs.transpose(1, 2) / tau, -1)
    log_p = torch.log_softmax(ft @ ft.transpose(1, 2) / tau, -1)
    if kind == "kl":
        return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1).mean()
    return ((log_p.exp() - log_q.exp()) ** 2).mean(-1).mean()


def make_loss_fn(provider: str, args):
    if provider.split(":")[0] == "kdops":  # kdops (default backend) or kdops:<backend>
        import kdops

        backend = provider.partition(":")[2] or None

        def fused(student, teacher, kind, normalize, tau):
            with kdops.use_backend(backend) if backend else contextlib.nullcontext():
                return kdops.relation_kd_loss(student, teacher, kind=kind, temperature=tau, normalize=normalize)

        return fused
    if provider == "eager":
        return eager_relation_loss
    if provider == "compile":
        import torch

        return torch.compile(eager_relation_loss, backend=args.compile_backend, dynamic=False)
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
        b, n, d, dt, kind, normalize = parse_case(spec)
        if provider != "kdops" and not provider.startswith("kdops:") and not peer_fits(b, n, device):
            continue
        gen = torch.Generator(device=device).manual_seed(args.seed)
        student = torch.randn(b, n, d, device=device, generator=gen).to(H.torch_dtype(dt))
        teacher = torch.randn(b, n, d, device=device, generator=gen).to(H.torch_dtype(dt))
        input_bytes = student.nbytes + teacher.nbytes
        big = b * n * n * d > 2**36  # tens of seconds per call on a small CPU
        reps = args.reps or (1 if args.quick or big else (10 if device.startswith("cuda") else 3))
        for pass_ in PASSES:
            tau = temperature(d, normalize)
            rec: dict[str, Any] = dict(provider=provider, B=b, N=n, D=d, dtype=dt, kind=kind,
                                       normalize=normalize, temperature=tau, pass_=pass_, input_bytes=input_bytes)
            try:
                rec.update(run_case(lambda s, t: fn(s, t, kind, normalize, tau), student, teacher, pass_,
                                    device, reps, hwm_ok, warmup=0 if big else 1))
                rec["peak_bytes"] = input_bytes + rec["mem_extra_bytes"]
            except Exception as e:  # e.g. out of memory: a row with the error
                rec["error"] = H.error_text(e)
            H.emit_result(rec)
            gc.collect()
        del student, teacher
        gc.collect()
    return 0


def run_case(fn, student, teacher, pass_: str, device: str, reps: int, hwm_ok: bool, warmup: int):
    s = student if pass_ == "fwd" else student.detach().requires_grad_(True)

    def setup():
        s.grad = None

    def call():
        loss = fn(s, teacher)
        if pass_ == "fwd_bwd":
            loss.backward()
        return loss

    # the first call compiles (compile provider); the loss is cross-checked between providers
    return H.measure_call(call, setup=setup, device=device, reps=reps, memory_ok=hwm_ok, warmup=warmup,
                          first=lambda loss: {"loss": float(loss.detach().float())})


# --------------------------------------------------------------------------------------------------
# Parent: run the workers, report


def case_key(r: dict) -> tuple:
    return r["B"], r["N"], r["D"], r["dtype"], r["kind"], r["normalize"], r["pass_"]


def case_name(r: dict) -> str:
    raw = "" if r["normalize"] else " raw"
    return f"{r['B']}x{r['N']}x{r['D']} {r['dtype']} {r['kind']}{raw}"


def case_key_label(key: tuple) -> str:
    b, n, d, dt, kind, normalize, pass_ = key
    return f"{case_name(dict(B=b, N=n, D=d, dtype=dt, kind=kind, normalize=normalize))} {pass_}"


def report(results: list[dict]) -> tuple[list[str], list[list[str]]]:
    eager = {case_key(r): r for r in results if r["provider"] == "eager" and "error" not in r}
    headers = ["case", "pass", "provider", "time", "speed vs eager", "peak MiB", "peak vs eager",
               "extra vs eager", "loss"]
    rows = []
    for r in sorted(results, key=lambda r: (case_key(r), r["provider"])):
        case = case_name(r)
        if "error" in r:
            rows.append([case, r["pass_"], r["provider"], r["error"][:60]] + [""] * (len(headers) - 4))
            continue
        base = eager.get(case_key(r))
        speed = base["median_s"] / r["median_s"] if base else None
        peak = r["peak_bytes"] / base["peak_bytes"] if base and base.get("peak_bytes") else None
        extra = r["mem_extra_bytes"] / base["mem_extra_bytes"] if base and base.get("mem_extra_bytes") else None
        rows.append([case, r["pass_"], r["provider"], H.fmt_time(r["median_s"]), H.fmt_ratio(speed),
                     H.fmt_mb(r["peak_bytes"]), H.fmt_ratio(peak, 3), H.fmt_ratio(extra, 3), f"{r['loss']:.6g}"])
    return headers, rows


def main(argv=None) -> int:
    ap = H.bench_parser(__doc__, plan_flag="--cases", plan_help="comma list of BxNxD:dtype:kind",
                        providers=PROVIDERS, copy=False,
                        worker_scope="worker, one case of one provider")
    args = H.parse_bench_args(ap, argv)
    if args.worker:
        return worker_main(args)

    cuda = args.device.startswith("cuda")
    plan, out = H.bench_plan(args, "relation", args.cases, quick=QUICK_PLAN, cpu=CPU_PLAN,
                             gpu=GPU_PLAN)
    worker_args = H.common_worker_args(args)

    # One worker per (case, provider), the providers of a case back to back: on a shared machine
    # the background load drifts over minutes, and a case's providers should see the same one.
    results: list[dict] = []
    for spec in plan:
        for provider in args.providers.split(","):
            records, error = H.run_worker(__file__, [provider, spec, *worker_args],
                                          timeout=args.worker_timeout,
                                          env=None if cuda else WORKER_ENV)
            results += records
            if error:
                print(f"note: {provider} {spec}: {error}", file=sys.stderr)

    headers, rows = report(results)
    H.write_report(
        out, device=args.device, results=results, headers=headers, rows=rows,
        title="relation_kd_loss benchmark",
        intro="Times are medians; `speed vs eager` is eager's time over the provider's; `peak` is the "
              "memory a call needs with its inputs included, `extra` the same without them (both as "
              "ratios to eager's in the same run). "
              f"L2-normalized tokens at tau = {NORMALIZED_TEMPERATURE} (`raw`: not normalized, tau = "
              "sqrt(D)), mean over tokens; "
              "fwd_bwd: the student requires grad. Eager and compile materialize [B, N, N] relations "
              "and are left out where those would not fit in memory. `loss` is equal across "
              "providers.",
        plot=not args.no_plot, plot_title="relation_kd_loss", providers=args.providers.split(","),
        case_key=case_key, case_label=case_key_label)
    return 0


if __name__ == "__main__":
    sys.exit(main())
