"""``eplb simulate --plot``: a run identical to the baseline does not hide it."""

from __future__ import annotations

import pytest
import torch

from eplb_plugin.cli import simulate as sim_cli
from eplb_plugin.simulate import ReplayResult

pytest.importorskip("matplotlib")


def _result(label: str, values: list[float]) -> ReplayResult:
    return ReplayResult(
        label=label, steps=list(range(4, 4 + len(values))),
        balancedness=torch.tensor(values, dtype=torch.float64), slots_moved=[], plan_ms=[],
    )  # fmt: skip


def _lines(tmp_path, monkeypatch, results):
    import matplotlib.pyplot as plt

    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: (figures.append(fig), close(fig)))
    sim_cli.write_plot(str(tmp_path / "p.png"), results, "t", interval=2)
    assert (tmp_path / "p.png").stat().st_size > 0
    (ax,) = figures[0].axes
    named = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
    return {line.get_label().split("  ")[0]: line for line in named}, ax


def test_baseline_is_drawn_over_an_identical_run_and_the_legend_says_so(tmp_path, monkeypatch):
    baseline = _result("baseline (deepseek/static, window sum)", [0.9, 0.8, 0.85])
    same = _result("deepseek/static", [0.9, 0.8, 0.85])
    other = _result("deepseek/global", [0.95, 0.97, 0.96])
    lines, ax = _lines(tmp_path, monkeypatch, [baseline, _result("oracle", [1, 1, 1]), same, other])
    base = lines["baseline (deepseek/static, window sum)"]
    assert base.get_linestyle() == "--"
    assert base.get_zorder() > lines["deepseek/static"].get_zorder()
    assert lines["deepseek/static"].get_linewidth() > base.get_linewidth()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(t.startswith("deepseek/static") and "identical to baseline" in t for t in legend)
    assert not any(t.startswith("deepseek/global") and "identical" in t for t in legend)
    assert not any(t.startswith("baseline") and "identical" in t for t in legend)


def test_a_run_that_differs_in_one_step_is_not_called_identical(tmp_path, monkeypatch):
    baseline = _result("baseline (deepseek/static, window sum)", [0.9, 0.8, 0.85])
    close = _result("default/static", [0.9, 0.8, 0.8500001])
    lines, ax = _lines(tmp_path, monkeypatch, [baseline, close])
    assert "identical" not in " ".join(t.get_text() for t in ax.get_legend().get_texts())
    base = lines["baseline (deepseek/static, window sum)"]
    assert lines["default/static"].get_linewidth() == base.get_linewidth()
