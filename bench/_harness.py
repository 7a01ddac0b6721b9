"""Shared helpers for the kdops microbenchmarks (timing, peak memory, workers, output).

Nothing in here knows about a particular op family. A bench script:

1. builds a list of *cases* (dicts, JSON-serialisable) and a list of provider names;
2. in the parent process, calls :func:`run_worker` once per (provider, group of cases); the
   worker is the same script re-invoked with ``--worker`` and prints one :func:`emit_result`
   line per case;
3. in the worker, uses :func:`measure_call` (built on :func:`time_fn` for timing and
   :class:`PeakMemory` for the peak memory of one call), so that every provider's memory is
   measured in a process of its own (allocator state, ``torch.compile`` caches and the high-water
   mark of one provider cannot leak into another's);
4. prints the collected rows with :func:`format_table` or :func:`format_markdown_table`, writes
   them with :func:`write_json` (plus :func:`machine_info`) and optionally draws them with
   :func:`plot_bars`; :func:`run_providers` and :func:`write_report` do steps 2 and 4 for the
   common layout (one worker per provider over the whole plan; a JSON, a markdown table and a
   plot of median times).

Ceilings: :func:`copy_bandwidth` times a device-to-device copy (bytes = read + write), the practical
bandwidth a streaming kernel can reach on the device; a script can report each result's least
traffic over its time as a fraction of it.

Memory convention (same on every device): a case's inputs are allocated first, then
``extra = peak - baseline`` is measured around one call, and the reported peak is
``input_bytes + extra``, i.e. the memory the call needs with its inputs included. The scripts also
report that peak as a ratio to a budget they choose (for a loss: inputs + one gradient buffer).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Iterable, Sequence

RESULT_PREFIX = "@@KDOPS_BENCH_RESULT@@ "

DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}


def torch_dtype(name: str):
    import torch

    try:
        return getattr(torch, DTYPE_NAMES.get(name, name))
    except AttributeError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPE_NAMES)}") from None


# --------------------------------------------------------------------------------------------------
# Device helpers


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[], Any],
    *,
    device: str,
    reps: int,
    warmup: int = 1,
    setup: Callable[[], Any] | None = None,
    memory: "PeakMemory | None" = None,
) -> list[float]:
    """Run ``fn`` ``warmup`` times untimed, then ``reps`` times timed; return seconds per call.

    ``setup`` runs before every call (warm-up included) and is not timed, e.g. to drop ``.grad``.
    ``memory``: a :class:`PeakMemory` entered around the first timed call (entered before the
    clock starts and left after it stops, so its bookkeeping is not timed); this saves a separate
    call just for the memory when a call takes seconds. The result of a call is dropped only
    after the call is timed, so what it returns (a loss, and a ``.grad`` it fills) counts.
    CPU: ``time.perf_counter`` around the call (CPU ops are synchronous).
    CUDA: a pair of CUDA events around the call, with a device synchronize before each call (so
    the previous call and ``setup`` are done) and after it (so the elapsed time can be read).
    """
    import contextlib

    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    synchronize(device)
    times: list[float] = []
    cuda = device.startswith("cuda")
    if cuda:
        import torch
    for i in range(reps):
        if setup is not None:
            setup()
        ctx = memory if (memory is not None and i == 0) else contextlib.nullcontext()
        with ctx:
            if cuda:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize(device)
                start.record()
                result = fn()
                end.record()
                torch.cuda.synchronize(device)
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                result = fn()
                times.append(time.perf_counter() - t0)
        del result
    return times


def summarize_times(times: Sequence[float]) -> dict[str, Any]:
    return {
        "times_s": list(times),
        "median_s": statistics.median(times) if times else None,
        "min_s": min(times) if times else None,
        "reps": len(times),
    }


def measure_call(
    call: Callable[[], Any],
    *,
    setup: Callable[[], Any],
    device: str,
    reps: int,
    memory_ok: bool,
    warmup: int = 1,
    first: Callable[[Any], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One benchmark case in a worker: the first call, then the timed calls with the peak memory.

    The first call (after ``setup``) compiles where a provider compiles and is timed on its own
    as ``first_call_s``; ``first(result)`` returns the values recorded from it (a loss to
    cross-check between providers). Then :func:`time_fn` runs ``warmup`` + ``reps`` calls with
    a :class:`PeakMemory` around the first timed one when ``memory_ok`` (the peak RSS can be
    reset, or CUDA); otherwise memory is recorded as unavailable. ``setup`` runs once more at
    the end to drop what the last call left (``.grad``).

    Returns ``first_call_s``, ``first``'s keys, :func:`summarize_times`'s keys,
    ``mem_extra_bytes`` and ``mem_method``.
    """
    out: dict[str, Any] = {}
    setup()
    t0 = time.perf_counter()
    result = call()
    synchronize(device)
    out["first_call_s"] = time.perf_counter() - t0
    if first is not None:
        out.update(first(result))
    del result
    mem = PeakMemory(device) if memory_ok else None
    times = time_fn(call, device=device, reps=reps, warmup=warmup, setup=setup, memory=mem)
    out.update(summarize_times(times))
    out.update(mem_extra_bytes=mem.extra if mem else 0, mem_method=mem.method if mem else "unavailable")
    setup()
    return out


