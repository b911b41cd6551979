import pytest
from matplotlib import pyplot as plt
from PIL import Image

from fasttrack.lib.plots import PANEL_H, PANEL_W, loss_curves, metric_bars

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()
        return im.size


def _history(n: int, eval_every: int = 5) -> list[dict]:
    out = [{"eval_loss": 5.0, "step": 0}]  # eval_before
    for step in range(1, n + 1):
        out.append({"loss": 5.0 / step, "learning_rate": 1e-3, "epoch": step / n, "step": step})
        if step % eval_every == 0:
            out.append({"eval_loss": 5.5 / step, "eval_runtime": 0.1, "step": step})
    out.append({"train_runtime": 1.0, "train_loss": 2.0, "step": n})  # the final summary
    return out


def test_loss_curves_png(tmp_path):
    histories = {"pretrain": _history(20), "sft": _history(10), "dpo": [], "rag": [{"step": 3}]}
    path = loss_curves(histories, tmp_path / "sub" / "loss.png")
    assert path == tmp_path / "sub" / "loss.png"
    # "dpo" and "rag" have no points: two panels in one row.
    assert _png_size(path) == (2 * PANEL_W, PANEL_H)
    assert plt.get_fignums() == []


def test_loss_curves_eval_only_and_wrapping(tmp_path):
    stages = {f"s{i}": [{"eval_loss": 1.0, "step": 1}] for i in range(4)}
    assert _png_size(loss_curves(stages, tmp_path / "l.png")) == (3 * PANEL_W, 2 * PANEL_H)


@pytest.mark.parametrize("histories", [{}, {"sft": []}, {"sft": [{"train_loss": 1.0}]}])
def test_loss_curves_nothing_to_plot(tmp_path, histories):
    with pytest.raises(ValueError):
        loss_curves(histories, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_metric_bars_png(tmp_path):
    table = [
        {"model": "base", "perplexity": 120.0, "rouge1": None, "bleu": 0.01},
        {"model": "sft", "perplexity": 30.0, "rouge1": 0.4, "bleu": 0.12},
        {"model": "dpo", "perplexity": None, "rouge1": 0.45},
    ]
    path = metric_bars(table, ["perplexity", "rouge1", "bleu", "sft_loss"], tmp_path / "bars.png")
    # "sft_loss" has no values at all and is skipped: three panels.
    assert _png_size(path) == (3 * PANEL_W, PANEL_H)
    assert plt.get_fignums() == []


def test_metric_bars_deterministic_size(tmp_path):
    table = [{"model": "m", "rouge1": 0.5}]
    a = metric_bars(table, ["rouge1"], tmp_path / "a.png")
    b = metric_bars(table * 5, ["rouge1"], tmp_path / "b.png")
    assert _png_size(a) == _png_size(b) == (PANEL_W, PANEL_H)


@pytest.mark.parametrize(
    ("table", "metrics"),
    [([], ["rouge1"]), ([{"model": "m", "rouge1": 0.1}], []), ([{"model": "m"}], ["rouge1"])],
)
def test_metric_bars_nothing_to_plot(tmp_path, table, metrics):
    with pytest.raises(ValueError):
        metric_bars(table, metrics, tmp_path / "x.png")
