"""A real distillation on the CPU in a few minutes: ``python -m kdops.demo`` (or ``kdops-demo``).

Two tasks, each with a teacher trained here and small students distilled from it by kdops ops
and methods, over several seeds. Prints a markdown table; writes ``demo.json`` and, when
matplotlib is installed, ``demo.png`` (learning curves) to ``--out``. ``--small`` is the CI
configuration.

**lm**: draft models for speculative decoding. Data: the bytes of the Python standard library's
own top-level ``*.py`` files (``sysconfig.get_paths()["stdlib"]``, sorted by name), every fifth
file held out; the numbers therefore move a little between Python versions. Models: byte-level
causal language models of gated dilated causal convolutions (WaveNet's block: kernel 3, dilation
doubling per layer, residual), a wide teacher and narrow students with the same 63-byte receptive
field. At this size a causal transformer learned markedly slower per second of CPU, and the
architecture is not what the demo is about. As real drafts are, the students are pretrained: per
seed one student is trained on the text alone for a few steps, and every student of that seed
continues from it over the same batches of the same training text, differing only in the target:

* no teacher: cross-entropy with the next byte of the text (more of the pretraining);
* fkl, rkl, jsd (beta 0.5), tvd: ``kdops.kd_loss`` against the teacher's next-byte
  distribution at temperature 1 (the distribution speculative sampling draws from);
* AdaSPEC (``kdops.methods.AdaSPEC``, fraction 0.4): its stage 1, a reference initialized as the
  draft and distilled with plain fkl, *is* the fkl student, which is reused; stage 2 trains
  another copy of the pretrained start over the same batches, the fkl student frozen.

The pretraining matters for rkl, which starts slowly: from random weights and with as many steps
it trailed even the no-teacher student (acceptance 0.61 against 0.67, one seed) and drew level
only after three times as many.

The measure is the one a draft is for: the token acceptance rate of speculative sampling,
sum_v min(p_teacher, q_draft) = 1 - TVD, averaged over the positions of held-out text (windows
spread evenly over the held-out files). Held-out bits per byte on the real text are shown too
but are not what the methods promise: rkl and tvd barely penalize a draft for giving little
probability to a byte the teacher finds unlikely, which costs bits per byte and not acceptance.

**cls**: Hinton's setting of a student with few labels and a transfer set, on scikit-learn's
``digits`` (1797 8x8 images that ship inside the package), a fixed stratified 70/30 split. An MLP
teacher learns the whole training split. The students, one narrow hidden layer, have a few
labeled images per class (drawn per seed); the no-teacher student trains on those alone. The
distilled students train on every training image: the labeled ones with their labels, the others
with the teacher's predicted class (DKD and NKD split the classes into the target and the rest,
so every row needs one; every method gets the same labels). Hinton KD, DKD, NKD and DIST
(``kdops.methods``, the authors' defaults) are joined by "teacher's labels", plain cross-entropy
on those labels without a soft term: what the soft targets add beyond the teacher's hard labels
is the difference from that row, and it can be negative. The measure is held-out accuracy.

Every student of a task gets the same number of AdamW steps. Seeds fix the students'
initialization, their batches and (cls) the labeled images; the teacher is trained once, seed 0.
``torch.set_num_threads`` is left as it is unless ``--threads`` is given. ± in the tables is the
standard deviation over seeds; "vs no teacher" is the mean and standard deviation of the per-seed
differences (the students of a seed are paired: same start, same data).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import glob
import json
import math
import os
import platform
import statistics
import sys
import sysconfig
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .divergence import kd_loss
from .methods import AdaSPEC

SKLEARN_MISSING = ("the classification demo needs scikit-learn (the digits data ship inside it): "
                   "pip install scikit-learn  (or pip install -e '.[demo]'); --task lm runs without it")

BYTES = 256
NO_TEACHER = "no teacher"


# ---- configurations ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LMConfig:
    context: int = 64           # bytes per training window
    batch: int = 32             # windows per step
    teacher_width: int = 96
    student_width: int = 32
    layers: int = 5             # receptive field 1 + 2 (2^layers - 1) bytes, teacher and students
    teacher_steps: int = 600
    pretrain_steps: int = 150   # the students' shared start: cross-entropy on the text
    student_steps: int = 200    # then each student's own objective
    teacher_lr: float = 3e-3
    student_lr: float = 1e-2
    eval_windows: int = 64      # held-out windows (of `context` bytes) for the measures
    curve_points: int = 10      # evaluations along each student's training


@dataclasses.dataclass(frozen=True)
class ClsConfig:
    labeled_per_class: int = 5
    teacher_hidden: int = 256   # two hidden layers
    student_hidden: int = 32    # one hidden layer
    teacher_epochs: int = 60
    student_steps: int = 300
    batch: int = 64
    teacher_lr: float = 1e-3
    lr: float = 3e-3


CONFIGS = {
    "full": (LMConfig(), ClsConfig(), 5),
    "small": (LMConfig(batch=16, teacher_steps=150, pretrain_steps=50, student_steps=60, curve_points=3),
              ClsConfig(teacher_epochs=20, student_steps=200), 3),
}


# ---- progress ----------------------------------------------------------------------------------

class Progress:
    """One status line on stderr: redrawn in place on a terminal (at most 10 times a second);
    elsewhere (a CI log) only its final state is written, once. ``work`` counts a step of several
    students trained in lockstep once per student, so that the time left is roughly right."""

    def __init__(self, label: str, total: int):
        self.label, self.total, self.done, self.note = label, total, 0, ""
        self.stream = sys.stderr
        self.live = self.stream.isatty()
        self.start = self.last_draw = time.perf_counter()

    def update(self, note: str | None = None, work: int = 1) -> None:
        self.done += work
        if note is not None:
            self.note = note
        now = time.perf_counter()
        if self.live and now - self.last_draw >= 0.1:
            self.last_draw = now
            self._draw(end="")

    def close(self) -> None:
        self.note = "done"
        self._draw(end="\n")

    def _draw(self, end: str) -> None:
        elapsed = time.perf_counter() - self.start
        filled = round(20 * self.done / self.total)
        left = f", ~{elapsed * (self.total - self.done) / self.done:.0f}s left" if 0 < self.done < self.total else ""
        line = (f"{self.label} [{'#' * filled}{'.' * (20 - filled)}] {self.done}/{self.total} "
                f"{elapsed:.0f}s{left}  {self.note}")
        self.stream.write(("\r\x1b[K" if self.live else "") + line + end)
        self.stream.flush()


def cosine_schedule(optimizer: torch.optim.Optimizer, steps: int, warmup: int = 20):
    """Linear warm-up, then cosine decay to a tenth of the learning rate."""
    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, schedule=None) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if schedule is not None:
        schedule.step()


# ---- lm: data and model ------------------------------------------------------------------------

def stdlib_bytes() -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) uint8 tensors: the stdlib's top-level *.py files, every fifth held out."""
    stdlib = sysconfig.get_paths()["stdlib"]
    paths = sorted(glob.glob(os.path.join(stdlib, "*.py")))
    if len(paths) < 20:
        raise RuntimeError(f"found {len(paths)} .py files in {stdlib}; the lm demo needs the "
                           "standard library's sources (this Python ships compiled files only)")
    parts: tuple[list[bytes], list[bytes]] = ([], [])
    for index, path in enumerate(paths):
        with open(path, "rb") as f:
            parts[index % 5 == 4].append(f.read())
    return tuple(torch.frombuffer(bytearray(b"".join(p)), dtype=torch.uint8) for p in parts)