def error_text(e: BaseException, limit: int = 300) -> str:
    """A result row's ``error``: the exception's type and first line (an OOM, a backend not built)."""
    first_line = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first_line}"[:limit]


# --------------------------------------------------------------------------------------------------
# Peak memory


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    # Writing "5" to /proc/self/clear_refs resets the peak RSS (VmHWM) to the current RSS
    # (Linux >= 4.0, documented in Documentation/filesystems/proc.rst).
    # KDOPS_BENCH_NO_HWM_RESET=1 pretends it is not possible (to test the ru_maxrss fallback).
    if os.environ.get("KDOPS_BENCH_NO_HWM_RESET"):
        return False
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_hwm_resettable() -> bool:
    """Whether this process (and so a worker on the same kernel) can reset its peak RSS."""
    return _proc_status_kb("VmHWM") is not None and _reset_hwm()


class PeakMemory:
    """Peak memory of the code run inside ``with PeakMemory(device) as m:``, in bytes.

    After the block: ``m.baseline`` (memory in use when it started, inputs included),
    ``m.peak`` (high-water mark during it), ``m.extra = peak - baseline`` and ``m.method``.

    CUDA: ``torch.cuda.memory_allocated`` / ``max_memory_allocated`` after
    ``reset_peak_memory_stats``, i.e. bytes held by live tensors through the caching allocator
    (allocator fragmentation and the CUDA context are not counted).

    CPU: resident set size. We read ``VmHWM`` (peak RSS) from ``/proc/self/status`` and reset it
    to the current RSS at the start of the block by writing "5" to ``/proc/self/clear_refs``.
    ``resource.getrusage(...).ru_maxrss`` is the same high-water mark but cannot be reset, so
    with it only the first measured call of a process would be meaningful: importing torch,
    ``torch.compile``'s compilation and every warm-up call raise it for good, and a later call
    that needs less than an earlier one would read as needing nothing. With the reset, the
    baseline is taken right before the measured call, with the inputs already allocated and
    written (RSS counts only touched pages, so inputs must be touched before). If the reset is
    not possible (not Linux, or /proc unavailable) we fall back to ``ru_maxrss`` and set
    ``method`` to say so; the caller should then measure before anything else runs.
    Large tensors (above glibc's mmap threshold, at most 32 MiB) are mmap'ed and go back to
    the OS when freed, so RSS follows live tensor memory closely for the sizes benchmarked
    here; pages allocated but never written are not resident and are not counted.
    """

    def __init__(self, device: str):
        self.device = device
        self.baseline = 0
        self.peak = 0
        self.method = ""

    @property
    def extra(self) -> int:
        return max(0, self.peak - self.baseline)

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated"
        elif _proc_status_kb("VmHWM") is not None and _reset_hwm():
            self.baseline = _proc_status_kb("VmRSS") * 1024
            self.method = "VmHWM (reset via /proc/self/clear_refs)"
        else:
            import resource

            scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
            self._scale = scale
            self.baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
            self.method = "ru_maxrss (no reset: only valid for the first call of a process)"
        return self

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method.startswith("VmHWM"):
            self.peak = _proc_status_kb("VmHWM") * 1024
        else:
            import resource

            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * self._scale


