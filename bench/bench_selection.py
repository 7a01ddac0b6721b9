"""Benchmark of kdops.select_top_fraction against what code does today: torch.quantile + compare
(only up to 2^24 scores, where torch.quantile runs) and torch.topk(k) + compare with its smallest
kept value (k = ceil(fraction * N): the same set up to ties and interpolation).

One process, median times (bench/_harness.py). The floor of the op is reading the scores once; on
CUDA a device-to-device copy measured in the same run gives the bandwidth, and each time is also
reported as a multiple of that one read (target: 10^8 float32 scores under 2x).

    python bench/bench_selection.py                  # CPU plan
    python bench/bench_selection.py --quick          # CI smoke test
    python bench/bench_selection.py --device cuda    # GPU plan (10^6 .. 10^8 float32, bf16)

Writes bench/results/selection_<device>[_quick].{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CPU_PLAN = ["1000000:fp32", "16777216:fp32", "1000000:bf16"]
GPU_PLAN = ["1000000:fp32", "16777216:fp32", "100000000:fp32", "100000000:bf16"]
QUICK_PLAN = ["10000:fp32"]
TORCH_QUANTILE_MAX = 1 << 24


def providers(device: str) -> list[str]:
    return ["kdops:cuda", "kdops:triton", "quantile", "topk"] if device.startswith("cuda") else ["kdops", "quantile", "topk"]


def make_fn(provider: str, scores, fraction: float):
    import torch

    if provider.startswith("kdops"):
        import kdops

        backend = provider.partition(":")[2] or None

        def fused():
            with kdops.use_backend(backend) if backend else contextlib.nullcontext():
                return kdops.select_top_fraction(scores, fraction)

        return fused
    if provider == "quantile":
        if scores.numel() > TORCH_QUANTILE_MAX:
            return None
        return lambda: scores >= torch.quantile(scores.float(), 1.0 - fraction)
    if provider == "topk":
        k = max(1, math.ceil(fraction * scores.numel()))
        return lambda: scores >= scores.topk(k, sorted=False).values.min()
    raise ValueError(provider)


def main(argv=None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--fraction", type=float, default=0.4)
    p.add_argument("--reps", type=int, default=0)
    p.add_argument("--plan", default="", help="comma-separated N:dtype cases")
    p.add_argument("--copy-mib", type=float, default=2048)
    p.add_argument("--out", help="JSON path (default bench/results/selection_<device>[_quick].json; "
                   "the markdown table goes next to it)")
    p.add_argument("--no-plot", action="store_true", help="accepted for the suite's common "
                   "command line (this benchmark draws no plot)")
    args = p.parse_args(argv)

    device = args.device
    plan = args.plan.split(",") if args.plan else (QUICK_PLAN if args.quick else (GPU_PLAN if device.startswith("cuda") else CPU_PLAN))
    reps = args.reps or (1 if args.quick else (20 if device.startswith("cuda") else 3))
    copy = H.copy_bandwidth(device, int(args.copy_mib * 2**20)) if device.startswith("cuda") and not args.quick else None

    results = []
    for spec in plan:
        n_text, _, dt = spec.partition(":")
        n = int(n_text)
        gen = torch.Generator(device=device).manual_seed(0)
        scores = torch.randn(n, device=device, generator=gen).to(H.torch_dtype(dt or "fp32"))
        read_s = scores.nbytes / copy["bandwidth_Bps"] if copy else None
        for provider in providers(device):
            fn = make_fn(provider, scores, args.fraction)
            rec = dict(provider=provider, N=n, dtype=dt, fraction=args.fraction, bytes=scores.nbytes)
            if fn is None:
                rec["error"] = "torch.quantile refuses more than 2^24 values"
            else:
                try:
                    rec.update(H.summarize_times(H.time_fn(fn, device=device, reps=reps)))
                    if read_s:
                        rec["reads"] = rec["median_s"] / read_s
                except Exception as e:  # noqa: BLE001  (a provider that cannot run is reported)
                    rec["error"] = f"{type(e).__name__}: {e}"[:200]
            results.append(rec)
            print(rec.get("provider"), n, dt, H.fmt_time(rec.get("median_s")), rec.get("error", ""), flush=True)

    headers = ["N", "dtype", "provider", "time", "x one read", "vs kdops"]
    rows = []
    for rec in results:
        base = next((r.get("median_s") for r in results if r["N"] == rec["N"] and r["dtype"] == rec["dtype"]
                     and r["provider"].startswith("kdops") and r.get("median_s")), None)
        t = rec.get("median_s")
        rows.append([f"{rec['N']:,}", rec["dtype"], rec["provider"], rec.get("error") or H.fmt_time(t),
                     H.fmt_ratio(rec.get("reads")), H.fmt_ratio(t / base if t and base else None)])
    print(H.format_table(headers, rows))
    name = f"selection_{device.split(':')[0]}{'_quick' if args.quick else ''}"
    out = os.path.splitext(args.out)[0] if args.out else os.path.join(HERE, "results", name)
    H.write_json(out + ".json", {"machine": H.machine_info(device), "copy": copy, "results": results,
                                 "argv": sys.argv[1:]})
    with open(out + ".md", "w") as f:
        f.write(H.format_markdown_table(headers, rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