def windows(data: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
    """int64 [len(starts), length] slices of data."""
    return data[starts[:, None] + torch.arange(length)].long()


class ByteConvLM(nn.Module):
    """Causal byte-level language model: embedding, gated dilated causal convolutions with
    residuals (kernel 3, dilation 1, 2, 4, ...), layer norm, linear head. Position t of the
    output sees bytes <= t and predicts byte t + 1."""

    def __init__(self, width: int, layers: int, kernel: int = 3):
        super().__init__()
        self.kernel = kernel
        self.embed = nn.Embedding(BYTES, width)
        self.gates = nn.ModuleList(nn.Conv1d(width, 2 * width, kernel, dilation=2 ** i) for i in range(layers))
        self.mixes = nn.ModuleList(nn.Conv1d(width, width, 1) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, BYTES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [B, T] -> logits [B, T, 256]
        h = self.embed(tokens).transpose(1, 2)
        for i, (gate, mix) in enumerate(zip(self.gates, self.mixes)):
            left_pad = (self.kernel - 1) * 2 ** i  # causal: only past bytes reach position t
            content, gate_logits = gate(F.pad(h, (left_pad, 0))).chunk(2, dim=1)
            h = h + mix(torch.tanh(content) * torch.sigmoid(gate_logits))
        return self.head(self.norm(h.transpose(1, 2)))


def next_byte_ce(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats) of logits [B, T, 256] against the next bytes batch[:, 1:]."""
    return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())


# ---- lm: the experiment ------------------------------------------------------------------------

LM_DIVERGENCES = ("fkl", "rkl", "jsd", "tvd")
LM_METHODS = (NO_TEACHER, *LM_DIVERGENCES, "AdaSPEC")


class HeldOutText:
    """Fixed held-out windows and the teacher's logits on them; scores a draft model."""

    def __init__(self, held_out: torch.Tensor, teacher: nn.Module, cfg: LMConfig):
        starts = torch.linspace(0, len(held_out) - cfg.context - 2, cfg.eval_windows).long()
        self.batch = windows(held_out, starts, cfg.context + 1)
        with torch.no_grad():
            self.teacher_logits = teacher(self.batch[:, :-1])
        self.teacher_bits = next_byte_ce(self.teacher_logits, self.batch).item() / math.log(2)

    @torch.no_grad()
    def score(self, draft: nn.Module) -> dict[str, float]:
        logits = draft(self.batch[:, :-1])
        tvd = kd_loss(logits, self.teacher_logits, divergence="tvd").item()
        return {"acceptance": 1.0 - tvd, "bits_per_byte": next_byte_ce(logits, self.batch).item() / math.log(2)}


def train_lm_teacher(train: torch.Tensor, cfg: LMConfig, progress: Progress) -> nn.Module:
    torch.manual_seed(0)
    teacher = ByteConvLM(cfg.teacher_width, cfg.layers)
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=cfg.teacher_lr)
    schedule = cosine_schedule(optimizer, cfg.teacher_steps)
    sampler = torch.Generator().manual_seed(0)
    for _ in range(cfg.teacher_steps):
        batch = random_windows(train, cfg, sampler)
        loss = next_byte_ce(teacher(batch[:, :-1]), batch)
        train_step(optimizer, loss, schedule)
        progress.update(note=f"teacher: {loss.item() / math.log(2):.2f} bits/byte")
    return teacher.eval().requires_grad_(False)


def random_windows(train: torch.Tensor, cfg: LMConfig, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(train) - cfg.context - 1, (cfg.batch,), generator=generator)
    return windows(train, starts, cfg.context + 1)


def pretrained_student(train: torch.Tensor, cfg: LMConfig, seed: int, progress: Progress) -> nn.Module:
    """The drafts' common starting point: a student trained on the text alone for a few steps."""
    torch.manual_seed(seed)
    student = ByteConvLM(cfg.student_width, cfg.layers)
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.student_lr)
    sampler = torch.Generator().manual_seed(2000 + seed)
    for _ in range(cfg.pretrain_steps):
        batch = random_windows(train, cfg, sampler)
        train_step(optimizer, next_byte_ce(student(batch[:, :-1]), batch))
        progress.update(note=f"seed {seed}: pretraining the draft")
    return student


