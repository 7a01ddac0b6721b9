"""kdops.demo's small configuration (the CI run, under a minute on 2 cores): on held-out data every
distilled student beats the student trained without the teacher, averaged over the seeds.

lm: held-out acceptance rate against the teacher (1 - TVD), the measure a draft model is trained
for (kdops/demo.py's docstring says why not held-out bits per byte). cls: held-out accuracy.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys

import pytest
import torch

from kdops import demo

HAS_SKLEARN = importlib.util.find_spec("sklearn") is not None
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """One in-process run of `--small`, on one thread. On an idle 2-core machine a second thread
    saved about a fifth (28 s wall on two threads, 34 s of CPU on one), but with the other core
    busy the two threads wait on each other: 234 s against 52 s on one thread."""
    out = tmp_path_factory.mktemp("demo")
    task = "all" if HAS_SKLEARN else "lm"
    threads = torch.get_num_threads()
    try:
        yield demo.main(["--small", "--task", task, "--threads", "1", "--out", str(out)]), out
    finally:
        torch.set_num_threads(threads)


def mean_of(methods: dict, name: str, measure: str) -> float:
    return statistics.fmean(methods[name][measure])


def test_lm_distilled_drafts_beat_the_draft_trained_without_teacher(small_run):
    results, _ = small_run
    methods = results["lm"]["methods"]
    assert set(methods) == set(demo.LM_METHODS)
    assert all(len(m["acceptance"]) == len(results["seeds"]) >= 3 for m in methods.values())
    baseline = mean_of(methods, demo.NO_TEACHER, "acceptance")
    assert 0.0 < baseline < 1.0
    for name in demo.LM_METHODS[1:]:
        assert mean_of(methods, name, "acceptance") > baseline, name


@pytest.mark.skipif(not HAS_SKLEARN, reason="the classification demo needs scikit-learn")
def test_cls_distilled_students_beat_the_student_trained_without_teacher(small_run):
    results, _ = small_run
    methods = results["cls"]["methods"]
    assert set(methods) == {demo.NO_TEACHER, "teacher's labels", "KD", "DKD", "NKD", "DIST"}
    baseline = mean_of(methods, demo.NO_TEACHER, "accuracy")
    assert results["cls"]["teacher"]["accuracy"] > baseline
    for name in methods:
        if name != demo.NO_TEACHER:
            assert mean_of(methods, name, "accuracy") > baseline, name


def test_table_json_and_plot_are_written(small_run, capsys):
    results, out = small_run
    saved = json.loads((out / "demo.json").read_text())
    assert saved["seeds"] == results["seeds"]
    assert saved["lm"]["methods"]["fkl"]["acceptance"] == results["lm"]["methods"]["fkl"]["acceptance"]
    table = saved["table"]
    assert "| student | acceptance rate" in table and "| AdaSPEC |" in table
    if HAS_SKLEARN:
        assert "| DIST |" in table
    assert (out / "demo.png").exists() == HAS_MATPLOTLIB


def test_without_matplotlib_there_is_no_plot(small_run, tmp_path, monkeypatch):
    results, _ = small_run
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    assert demo.plot(results, str(tmp_path / "demo.png")) is False
    assert not (tmp_path / "demo.png").exists()


def test_without_sklearn_the_demo_says_what_to_install(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import raises ImportError
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--small", "--task", "all", "--out", str(out)])
    assert exit_info.value.code == 2
    assert "pip install scikit-learn" in capsys.readouterr().err
    assert not out.exists()  # it stopped before doing anything


@pytest.mark.parametrize("argv", [["--seeds", "0"], ["--threads", "0"], ["--task", "gan"]])
def test_bad_arguments_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        demo.main(argv)
    assert "error" in capsys.readouterr().err


def test_byte_lm_is_causal():
    """Logits at position t must not depend on later bytes (else the teacher would see the answer)."""
    torch.manual_seed(0)
    model = demo.ByteConvLM(width=8, layers=3)
    tokens = torch.randint(0, 256, (2, 20))
    changed = tokens.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % 256
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    torch.testing.assert_close(before[:, :12], after[:, :12], rtol=0, atol=0)
    assert not torch.allclose(before[:, 12:], after[:, 12:])