# --------------------------------------------------------------------------------------------------
# Worker processes


def emit_result(record: dict[str, Any]) -> None:
    """Worker side: print one result record on its own stdout line (the parent parses these)."""
    sys.stdout.write(RESULT_PREFIX + json.dumps(record) + "\n")
    sys.stdout.flush()


def run_worker(
    script: str,
    worker_args: Sequence[str],
    *,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
) -> tuple[list[dict[str, Any]], str | None]:
    """Run ``python script --worker <worker_args...>``; return (records, error or None).

    Records are the :func:`emit_result` lines; anything else on stdout/stderr is kept only for
    the error message. A crash (for example the OOM killer) keeps the records printed before it.
    """
    cmd = [sys.executable, script, "--worker", *worker_args]
    try:
        proc = subprocess.run(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            timeout=timeout,
            env={**os.environ, **(env or {})},
        )
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = f"timed out after {timeout:.0f} s"
        rc = None
    records = []
    for line in out.splitlines():
        if line.startswith(RESULT_PREFIX):
            records.append(json.loads(line[len(RESULT_PREFIX) :]))
    error = None
    if rc != 0:
        tail = "\n".join((err or "").strip().splitlines()[-15:])
        error = f"worker exited with {rc}: {tail}" if rc is not None else err
    return records, error


def run_providers(
    script: str,
    providers: Sequence[str],
    plan: Sequence[str],
    worker_args: Sequence[str],
    *,
    timeout: float | None,
) -> list[dict[str, Any]]:
    """Run one worker per provider over the whole plan (``script --worker PROVIDER CASES ...``).

    Returns every provider's records in order; a worker's error is printed as a note on stderr
    and the records it printed before it are kept.
    """
    results: list[dict[str, Any]] = []
    for provider in providers:
        records, error = run_worker(script, [provider, ",".join(plan), *worker_args], timeout=timeout)
        results += records
        if error:
            print(f"note: {provider}: {error}", file=sys.stderr)
    return results