def lm_student_loss(method: str, logits: torch.Tensor, batch: torch.Tensor, teacher_logits: torch.Tensor,
                    reference_logits: torch.Tensor | None, adaspec: AdaSPEC) -> torch.Tensor:
    if method == NO_TEACHER:
        return next_byte_ce(logits, batch)
    if method == "AdaSPEC":
        return adaspec(logits, reference_logits, teacher_logits)
    return kd_loss(logits, teacher_logits, divergence=method)


def distill_lm_students(teacher: nn.Module, train: torch.Tensor, held_out: HeldOutText,
                        cfg: LMConfig, seed: int, progress: Progress) -> dict[str, dict]:
    """Every lm student of one seed: {method: {"final": scores, "curve": [(step, scores)]}}."""
    init = pretrained_student(train, cfg, seed, progress)
    eval_every = max(1, cfg.student_steps // cfg.curve_points)
    adaspec = AdaSPEC(fraction=0.4, shift_labels=False)  # logits[t] already predict byte t + 1

    def run(methods: tuple[str, ...], reference: nn.Module | None):
        """Students for `methods` trained in lockstep over one seeded sequence of batches, so the
        frozen models run once per batch whatever the number of students."""
        students = {m: copy.deepcopy(init) for m in methods}
        optimizers = {m: torch.optim.AdamW(s.parameters(), lr=cfg.student_lr) for m, s in students.items()}
        schedules = {m: cosine_schedule(o, cfg.student_steps) for m, o in optimizers.items()}
        curves = {m: [(0, held_out.score(init))] for m in methods}  # step 0: the shared start
        sampler = torch.Generator().manual_seed(1000 + seed)
        for step in range(1, cfg.student_steps + 1):
            batch = random_windows(train, cfg, sampler)
            with torch.no_grad():
                teacher_logits = teacher(batch[:, :-1])
                reference_logits = None if reference is None else reference(batch[:, :-1])
            for m, student in students.items():
                loss = lm_student_loss(m, student(batch[:, :-1]), batch, teacher_logits, reference_logits, adaspec)
                train_step(optimizers[m], loss, schedules[m])
            if step % eval_every == 0 or step == cfg.student_steps:
                for m, student in students.items():
                    curves[m].append((step, held_out.score(student)))
            progress.update(note=f"seed {seed}: {', '.join(methods)}", work=len(methods))
        return students, {m: {"curve": c, "final": c[-1][1]} for m, c in curves.items()}

    students, results = run((NO_TEACHER, *LM_DIVERGENCES), reference=None)
    reference = students["fkl"].eval().requires_grad_(False)  # AdaSPEC's stage 1
    _, draft = run(("AdaSPEC",), reference=reference)
    return {**results, **draft}


def run_lm(cfg: LMConfig, seeds: list[int]) -> dict:
    train, held_out_bytes = stdlib_bytes()
    work_per_seed = cfg.pretrain_steps + len(LM_METHODS) * cfg.student_steps
    progress = Progress("lm ", cfg.teacher_steps + work_per_seed * len(seeds))
    started = time.perf_counter()
    teacher = train_lm_teacher(train, cfg, progress)
    held_out = HeldOutText(held_out_bytes, teacher, cfg)
    per_seed = [distill_lm_students(teacher, train, held_out, cfg, seed, progress) for seed in seeds]
    progress.close()
    return {
        "config": dataclasses.asdict(cfg),
        "data": {"train_bytes": len(train), "held_out_bytes": len(held_out_bytes),
                 "held_out_positions": held_out.batch[:, 1:].numel()},
        "teacher": {"bits_per_byte": held_out.teacher_bits,
                    "parameters": parameter_count(teacher)},
        "student_parameters": parameter_count(ByteConvLM(cfg.student_width, cfg.layers)),
        "methods": collect(per_seed, LM_METHODS),
        "seconds": time.perf_counter() - started,
    }


# ---- cls: digits -------------------------------------------------------------------------------

def mlp(hidden: int, hidden_layers: int, inputs: int = 64, classes: int = 10) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = inputs
    for _ in range(hidden_layers):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, classes))


