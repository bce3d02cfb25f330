"""What a default run shows: the samples figure says what its marks and colours mean and marks what the run aims at,
the first build of a world says what it is doing and for how long, --help lists every toy world, and each world's
command-line defaults are its own (docs/toys.md, "World defaults")."""
from __future__ import annotations

import json

import matplotlib
import pytest
import torch

matplotlib.use("Agg")
import matplotlib.figure  # noqa: E402

import diff_instruct_pp  # noqa: E402
import harness  # noqa: E402
import pso  # noqa: E402
import sharpening  # noqa: E402
import toy  # noqa: E402
from toy.flow2d import Flow2D  # noqa: E402
from toy.toy2d import Toy2D  # noqa: E402


@pytest.fixture
def saved_figures(monkeypatch):
    """Every figure a plot saves (its legend and titles are then read), instead of reading pixels."""
    figures = []
    original = matplotlib.figure.Figure.savefig

    def record(self, *args, **kw):
        figures.append(self)
        return original(self, *args, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    return figures


def legend_labels(fig) -> list[str]:
    return [t.get_text() for legend in fig.legends for t in legend.get_texts()]


@pytest.mark.parametrize("marks, expected, absent", [
    ("target", "target modes (the target split)", "rewarded modes (reward 'modes')"),
    ("reward", "rewarded modes (reward 'modes')", "target modes (the target split)"),
    (None, "class 0 samples", "target modes (the target split)"),
])
def test_toy2d_figure_has_a_legend_and_marks_what_the_run_aims_at(toy2d_tiny, tmp_path, saved_figures, marks,
                                                                  expected, absent):
    g = torch.Generator().manual_seed(0)
    c = toy2d_tiny.eval_conditions(60)
    x = toy2d_tiny.data_for(c, g)
    toy2d_tiny.plot_samples({"a long title that has to wrap onto a second line to fit": (x, c), "b": (x, c)},
                            tmp_path / "s.png", marks=marks)
    labels = legend_labels(saved_figures[-1])
    assert {"class 0 samples", "class 1 samples", "class 2 samples", "modes of class 0"} <= set(labels)
    assert expected in labels and absent not in labels
    assert "\n" in saved_figures[-1].axes[0].get_title()  # wrapped, not clipped
    assert (tmp_path / "s.png").stat().st_size > 0


def test_toy2d_figure_marks_the_height_reward_with_an_arrow(toy2d_tiny_height, tmp_path, saved_figures):
    c = toy2d_tiny_height.eval_conditions(30)
    x = toy2d_tiny_height.data_for(c, torch.Generator().manual_seed(0))
    toy2d_tiny_height.plot_samples({"a": (x, c)}, tmp_path / "s.png", marks="reward")
    assert "reward = height y (unbounded)" in legend_labels(saved_figures[-1])


def test_figure_marks_are_checked(toy2d_tiny, mnist_tiny, tmp_path):
    c = torch.zeros(4, dtype=torch.long)
    for world, x in ((toy2d_tiny, torch.zeros(4, 2)), (mnist_tiny, torch.zeros(4, 1, 28, 28))):
        with pytest.raises(ValueError, match="marks must be None, 'target' or 'reward'"):
            world.plot_samples({"a": (x, c)}, tmp_path / "s.png", marks="modes")


def test_mnist_figure_names_the_columns_and_the_aim(mnist_tiny, tmp_path, saved_figures):
    c = mnist_tiny.eval_conditions(40)
    x = torch.zeros(40, 1, 28, 28)
    mnist_tiny.plot_samples({"base": (x, c)}, tmp_path / "s.png", marks="reward")
    fig = saved_figures[-1]
    assert fig.axes[0].get_xlabel() == "columns: conditioned digit 0-9"
    assert any("log-probability of the classifier's bold head" in t.get_text() for t in fig.texts)


@pytest.mark.parametrize("variant, marks", [("naive", "target"), ("online", "reward")])
def test_a_run_hands_its_marks_to_the_figure(toy2d_tiny, tmp_path, monkeypatch, variant, marks):
    seen = []
    monkeypatch.setattr(Toy2D, "plot_samples", lambda self, panels, path, marks=None: seen.append(marks))
    pso.train(pso.Config(variant=variant, steps=1, batch=4, eval_samples=8, eval_every=1, out=str(tmp_path / "r"),
                         progress=False), world=toy2d_tiny)
    assert seen == [marks]


def test_sharpening_and_dipp_runs_mark_the_reward(toy2d_tiny, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(Toy2D, "plot_samples", lambda self, panels, path, marks=None: seen.append(marks))
    sharpening.train(sharpening.Config(variant="rlhf", n=2, m=1, steps=1, batch=2, final_samples=8, eval_samples=8,
                                       out=str(tmp_path / "s"), progress=False), world=toy2d_tiny)
    diff_instruct_pp.train(diff_instruct_pp.Config(steps=1, batch=4, eval_samples=8, reward_scale=0.5,
                                                   out=str(tmp_path / "d"), progress=False), world=toy2d_tiny)
    diff_instruct_pp.train(diff_instruct_pp.Config(steps=1, batch=4, eval_samples=8, reward_scale=0.0,
                                                   out=str(tmp_path / "d0"), progress=False), world=toy2d_tiny)
    assert seen == ["reward", "reward", None]  # plain Diff-Instruct (alpha_rew 0) aims at no reward


def test_first_build_says_what_and_how_long(tmp_path, capsys):
    results = tmp_path / "base_models.json"
    results.write_text(json.dumps({"flow2d": {"build_seconds": 270.0, "machine": "x86_64, 2 threads",
                                              "load_average_at_start": 0.5}}))
    assert toy.build_estimate("flow2d", "full", results).startswith("4.5 min when measured on x86_64, 2 threads")
    assert toy.build_estimate("mnist", "full", results) == "a few minutes on a laptop CPU"  # not measured
    assert toy.build_estimate("flow2d", "tiny", results) == "seconds"
    toy.load_world("toy2d", cache=tmp_path / "cache", budget="tiny", progress=False)
    err = capsys.readouterr().err
    assert "first use of toy2d: building its base models once (tiny budget; seconds), then cached in" in err


@pytest.mark.parametrize("module", [pso, sharpening, diff_instruct_pp])
def test_help_lists_every_toy_world(module, capsys):
    with pytest.raises(SystemExit):
        module.main(["--help"])
    assert "toy2d | flow2d | mnist" in " ".join(capsys.readouterr().out.split())


def test_each_world_has_its_own_command_line_defaults():
    """flow2d does not inherit toy2d's Eq. 5 setting (its loss saturates there), and DI++'s default on each 2-D world
    moves the reward visibly (benchmarks/results/world_defaults.md)."""
    toy2d, flow2d = Toy2D(None), Flow2D(None)
    assert toy2d.method_defaults("pso", "pso") == {"beta": 7.0, "train_steps": 16}
    assert flow2d.method_defaults("pso", "pso")["beta"] != 7.0
    for world in (toy2d, flow2d):
        assert world.method_defaults("diff_instruct_pp", "dipp")["reward_scale"] > 0
        assert world.method_defaults("pso", "online") == {}  # only what was measured is set


def test_world_defaults_fill_only_what_the_command_line_leaves_out(toy2d_tiny):
    given = harness.parse_config(diff_instruct_pp.Config, ["--reward-scale", "0.1"])
    cfg, used = harness.apply_world_defaults(given, toy2d_tiny, "diff_instruct_pp")
    assert cfg.reward_scale == 0.1 and "reward_scale" not in used
    cfg, used = harness.apply_world_defaults(harness.parse_config(diff_instruct_pp.Config, []), toy2d_tiny,
                                             "diff_instruct_pp")
    assert used["reward_scale"] == toy2d_tiny.method_defaults("diff_instruct_pp", "dipp")["reward_scale"]
