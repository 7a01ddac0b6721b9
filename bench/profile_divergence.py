"""Where the time of kd_loss goes on a GPU: the op alone (with and without a gradient), the whole
forward + backward, and the CUDA kernels one step launches (torch.profiler).

    python bench/profile_divergence.py --shape 8192x128256:bf16 --divergences fkl,jsd
    KDOPS_CUDA_NO_CLUSTER=1 python bench/profile_divergence.py --backends cuda
    KDOPS_TRITON_AUTOTUNE=1 python bench/profile_divergence.py --backends triton   # prints the tuned configs

Times are medians of CUDA-event timings after warm-up; bytes are the floor (read student and
teacher, write one gradient), reported against a device-to-device copy measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from torch.profiler import ProfilerActivity, profile

import kdops

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def median_ms(fn, warmup=3, reps=10) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def copy_bandwidth() -> float:
    src = torch.empty(2**30, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * src.nbytes / (ms * 1e-3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="8192x128256:bf16")
    ap.add_argument("--divergences", default="fkl,jsd")
    ap.add_argument("--backends", default="cuda,triton")
    ap.add_argument("--out", default=None, help="JSON path")
    args = ap.parse_args()
    dims, dtype_name = args.shape.split(":")
    n, v = (int(x) for x in dims.split("x"))
    dtype = DTYPES[dtype_name]
    g = torch.Generator(device="cuda").manual_seed(0)
    student = (2 * torch.randn(n, v, generator=g, device="cuda")).to(dtype)
    teacher = (2 * torch.randn(n, v, generator=g, device="cuda")).to(dtype)
    tau = torch.tensor(2.0)
    bw = copy_bandwidth()
    elem = student.element_size()
    env = {k: os.environ[k] for k in ("KDOPS_CUDA_NO_CLUSTER", "KDOPS_TRITON_AUTOTUNE") if k in os.environ}
    print(f"# {torch.cuda.get_device_name()} copy {bw / 1e12:.2f} TB/s, {args.shape}, env {env}")
    rows = []
    for backend in args.backends.split(","):
        from kdops.divergence import _kd_loss_op

        op = _kd_loss_op(backend)
        for div in args.divergences.split(","):
            def op_call(grad):
                return op(student, teacher, tau, None, None, div, 0.5, 0.1, "mean", False, grad, False, False)

            leaf = student.detach().requires_grad_()

            def step():
                leaf.grad = None
                with kdops.use_backend(backend):
                    kdops.kd_loss(leaf, teacher, divergence=div, temperature=2.0).backward()

            t_nograd = median_ms(lambda: op_call(False))
            t_grad = median_ms(lambda: op_call(True))
            t_step = median_ms(step)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                step()
                torch.cuda.synchronize()
            kernels = sorted(
                ((e.key, e.device_time_total / 1e3) for e in prof.key_averages() if e.device_time_total > 0),
                key=lambda kv: -kv[1],
            )
            floor_nograd = 2 * n * v * elem
            floor_grad = 3 * n * v * elem
            row = dict(backend=backend, divergence=div, op_nograd_ms=t_nograd, op_grad_ms=t_grad,
                       step_ms=t_step, frac_nograd=floor_nograd / (t_nograd * 1e-3) / bw,
                       frac_grad=floor_grad / (t_grad * 1e-3) / bw,
                       frac_step=floor_grad / (t_step * 1e-3) / bw, kernels=kernels[:6])
            rows.append(row)
            print(f"{backend:7s} {div:4s} op(no grad) {t_nograd:6.2f} ms ({row['frac_nograd']:.2f} of copy)"
                  f"  op(grad) {t_grad:6.2f} ms ({row['frac_grad']:.2f})  fwd+bwd {t_step:6.2f} ms ({row['frac_step']:.2f})")
            for name, ms in kernels[:6]:
                print(f"    {ms:7.3f} ms  {name[:110]}")
        if backend == "triton" and os.environ.get("KDOPS_TRITON_AUTOTUNE") == "1":
            from kdops.kernels import divergence as tdiv

            for key, cfg in tdiv._kd_loss_kernel_autotuned.cache.items():
                print(f"    tuned {key}: {cfg}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), copy_Bps=bw, shape=args.shape, env=env,
                           rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