def bench_parser(doc: str, *, plan_flag: str, plan_help: str, providers: dict[str, str],
                 provider_names: str = "kdops, kdops:<backend>, eager, compile",
                 copy: bool = True, worker_timeouts: dict[str, float] | None = None,
                 worker_scope: str = "provider's worker") -> argparse.ArgumentParser:
    """The options every worker-based script shares; the script adds its own after these.

    plan_flag: "--shapes" or "--cases" (the comma list that replaces the default plan);
    providers: the default providers per device kind ("cpu", "cuda"); copy: whether the script
    reports a copy-bandwidth ceiling (--copy-mib); worker_timeouts: the default --worker-timeout
    per device kind (cpu 3600 s, cuda 120 s unless given), worker_scope what one worker runs."""
    timeouts = worker_timeouts or {"cpu": 3600, "cuda": 120}
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, one rep (CI smoke test)")
    ap.add_argument(plan_flag, help=plan_help)
    ap.add_argument("--providers", help=f"comma list of {provider_names} "
                    f"(default cpu: {providers['cpu']}; cuda: {providers['cuda']})")
    ap.add_argument("--reps", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile-backend", default=None)
    if copy:
        ap.add_argument("--copy-mib", type=float, default=2048.0)
    ap.add_argument("--worker-timeout", type=float, default=None,
                    help=f"seconds per {worker_scope} (default cpu {timeouts['cpu']:g}, cuda "
                    f"{timeouts['cuda']:g}); a worker stopped at it keeps the rows it finished")
    ap.add_argument("--out")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    ap.set_defaults(default_providers=providers, default_worker_timeouts=timeouts)
    return ap


def parse_bench_args(ap: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parsed options with the defaults that depend on others: the torch.compile backend
    (aot_eager for --quick, else inductor), the device's providers and worker timeout."""
    args = ap.parse_args(argv)
    if args.compile_backend is None:
        args.compile_backend = "aot_eager" if args.quick else "inductor"
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    args.providers = args.providers or args.default_providers[kind]
    args.worker_timeout = args.worker_timeout or args.default_worker_timeouts[kind]
    return args


def bench_plan(args, name: str, plan_spec: str | None, *, quick: list, cpu: list,
               gpu: list) -> tuple[list, str]:
    """The plan (the script's --shapes / --cases, or its quick, CPU or GPU default) and the JSON
    path (--out, or bench/results/<name>_<device>[_quick].json)."""
    cuda = args.device.startswith("cuda")
    plan = plan_spec.split(",") if plan_spec else (quick if args.quick else gpu if cuda else cpu)
    tag = args.device.split(":")[0] + ("_quick" if args.quick else "")
    results_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    return plan, args.out or os.path.join(results_dir, f"{name}_{tag}.json")


def common_worker_args(args) -> list[str]:
    """The worker command line for the options every worker-based script shares."""
    worker_args = ["--device", args.device, "--seed", str(args.seed),
                   "--compile-backend", args.compile_backend]
    worker_args += ["--quick"] if args.quick else []
    worker_args += ["--reps", str(args.reps)] if args.reps else []
    return worker_args


# --------------------------------------------------------------------------------------------------
# Machine info and output


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "cpu_model": _cpu_model(),
        "device": device,
    }
    try:  # the version without importing triton (slow to import)
        from importlib.metadata import version

        info["triton"] = version("triton")
    except Exception:
        info["triton"] = None
    if device.startswith("cuda"):
        info["device_name"] = torch.cuda.get_device_name(device)
        props = torch.cuda.get_device_properties(device)
        info["device_total_memory"] = props.total_memory
        info["cuda_capability"] = f"{props.major}.{props.minor}"
    else:
        info["device_name"] = info["cpu_model"]
    try:
        info["loadavg_at_start"] = list(os.getloadavg())
    except OSError:
        pass
    try:
        mem_kb = _proc_status_kb("VmRSS")  # just to check /proc exists
        if mem_kb is not None:
            with open("/proc/meminfo") as f:
                info["host_memory_bytes"] = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        ).stdout.strip() or None
    except Exception:
        info["git_commit"] = None
    return info


