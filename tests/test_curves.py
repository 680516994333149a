"""Training-curve plots from metrics.jsonl: reading, smoothing, PNG output, CLI, errors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from modformer.cli_args_train import add_plot_arguments  # noqa: E402
from modformer.commands.plot_curves import run_plot  # noqa: E402
from modformer.eval.curves import ema, plot_training_curves, read_curves  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir: Path, losses: list[float], tokens_per_step: int = 512) -> Path:
    """A metrics.jsonl shaped like the trainer's: training records every 10 steps, an
    evaluation every 20, and the final evaluation record."""
    run_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for i, loss in enumerate(losses):
        step = 10 * (i + 1)
        records.append(
            {
                "step": step,
                "loss": loss,
                "lm_loss": loss,
                "lr": 1e-3,
                "tokens_seen": step * tokens_per_step,
            }
        )
        if step % 20 == 0:
            records.append(
                {"step": step, "val_loss": loss + 0.1, "val_ppl": float(np.exp(loss + 0.1))}
            )
    records.append({"step": 10 * len(losses), "val_loss": losses[-1] + 0.05, "val_ppl": 1.0})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == PNG_SIGNATURE
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


def test_read_curves_separates_train_and_val(tmp_path):
    run = write_run(tmp_path / "a", [3.0, 2.5, 2.0, 1.8])
    curves = read_curves(run)
    np.testing.assert_array_equal(curves.train_steps, [10, 20, 30, 40])
    np.testing.assert_allclose(curves.train_loss, [3.0, 2.5, 2.0, 1.8])
    # step 20 and 40 evaluations; the final record (step 40) replaces the periodic one
    np.testing.assert_array_equal(curves.val_steps, [20, 40])
    np.testing.assert_allclose(curves.val_loss, [2.6, 1.85])
    assert curves.tokens_per_step == 512
    assert curves.name == "a"


def test_ema_matches_hand_computation():
    values = np.array([1.0, 3.0, 2.0])
    # bias-corrected EMA with factor 0.5: a1 = 0.5, a2 = 1.75, a3 = 1.875
    expected = [0.5 / 0.5, 1.75 / 0.75, 1.875 / 0.875]
    np.testing.assert_allclose(ema(values, 0.5), expected)
    np.testing.assert_array_equal(ema(values, 0.0), values)
    with pytest.raises(ValueError, match="smoothing"):
        ema(values, 1.0)


@pytest.mark.parametrize("x_axis", ["step", "tokens"])
def test_plot_writes_png_with_one_line_per_run(tmp_path, x_axis):
    runs = [
        write_run(tmp_path / "gpt", [3.0, 2.6, 2.2, 2.0, 1.9, 1.85]),
        write_run(tmp_path / "mom", [3.1, 2.5, 2.1, 1.9, 1.8, 1.7], tokens_per_step=1024),
    ]
    out = plot_training_curves(
        runs, tmp_path / "plots" / "curves.png", labels=["GPT", "MoM"], x_axis=x_axis, smoothing=0.3
    )
    assert out.is_file()
    width, height = png_size(out)
    assert width > 800 and height > 300
    assert out.stat().st_size > 10_000  # a drawn figure, not an empty canvas
    assert not list(out.parent.glob(".curves.png.*"))  # no temp file left behind


def test_different_runs_draw_different_pictures(tmp_path):
    a = write_run(tmp_path / "a", [3.0, 2.0, 1.5, 1.2])
    b = write_run(tmp_path / "b", [3.0, 2.9, 2.8, 2.7])
    plot_training_curves([a], tmp_path / "a.png")
    plot_training_curves([b], tmp_path / "b.png")
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "b.png").read_bytes()


def test_cli_plot(tmp_path, capsys):
    run = write_run(tmp_path / "run", [3.0, 2.0])
    parser = argparse.ArgumentParser()
    add_plot_arguments(parser)
    args = parser.parse_args(
        [str(run / "metrics.jsonl"), "--out", str(tmp_path / "c.png"), "--log-y", "--x", "tokens"]
    )
    assert run_plot(args) == tmp_path / "c.png"
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "wrote" in capsys.readouterr().out


def test_bad_inputs_raise_clear_errors(tmp_path):
    out = tmp_path / "x.png"
    with pytest.raises(ValueError, match="no metrics file"):
        plot_training_curves([tmp_path / "missing"], out)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="holds no loss or val_loss"):
        plot_training_curves([empty], out)
    (empty / "metrics.jsonl").write_text('{"step": 1, "lr": 0.1}\n')
    with pytest.raises(ValueError, match="holds no loss or val_loss"):
        plot_training_curves([empty], out)
    (empty / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\nnot json\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        plot_training_curves([empty], out)
    run = write_run(tmp_path / "ok", [2.0, 1.0])
    with pytest.raises(ValueError, match="one label per run"):
        plot_training_curves([run], out, labels=["a", "b"])
    with pytest.raises(ValueError, match="must be a .png"):
        plot_training_curves([run], tmp_path / "x.pdf")
    with pytest.raises(ValueError, match="no runs given"):
        plot_training_curves([], out)
    (empty / "metrics.jsonl").write_text('{"step": 10, "val_loss": 2.0}\n')
    with pytest.raises(ValueError, match="no tokens_seen"):
        plot_training_curves([empty], out, x_axis="tokens")
    assert not out.exists()


def test_phase2_runs_are_drawn_from_where_phase1_ended(tmp_path, monkeypatch):
    import modformer.eval.curves as curves

    phase1 = write_run(tmp_path / "vanilla", [3.0, 2.5, 2.2, 2.0])  # 40 steps x 512 tokens
    phase2 = write_run(tmp_path / "mom", [1.9, 1.8])
    assert curves.run_length(phase1) == 40 * 512 and curves.run_length(phase1, "step") == 40
    drawn = []
    monkeypatch.setattr(curves, "_atomic_savefig", lambda figure, out: drawn.append(figure))
    offset = curves.run_length(phase1)
    plot_training_curves(
        [phase1, phase2], tmp_path / "c.png", x_axis="tokens", x_offsets=[0, offset]
    )
    train_axes, val_axes = drawn[0].axes[:2]
    np.testing.assert_array_equal(
        train_axes.lines[1].get_xdata(), offset + np.array([10, 20]) * 512
    )
    np.testing.assert_array_equal(val_axes.lines[1].get_xdata(), offset + np.array([20]) * 512)
    assert train_axes.lines[1].get_xdata()[0] > train_axes.lines[0].get_xdata()[-1]
    with pytest.raises(ValueError, match="1 x offsets for 2 runs"):
        plot_training_curves([phase1, phase2], tmp_path / "d.png", x_offsets=[0])