def load_digits_split():
    """Fixed stratified 70/30 split of digits, pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16
    y = torch.tensor(digits.target, dtype=torch.long)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, stratify=y, random_state=0)
    return x_train, y_train, x_test, y_test


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(dim=1) == y).float().mean().item()


def label_ce(student_logits, teacher_logits, labels, epoch):
    return F.cross_entropy(student_logits, labels)


def cls_methods() -> dict[str, Callable]:
    """loss(student_logits, teacher_logits, labels, epoch) per distilled student."""
    from .methods.dist import DIST
    from .methods.dkd import DKD
    from .methods.hinton import HintonKD
    from .methods.nkd import NKD

    hinton, dkd, nkd, dist = HintonKD(), DKD(), NKD(), DIST()
    return {
        "teacher's labels": label_ce,
        "KD": lambda s, t, y, epoch: hinton(s, t, y),
        "DKD": lambda s, t, y, epoch: dkd(s, t, y, epoch=epoch),
        "NKD": lambda s, t, y, epoch: nkd(s, t, y),
        "DIST": lambda s, t, y, epoch: dist(s, t, y),
    }


def labeled_subset(y: torch.Tensor, per_class: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of `per_class` random examples of each class."""
    picks = []
    for c in range(int(y.max()) + 1):
        of_class = torch.nonzero(y == c).flatten()
        picks.append(of_class[torch.randperm(len(of_class), generator=generator)[:per_class]])
    return torch.cat(picks)