def write_json(path: str, payload: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def write_report(
    out: str,
    *,
    device: str,
    results: list[dict[str, Any]],
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    title: str,
    intro: str,
    plot: bool,
    plot_title: str,
    providers: Sequence[str],
    case_key: Callable[[dict[str, Any]], tuple],
    case_label: Callable[[tuple], str],
    extra: dict[str, Any] | None = None,
) -> None:
    """The common tail of a worker-based script: print the table, write JSON, markdown and plot.

    JSON at ``out``: ``machine``, then ``extra``'s entries (e.g. ``copy``), ``results``,
    ``argv``. Markdown next to it: ``# {title} ({device name})``, ``intro``, the table.
    Plot (when ``plot``) next to it: median seconds per case (``case_key`` of the rows without an
    error, sorted, labelled by ``case_label``) and provider, log scale.
    """
    print(format_table(headers, rows))
    info = machine_info(device)
    device_name = info.get("device_name", device)
    write_json(out, {"machine": info, **(extra or {}), "results": results, "argv": sys.argv[1:]})
    md = os.path.splitext(out)[0] + ".md"
    with open(md, "w") as f:
        f.write(f"# {title} ({device_name})\n\n")
        f.write(intro + "\n\n")
        f.write(format_markdown_table(headers, rows) + "\n")
    if plot:
        ok = [r for r in results if "error" not in r]
        groups = sorted({case_key(r) for r in ok})
        series = {}
        for provider in providers:
            median = {case_key(r): r["median_s"] for r in ok if r["provider"] == provider}
            series[provider] = [median.get(g) for g in groups]
        plot_bars(os.path.splitext(out)[0] + ".png", [case_label(g) for g in groups], series,
                  ylabel="seconds (median)", title=f"{plot_title} on {device_name}", log=True)
    print(f"wrote {out} and {md}")


def speed_table(results: list[dict[str, Any]], copy: dict[str, Any] | None, *,
                case_key: Callable[[dict], tuple],
                labels: Sequence[tuple[str, Callable[[dict], str]]],
                extras: Sequence[tuple[str, Callable[[dict, dict | None], str]]] = (),
                floor_bytes: Callable[[dict], float] | None = None) -> tuple[list[str], list[list[str]]]:
    """The table of the scripts that time providers against eager: the `labels` columns, pass,
    provider, time, speed over eager's (the eager row of the same case_key), peak, peak/budget,
    the `extras` columns (given the row and its eager row, or None), and with a copy bandwidth
    the least traffic (floor_bytes) over the time as a fraction of it. A failed row shows its
    error instead."""
    eager = {case_key(r): r for r in results if r["provider"] == "eager" and "error" not in r}
    bw = copy["bandwidth_Bps"] if copy and "bandwidth_Bps" in copy else None
    headers = [h for h, _ in labels] + ["pass", "provider", "time", "vs eager", "peak", "peak/budget"]
    headers += [h for h, _ in extras] + (["floor/time"] if bw else [])
    rows = []
    for r in results:
        lead = [label(r) for _, label in labels] + [r["pass_"], r["provider"]]
        if "error" in r:
            rows.append(lead + [r["error"][:60]] + [""] * (len(headers) - len(lead) - 1))
            continue
        base = eager.get(case_key(r))
        speed = base["median_s"] / r["median_s"] if base else None
        row = lead + [fmt_time(r["median_s"]), fmt_ratio(speed), fmt_mb(r["peak_bytes"]),
                      fmt_ratio(r["peak_ratio"])]
        row += [extra(r, base) for _, extra in extras]
        if bw:
            row.append(fmt_ratio(floor_bytes(r) / bw / r["median_s"]))
        rows.append(row)
    return headers, rows


def _sig3(x: float) -> str:
    """Three significant digits without an exponent: 1.23, 12.3, 123, 1234."""
    return f"{x:.2f}" if x < 10 else f"{x:.1f}" if x < 100 else f"{x:.0f}"


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{_sig3(seconds * 1e3)} ms"
    return f"{_sig3(seconds * 1e6)} us"


def fmt_bandwidth(bytes_per_s: float | None) -> str:
    """Bytes per second in decimal units (GB/s = 1e9 B/s, as memory bandwidth is quoted)."""
    if bytes_per_s is None:
        return "-"
    if bytes_per_s >= 1e12:
        return f"{bytes_per_s / 1e12:.2f} TB/s"
    return f"{_sig3(bytes_per_s / 1e9)} GB/s"


def fmt_ratio(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}x"


def fmt_mb(nbytes: float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.0f}"


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    rows = [[("-" if c is None else str(c)) for c in r] for r in rows]
    widths = [len(h) for h in headers]
    for r in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, r)]
    def line(cells):
        return "  ".join(c.rjust(w) if i >= 1 and _numeric(c) else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(out)


def _numeric(cell: str) -> bool:
    return bool(cell) and (cell[0].isdigit() or cell == "-")


def format_markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]],
                          align: Sequence[str] | None = None) -> str:
    """A GitHub markdown table, padded so that it also reads as a plain table in a terminal.

    ``align``: "l" or "r" per column; by default a column is right-aligned when every non-empty
    cell in it (after the first column) starts with a digit or is "-". ``|`` in a cell is escaped.
    """
    rows = [[("-" if c is None else str(c)).replace("|", "\\|") for c in r] for r in rows]
    headers = [str(h).replace("|", "\\|") for h in headers]
    ncol = len(headers)
    rows = [(r + [""] * ncol)[:ncol] for r in rows]
    widths = [max(3, len(h)) for h in headers]
    for r in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, r)]
    if align is not None:
        right = [(align[i] if i < len(align) else "l") == "r" for i in range(ncol)]
    else:
        right = [i >= 1 and any(r[i] for r in rows) and all(_numeric(r[i]) for r in rows if r[i])
                 for i in range(ncol)]

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if ra else c.ljust(w)
                                 for c, w, ra in zip(cells, widths, right)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if ra else ("-" * (w + 2))
                          for w, ra in zip(widths, right)) + "|"
    return "\n".join([line(headers), rule] + [line(r) for r in rows])


