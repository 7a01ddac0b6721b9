"""Benchmark of kdops.sequence_logprob (per-sequence log-probability of the labels, MiniPLM's
scoring) against the PyTorch code that scores sequences today, eager and under torch.compile.

The peer pipeline: upcast the logits to float32, log_softmax over the vocabulary, gather at the
labels, zero the ignored positions and average each sequence over its valid ones. kdops reads the
logits once (one online max / sum-exp sweep per row plus the label's logit) and, when the logits
require grad, writes d logprob / d logits in the same launch.

Passes: ``fwd`` is inference (the logits do not require grad: scoring a corpus); ``fwd_bwd`` is
forward + backward of -mean(score). Each provider runs in its own process (bench/_harness.py):
median time and peak memory with the inputs included, as a ratio to inputs + one gradient buffer
(fwd: inputs alone). The floor of a fused kernel is reading the logits once (+ writing their
gradient once); on CUDA a device-to-device copy measured in the same run gives the bandwidth, and
each result is also reported as that floor's time over its own.

    python bench/bench_sequence.py                    # CPU default plan
    python bench/bench_sequence.py --quick            # CI smoke test (tiny shapes)
    python bench/bench_sequence.py --device cuda      # GPU plan: 8 x 1024 x 128256 bf16

Writes bench/results/sequence_<device>[_quick].{json,md} (and a PNG unless --no-plot).
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
CPU_PLAN = ["4x512x32000:fp32", "4x512x32000:bf16"]
GPU_PLAN = ["8x1024x128256:bf16", "2x1024x128256:bf16"]
QUICK_PLAN = ["2x32x1000:fp32"]
IGNORE = -100


def parse_shape(spec: str) -> tuple[int, int, int, str]:
    dims, _, dtype = spec.partition(":")
    b, t, v = (int(x) for x in dims.split("x"))
    return b, t, v, dtype or "fp32"


# --------------------------------------------------------------------------------------------------
# The peer pipeline


def eager_sequence_logprob(logits, labels):
    import torch

    valid = labels != IGNORE
    safe = torch.where(valid, labels, 0)
    token = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    token = torch.where(valid, token, 0.0)
    return token.sum(-1) / valid.sum(-1).clamp_min(1)


def make_score_fn(provider: str, args):
    if provider.split(":")[0] == "kdops":  # kdops (default backend) or kdops:<backend>
        import kdops

        backend = provider.partition(":")[2] or None

        def fused(logits, labels):
            with kdops.use_backend(backend) if backend else contextlib.nullcontext():
                return kdops.sequence_logprob(logits, labels)

        return fused
    if provider == "eager":
        return eager_sequence_logprob
    if provider == "compile":
        import torch

        return torch.compile(eager_sequence_logprob, backend=args.compile_backend, dynamic=False)
    raise ValueError(provider)


# --------------------------------------------------------------------------------------------------
# Worker: one provider, every case of the plan


def worker_main(args) -> int:
    import torch

    provider = args.worker[0]
    device = args.device
    hwm_ok = device.startswith("cuda") or H.cpu_hwm_resettable()
    fn = make_score_fn(provider, args)
    for spec in args.worker[1].split(","):
        b, t, v, dt = parse_shape(spec)
        gen = torch.Generator(device=device).manual_seed(args.seed)
        logits = (torch.randn(b, t, v, device=device, generator=gen) * 2.0).to(H.torch_dtype(dt))
        labels = torch.randint(0, v, (b, t), device=device, generator=gen)
        labels[:, : t // 8] = IGNORE  # a prompt that does not count
        input_bytes = logits.nbytes + labels.nbytes
        reps = args.reps or (1 if args.quick else (10 if device.startswith("cuda") else 3))
        for pass_ in PASSES:
            rec: dict[str, Any] = dict(provider=provider, B=b, T=t, V=v, dtype=dt, pass_=pass_,
                                       input_bytes=input_bytes,
                                       grad_bytes=logits.nbytes if pass_ == "fwd_bwd" else 0)
            rec["budget_bytes"] = rec["input_bytes"] + rec["grad_bytes"]
            try:
                rec.update(run_case(fn, logits, labels, pass_, device, reps, hwm_ok))
                rec["peak_bytes"] = input_bytes + rec["mem_extra_bytes"]
                rec["peak_ratio"] = rec["peak_bytes"] / rec["budget_bytes"]
            except Exception as e:  # e.g. out of memory: a row with the error
                rec["error"] = H.error_text(e)
            H.emit_result(rec)
            gc.collect()
        del logits, labels
        gc.collect()
    return 0


def run_case(fn, logits, labels, pass_: str, device: str, reps: int, hwm_ok: bool):
    z = logits if pass_ == "fwd" else logits.detach().requires_grad_(True)

    def setup():
        z.grad = None

    def call():
        score = fn(z, labels)
        if pass_ == "fwd_bwd":
            (-score.mean()).backward()
        return score

    # the first call compiles (compile provider); its mean is cross-checked between providers
    return H.measure_call(call, setup=setup, device=device, reps=reps, memory_ok=hwm_ok,
                          first=lambda score: {"score_mean": float(score.detach().float().mean())})


# --------------------------------------------------------------------------------------------------
# Parent: run the workers, report


def case_key(r: dict) -> tuple:
    return r["B"], r["T"], r["V"], r["dtype"], r["pass_"]


def floor_bytes(r: dict) -> int:
    """Least traffic of a fused kernel: read the logits once (+ write their gradient)."""
    elem = 4 if r["dtype"] == "fp32" else 2
    return r["B"] * r["T"] * r["V"] * elem * (2 if r["pass_"] == "fwd_bwd" else 1)


def report(results: list[dict], copy: dict | None) -> tuple[list[str], list[list[str]]]:
    return H.speed_table(results, copy, case_key=case_key, floor_bytes=floor_bytes,
                         labels=[("case", lambda r: f"{r['B']}x{r['T']}x{r['V']} {r['dtype']}")],
                         extras=[("score", lambda r, _: f"{r['score_mean']:.5f}")])

def main(argv=None) -> int:
    ap = H.bench_parser(__doc__, plan_flag="--shapes", plan_help="comma list of BxTxV[:dtype]",
                        providers=PROVIDERS, worker_timeouts={"cpu": 3600, "cuda": 60})
    args = H.parse_bench_args(ap, argv)
    if args.worker:
        return worker_main(args)

    cuda = args.device.startswith("cuda")
    plan, out = H.bench_plan(args, "sequence", args.shapes, quick=QUICK_PLAN, cpu=CPU_PLAN,
                             gpu=GPU_PLAN)
    worker_args = H.common_worker_args(args)

    copy = H.copy_bandwidth(args.device, int(args.copy_mib * 2**20)) if cuda else None
    providers = args.providers.split(",")
    results = H.run_providers(__file__, providers, plan, worker_args,
                              timeout=args.worker_timeout)

    headers, rows = report(results, copy)
    H.write_report(
        out, device=args.device, results=results, headers=headers, rows=rows, extra={"copy": copy},
        title="sequence_logprob benchmark",
        intro="Times are medians; `vs eager` is the speedup over the eager PyTorch pipeline in the "
              "same run; peak includes the inputs, budget = inputs + one gradient buffer (fwd: the "
              "inputs); `score` is the mean per-sequence log-probability (equal across providers).",
        plot=not args.no_plot, plot_title="sequence_logprob", providers=providers, case_key=case_key,
        case_label=lambda g: "{}x{}x{} {} {}".format(*g))
    return 0


if __name__ == "__main__":
    sys.exit(main())