def train_cls_student(init: nn.Module, x: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor | None,
                      loss_fn: Callable, cfg: ClsConfig, seed: int, x_test: torch.Tensor,
                      y_test: torch.Tensor) -> dict:
    """`cfg.student_steps` AdamW steps on shuffled batches of (x, y); epochs count passes over x
    (DKD ramps its distillation term over the first 20). Test accuracy after each epoch."""
    student = copy.deepcopy(init)
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr)
    sampler = torch.Generator().manual_seed(2000 + seed)
    curve, step, epoch = [(0, {"accuracy": accuracy(student, x_test, y_test)})], 0, 0
    while step < cfg.student_steps:
        epoch += 1
        for rows in torch.randperm(len(x), generator=sampler).split(cfg.batch):
            teacher_rows = None if teacher_logits is None else teacher_logits[rows]
            train_step(optimizer, loss_fn(student(x[rows]), teacher_rows, y[rows], epoch))
            step += 1
            if step == cfg.student_steps:
                break
        curve.append((step, {"accuracy": accuracy(student, x_test, y_test)}))
    return {"curve": curve, "final": curve[-1][1]}


def run_cls(cfg: ClsConfig, seeds: list[int]) -> dict:
    x_train, y_train, x_test, y_test = load_digits_split()
    methods = cls_methods()
    progress = Progress("cls", cfg.teacher_epochs + len(seeds) * (1 + len(methods)))
    started = time.perf_counter()

    torch.manual_seed(0)
    teacher = mlp(cfg.teacher_hidden, 2)
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=cfg.teacher_lr)
    sampler = torch.Generator().manual_seed(0)
    for _ in range(cfg.teacher_epochs):
        for rows in torch.randperm(len(x_train), generator=sampler).split(cfg.batch):
            train_step(optimizer, F.cross_entropy(teacher(x_train[rows]), y_train[rows]))
        progress.update(note="teacher")
    teacher.eval().requires_grad_(False)
    teacher_logits = teacher(x_train)
    transfer_labels = teacher_logits.argmax(dim=1)  # the class of an unlabeled image, for every method

    per_seed = []
    for seed in seeds:
        labeled = labeled_subset(y_train, cfg.labeled_per_class, torch.Generator().manual_seed(seed))
        labels = transfer_labels.clone()
        labels[labeled] = y_train[labeled]
        torch.manual_seed(seed)
        init = mlp(cfg.student_hidden, 1)
        runs = {NO_TEACHER: train_cls_student(init, x_train[labeled], y_train[labeled], None, label_ce,
                                              cfg, seed, x_test, y_test)}
        progress.update(note=f"seed {seed}: {NO_TEACHER} trained")
        for name, loss_fn in methods.items():
            runs[name] = train_cls_student(init, x_train, labels, teacher_logits, loss_fn, cfg, seed,
                                           x_test, y_test)
            progress.update(note=f"seed {seed}: {name} trained")
        per_seed.append(runs)
    progress.close()
    return {
        "config": dataclasses.asdict(cfg),
        "data": {"train": len(x_train), "test": len(x_test), "labeled": 10 * cfg.labeled_per_class},
        "teacher": {"accuracy": accuracy(teacher, x_test, y_test), "parameters": parameter_count(teacher)},
        "student_parameters": parameter_count(mlp(cfg.student_hidden, 1)),
        "methods": collect(per_seed, (NO_TEACHER, *methods)),
        "seconds": time.perf_counter() - started,
    }


# ---- results -----------------------------------------------------------------------------------

def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def collect(per_seed: list[dict[str, dict]], methods) -> dict[str, dict]:
    """Per method: each measure as a list over seeds, and the curve as (step, {measure: [seeds]})."""
    out = {}
    for m in methods:
        runs = [seed_runs[m] for seed_runs in per_seed]
        measures = runs[0]["final"].keys()
        out[m] = {k: [r["final"][k] for r in runs] for k in measures}
        out[m]["curve"] = [{"step": step, **{k: [r["curve"][i][1][k] for r in runs] for k in measures}}
                           for i, (step, _) in enumerate(runs[0]["curve"])]
    return out