# --------------------------------------------------------------------------------------------------
# Ceilings


def copy_bandwidth(device: str, nbytes: int, *, reps: int = 10, warmup: int = 3) -> dict[str, Any]:
    """Memory bandwidth of a plain copy ``dst.copy_(src)`` of two ``nbytes`` bf16 buffers.

    The bytes moved per copy are counted as read + write (``2 * nbytes``); the bandwidth is
    that over the median time (CUDA: CUDA events, see :func:`time_fn`). It is the practical
    ceiling of a kernel that streams its inputs once and writes its output once, measured on the
    same device in the same run; it is not the datasheet peak. Use buffers well above the last
    level cache (GiBs on a GPU) so that the copy runs from DRAM.
    """
    import torch

    n = max(1, nbytes // 2)
    src = torch.empty(n, dtype=torch.bfloat16, device=device)
    src.fill_(1.0)  # touch every page (CPU) and give the copy real data
    dst = torch.empty_like(src)
    synchronize(device)
    times = time_fn(lambda: dst.copy_(src), device=device, reps=max(1, reps), warmup=warmup)
    moved = 2 * src.nbytes
    med = statistics.median(times)
    return {
        "method": "dst.copy_(src), bfloat16, bytes = read + write, median over reps",
        "buffer_bytes": src.nbytes,
        "bytes_per_copy": moved,
        "times_s": times,
        "median_s": med,
        "min_s": min(times),
        "reps": len(times),
        "warmup": warmup,
        "bandwidth_Bps": moved / med,
        "best_bandwidth_Bps": moved / min(times),
    }


def plot_bars(
    path: str,
    groups: Sequence[str],
    series: dict[str, Sequence[float | None]],
    *,
    ylabel: str,
    title: str,
    hline: float | None = None,
    log: bool = False,
    second: tuple[str, dict[str, Sequence[float | None]], float | None] | None = None,
) -> str | None:
    """Grouped bar chart (one group per case, one bar per provider) saved as PNG.

    ``log`` puts the first panel on a log scale (for ratios such as speedups).
    ``second`` = (ylabel, series, hline) adds a second panel below with the same groups.
    Returns the path written, or None (with a message) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'kdops[bench]' to get it)")
        return None
    panels = [(ylabel, series, hline)] + ([second] if second else [])
    figsize = (max(6, 0.9 * len(groups) + 2), 3.6 * len(panels))
    fig, axes = plt.subplots(len(panels), 1, figsize=figsize, squeeze=False)
    names = list(series)
    width = 0.8 / max(1, len(names))
    for k, (ax, (label, ser, line)) in enumerate(zip(axes[:, 0], panels)):
        for i, name in enumerate(names):
            vals = [float("nan") if v is None else v for v in ser.get(name, [])]
            xs = [g + (i - (len(names) - 1) / 2) * width for g in range(len(vals))]
            ax.bar(xs, vals, width=width, label=name)
        if line is not None:
            ax.axhline(line, color="k", linestyle="--", linewidth=0.8)
        if log and k == 0:
            ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=7)
        ax.legend(fontsize=7)
    axes[0, 0].set_title(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
