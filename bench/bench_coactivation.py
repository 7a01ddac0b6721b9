"""Benchmark of kdops.coactivation_features inside InfiGFusion's graph-on-logits term (GLD):
sorted_gw between the top-k co-activation node features of a student and of a teacher.

The step timed: f_s = coactivation_features(student), f_t = coactivation_features(teacher)
(k = 10, tau = 1, normalized, the first T/8 positions of every sequence masked as a prompt), then
sorted_gw(f_s, f_t). Providers:
  - kdops (or kdops:<backend>): the fused ops; the logits are read once per model and, for the
    student's gradient, written once;
  - eager: the PyTorch a method would write today: softmax in float32, topk, the kept values times
    their sum scattered with scatter_add, then sort + L1 (the eager sorted_gw);
  - compile: torch.compile of the eager code;
  - graph: the co-activation graph materialized ([B, V, V] from the dense top-k vectors) and its
    row sums, where it fits (B V^2 float32 under --graph-gib).

Passes: ``fwd`` (nothing requires grad) and ``fwd_bwd`` (the student's logits require grad;
backward of the loss). Each provider runs in its own process (bench/_harness.py): median time,
peak memory with the inputs included and its ratio to inputs + one gradient buffer (fwd: the
inputs), and the loss value (equal across providers up to ties among the k-th logits). The floor
of a fused step is reading both logits once (+ writing the student's gradient once); on CUDA a
device-to-device copy measured in the same run gives the bandwidth, and each result is also
reported as that floor's time over its own.

    python bench/bench_coactivation.py                    # CPU default plan (a couple of minutes)
    python bench/bench_coactivation.py --quick --no-plot  # CI smoke test (tiny shapes)
    python bench/bench_coactivation.py --device cuda      # GPU plan: 8 x 2048 x 128256 bf16, k = 10

Writes bench/results/coactivation_<device>[_quick].{json,md} (and a PNG unless --no-plot).
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402

PROVIDERS = {"cpu": "kdops,eager,compile,graph", "cuda": "kdops:cuda,kdops:triton,eager,compile,graph"}
PASSES = ("fwd", "fwd_bwd")
CPU_PLAN = ["2x512x32000:fp32:10", "2x512x32000:bf16:10", "2x256x4096:fp32:10"]
GPU_PLAN = ["8x2048x128256:bf16:10", "8x2048x32000:bf16:10", "8x512x8192:bf16:10"]
QUICK_PLAN = ["2x32x1000:fp32:10"]
TEMPERATURE = 1.0


def parse_case(spec: str) -> tuple[int, int, int, str, int]:
    """'BxTxV[:dtype[:k]]' -> (B, T, V, dtype, k)."""
    dims, _, rest = spec.partition(":")
    dtype, _, k = rest.partition(":")
    b, t, v = (int(x) for x in dims.split("x"))
    return b, t, v, dtype or "fp32", int(k or 10)


# --------------------------------------------------------------------------------------------------
# The peers


def eager_features(logits, k, mask):
    """Top-k co-activation node features as PyTorch code writes them: [B, V] float32."""
    import torch

    probs = torch.softmax(logits.float() / TEMPERATURE, dim=-1)
    values, ids = probs.topk(k, dim=-1)
    values = values * mask.unsqueeze(-1)
    terms = values * values.sum(-1, keepdim=True)
    features = torch.zeros(logits.shape[0], logits.shape[-1], device=logits.device)
    features = features.scatter_add(1, ids.flatten(1), terms.flatten(1))
    return features / mask.sum(1, keepdim=True).clamp_min(1)


def graph_features(logits, k, mask):
    """The same from the materialized graph A_b = sum_t x~_t x~_t^T (B x V x V): its row sums."""
    import torch

    probs = torch.softmax(logits.float() / TEMPERATURE, dim=-1)
    values, ids = probs.topk(k, dim=-1)
    kept = torch.zeros_like(probs).scatter(-1, ids, values) * mask.unsqueeze(-1)
    graph = torch.einsum("btv,btw->bvw", kept, kept)
    return graph.sum(-1) / mask.sum(1, keepdim=True).clamp_min(1)


def eager_sorted_gw(f_s, f_t):
    import torch

    g_s = torch.sort(f_s, dim=-1, descending=True).values
    g_t = torch.sort(f_t, dim=-1, descending=True).values
    return (g_s - g_t).abs().sum(-1).mean()


def make_gld_fn(provider: str, args):
    """fn(student, teacher, k, mask) -> the GLD loss (a 0-d tensor)."""
    import torch

    if provider.split(":")[0] == "kdops":  # kdops (default backend) or kdops:<backend>
        import kdops

        backend = provider.partition(":")[2] or None

        def fused(student, teacher, k, mask):
            with kdops.use_backend(backend) if backend else contextlib.nullcontext():
                f_s = kdops.coactivation_features(student, k, mask=mask, temperature=TEMPERATURE)
                f_t = kdops.coactivation_features(teacher, k, mask=mask, temperature=TEMPERATURE)
            return kdops.sorted_gw(f_s, f_t)

        return fused

    features = {"eager": eager_features, "compile": eager_features, "graph": graph_features}[provider]

    def peer(student, teacher, k, mask):
        return eager_sorted_gw(features(student, k, mask), features(teacher, k, mask))

    if provider == "compile":
        return torch.compile(peer, backend=args.compile_backend, dynamic=False)
    return peer


def supports(provider: str, b: int, v: int, graph_gib: float) -> bool:
    return provider != "graph" or b * v * v * 4 <= graph_gib * 2**30


# --------------------------------------------------------------------------------------------------
# Worker: one provider, every case of the plan it supports


def worker_main(args) -> int:
    import torch

    provider, device = args.worker[0], args.device
    hwm_ok = device.startswith("cuda") or H.cpu_hwm_resettable()
    fn = make_gld_fn(provider, args)
    for spec in args.worker[1].split(","):
        b, t, v, dt, k = parse_case(spec)
        if not supports(provider, b, v, args.graph_gib):
            continue
        gen = torch.Generator(device=device).manual_seed(args.seed)
        dtype = H.torch_dtype(dt)
        student = (torch.randn(b, t, v, device=device, generator=gen) * 2.0).to(dtype)
        teacher = (torch.randn(b, t, v, device=device, generator=gen) * 2.0).to(dtype)
        mask = torch.ones(b, t, dtype=torch.bool, device=device)
        mask[:, : t // 8] = False  # a prompt that does not count
        input_bytes = student.nbytes + teacher.nbytes + mask.nbytes
        reps = args.reps or (1 if args.quick else (10 if device.startswith("cuda") else 3))
        for pass_ in PASSES:
            rec: dict[str, Any] = dict(provider=provider, B=b, T=t, V=v, dtype=dt, k=k, pass_=pass_,
                                       input_bytes=input_bytes,
                                       grad_bytes=student.nbytes if pass_ == "fwd_bwd" else 0)
            rec["budget_bytes"] = rec["input_bytes"] + rec["grad_bytes"]
            try:
                rec.update(run_case(fn, student, teacher, k, mask, pass_, device, reps, hwm_ok))
                rec["peak_bytes"] = input_bytes + rec["mem_extra_bytes"]
                rec["peak_ratio"] = rec["peak_bytes"] / rec["budget_bytes"]
            except Exception as e:  # e.g. out of memory, or a backend not built: a row with the error
                rec["error"] = H.error_text(e)
            H.emit_result(rec)
            gc.collect()
        del student, teacher
        gc.collect()
    return 0


def run_case(fn, student, teacher, k, mask, pass_: str, device: str, reps: int, hwm_ok: bool):
    z = student if pass_ == "fwd" else student.detach().requires_grad_(True)

    def setup():
        z.grad = None

    def call():
        loss = fn(z, teacher, k, mask)
        if pass_ == "fwd_bwd":
            loss.backward()
        return loss

    # the first call compiles (compile provider); its loss is cross-checked between providers
    return H.measure_call(call, setup=setup, device=device, reps=reps, memory_ok=hwm_ok,
                          first=lambda loss: {"loss": float(loss.detach())})


# --------------------------------------------------------------------------------------------------
# Parent: run the workers, report


def case_key(r: dict) -> tuple:
    return r["B"], r["T"], r["V"], r["dtype"], r["k"], r["pass_"]


def floor_bytes(r: dict) -> int:
    """Least traffic of a fused step: read both logits once (+ write the student's gradient)."""
    return r["budget_bytes"]


def report(results: list[dict], copy: dict | None) -> tuple[list[str], list[list[str]]]:
    return H.speed_table(results, copy, case_key=case_key, floor_bytes=floor_bytes,
                         labels=[("case", lambda r: f"{r['B']}x{r['T']}x{r['V']} {r['dtype']} k={r['k']}")],
                         extras=[("loss", lambda r, _: f"{r['loss']:.6g}")])

def main(argv=None) -> int:
    ap = H.bench_parser(__doc__, plan_flag="--cases", plan_help="comma list of BxTxV[:dtype[:k]]",
                        providers=PROVIDERS, worker_timeouts={"cpu": 1800, "cuda": 300},
                        provider_names="kdops, kdops:<backend>, eager, compile, graph")
    ap.add_argument("--graph-gib", type=float, default=None,
                    help="largest [B, V, V] float32 graph the graph provider builds (default cpu 1, cuda 16)")
    args = H.parse_bench_args(ap, argv)
    cuda = args.device.startswith("cuda")
    if args.graph_gib is None:
        args.graph_gib = 16.0 if cuda else 1.0
    if args.worker:
        return worker_main(args)

    plan, out = H.bench_plan(args, "coactivation", args.cases, quick=QUICK_PLAN, cpu=CPU_PLAN,
                             gpu=GPU_PLAN)
    worker_args = H.common_worker_args(args) + ["--graph-gib", str(args.graph_gib)]

    copy = H.copy_bandwidth(args.device, int(args.copy_mib * 2**20)) if cuda else None
    providers = args.providers.split(",")
    results = H.run_providers(__file__, providers, plan, worker_args,
                              timeout=args.worker_timeout)

    headers, rows = report(results, copy)
    H.write_report(
        out, device=args.device, results=results, headers=headers, rows=rows, extra={"copy": copy},
        title="coactivation_features benchmark: InfiGFusion's GLD term",
        intro="sorted_gw between the top-k co-activation features of a student and a teacher "
              f"(tau = {TEMPERATURE}, the first T/8 positions masked). Times are medians; `vs eager` "
              "is the speedup over the eager PyTorch pipeline in the same run; peak includes the "
              "inputs, budget = inputs + one gradient buffer (fwd: the inputs); `loss` agrees "
              "across providers up to ties among the k-th logits"
              + ("; `floor/time`: reading both logits once (+ writing the student's gradient) "
                 "at the copy bandwidth measured in this run, over the time" if copy else "")
              + ".",
        plot=not args.no_plot, plot_title="coactivation_features (GLD)", providers=providers,
        case_key=case_key, case_label=lambda g: "{}x{}x{} {} k={} {}".format(*g))
    return 0


if __name__ == "__main__":
    sys.exit(main())