def spread(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    mean = statistics.fmean(values) * scale
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def markdown_table(methods: dict[str, dict], columns: list[tuple[str, str, float, int]]) -> str:
    """One row per student; columns are (header, measure, scale, digits). A last column gives the
    first measure's difference from the no-teacher student, paired seed by seed."""
    header = ["student", *(c[0] for c in columns), "vs no teacher"]
    _, measure, scale, digits = columns[0]
    baseline = methods[NO_TEACHER][measure]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, values in methods.items():
        cells = [name, *(spread(values[key], s, d) for _, key, s, d in columns)]
        if name == NO_TEACHER:
            cells.append("")
        else:
            differences = [a - b for a, b in zip(values[measure], baseline)]
            cells.append(("+" if statistics.fmean(differences) >= 0 else "") + spread(differences, scale, digits))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def report(results: dict) -> str:
    parts = []
    if "lm" in results:
        lm = results["lm"]
        parts += [
            "## lm: byte-level draft models distilled from a teacher (Python stdlib sources)",
            "",
            f"Teacher {lm['teacher']['parameters']:,} parameters, {lm['teacher']['bits_per_byte']:.3f} "
            f"bits/byte held out; students {lm['student_parameters']:,} parameters; "
            f"{lm['data']['held_out_positions']:,} held-out positions; seeds {results['seeds']}; "
            f"{lm['seconds']:.0f} s.",
            "",
            markdown_table(lm["methods"], [("acceptance rate (1 - TVD to the teacher)", "acceptance", 1.0, 3),
                                           ("held-out bits/byte", "bits_per_byte", 1.0, 3)]),
            "",
        ]
    if "cls" in results:
        cls = results["cls"]
        parts += [
            "## cls: digits, students with "
            f"{cls['data']['labeled']} labeled images and the teacher on all {cls['data']['train']}",
            "",
            f"Teacher {cls['teacher']['parameters']:,} parameters, {100 * cls['teacher']['accuracy']:.1f}% "
            f"test accuracy; students {cls['student_parameters']:,} parameters; {cls['data']['test']} "
            f"test images; seeds {results['seeds']}; {cls['seconds']:.0f} s.",
            "",
            markdown_table(cls["methods"], [("test accuracy (%)", "accuracy", 100.0, 1)]),
            "",
        ]
    return "\n".join(parts)


def plot(results: dict, path: str) -> bool:
    """Learning curves (mean over seeds, band = min..max) per task; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = [(task, measure, label) for task, measure, label in
              (("lm", "acceptance", "held-out acceptance rate vs teacher"),
               ("cls", "accuracy", "test accuracy")) if task in results]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, (task, measure, label) in zip(axes[0], panels):
        for name, data in results[task]["methods"].items():
            steps = [point["step"] for point in data["curve"]]
            values = [point[measure] for point in data["curve"]]
            line, = ax.plot(steps, [statistics.fmean(v) for v in values], label=name,
                            linestyle="--" if name == NO_TEACHER else "-")
            ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values],
                            color=line.get_color(), alpha=0.15)
        ax.set_title(f"{task}: {label}")
        ax.set_xlabel("student optimizer step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---- command line ------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="kdops-demo" if os.path.basename(sys.argv[0]) == "kdops-demo" else "python -m kdops.demo",
        description="Train teachers on the CPU, distill students from them with kdops ops and methods "
                    "over several seeds, print a table of the results (see the module's docstring).")
    parser.add_argument("--task", choices=("lm", "cls", "all"), default="all",
                        help="lm: byte-level draft models (acceptance rate); cls: digits (accuracy)")
    parser.add_argument("--small", action="store_true", help="the CI configuration (under a minute on 2 cores)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (full: 5, small: 3)")
    parser.add_argument("--out", default="kdops-demo", help="directory for demo.json and demo.png")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.seeds is not None and args.seeds < 1:
        parser.error(f"--seeds must be >= 1; got {args.seeds}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1; got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.task in ("cls", "all"):
        try:
            import sklearn  # noqa: F401
        except ImportError:
            parser.exit(2, f"kdops.demo: {SKLEARN_MISSING}\n")

    os.makedirs(args.out, exist_ok=True)  # before the training, so that a bad path fails at once
    config = "small" if args.small else "full"
    lm_cfg, cls_cfg, default_seeds = CONFIGS[config]
    seeds = list(range(args.seeds if args.seeds is not None else default_seeds))
    results: dict = {"configuration": config, "seeds": seeds, "threads": torch.get_num_threads(),
                     "torch": torch.__version__, "python": platform.python_version(),
                     "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    if args.task in ("lm", "all"):
        results["lm"] = run_lm(lm_cfg, seeds)
    if args.task in ("cls", "all"):
        results["cls"] = run_cls(cls_cfg, seeds)

    table = report(results)
    print(table)
    json_path = os.path.join(args.out, "demo.json")
    with open(json_path, "w") as f:
        json.dump({**results, "table": table}, f, indent=1)
    png_path = os.path.join(args.out, "demo.png")
    if plot(results, png_path):
        print(f"wrote {json_path} and {png_path}", file=sys.stderr)
    else:
        print(f"wrote {json_path}; matplotlib is not installed, so no plot (pip install matplotlib)",
              file=sys.stderr)
    return results


def cli() -> None:
    """The ``kdops-demo`` console script (``main`` returns the results, which a script must not)."""
    main()


if __name__ == "__main__":
    cli()
