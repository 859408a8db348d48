"""Every figure function runs on tiny data and writes a non-empty PNG."""

import math

import pytest
import torch

from ppl_vae.elbo import LinearWarmup
from ppl_vae.runs import image_plots, latent_plots, training_plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

HISTORY = [
    {
        "epoch": e,
        "step": 10 * e,
        "beta": min(1.0, 0.4 * e),
        "train_objective": -40.0 + 3 * e,
        "val_elbo": -38.0 + 3 * e,
        "val_reconstruction": -36.0 + 3 * e,
        "val_kl": 0.02 * e,  # collapsed: the KL stays near zero
    }
    for e in range(1, 5)
]


def _figures():
    generator = torch.Generator().manual_seed(0)
    mu = torch.randn(40, 4, generator=generator)
    log_var = torch.randn(40, 4, generator=generator)
    labels = torch.arange(40) % 3
    qs = [0.1, 0.5, 0.8, 0.9]
    return {
        "training_curves": lambda: training_plots.training_curves_figure(HISTORY),
        "training_curves_schedule": lambda: training_plots.training_curves_figure(
            HISTORY, schedule=LinearWarmup(25)
        ),
        "latent_space_kl": lambda: latent_plots.latent_space_figure(mu, labels, log_var=log_var),
        "latent_space_pca": lambda: latent_plots.latent_space_figure(mu, labels, projection="pca"),
        "latent_space_2d": lambda: latent_plots.latent_space_figure(mu[:, :2]),
        "latent_space_1d": lambda: latent_plots.latent_space_figure(mu[:, :1], labels),
        "gaussian_kl": lambda: latent_plots.gaussian_kl_figure(n=30),
        "samples": lambda: image_plots.image_grid(torch.rand(12, 16), (1, 4, 4), ncol=6),
        "reconstructions": lambda: image_plots.reconstructions_figure(
            torch.rand(10, 16), torch.rand(10, 16), (1, 4, 4)
        ),
        "interpolations": lambda: image_plots.interpolations_figure(
            torch.rand(2, 5, 16), (1, 4, 4)
        ),
        "class_rows": lambda: image_plots.class_rows_figure(
            torch.rand(3, 5, 16), (1, 4, 4), ["a", "b", "c"], title="by class"
        ),
        "latent_space_named": lambda: latent_plots.latent_space_figure(
            mu, labels, log_var=log_var, class_names=["cat", "dog", "bird"]
        ),
        "rate_distortion": lambda: latent_plots.rate_distortion_figure(
            [8.0, 4.0, 1.0], [20.0, 23.0, 30.0], [0.5, 1.0, 4.0]
        ),
        "rate_distortion_one_point": lambda: latent_plots.rate_distortion_figure([0.0], [30.0]),
        "iwae": lambda: latent_plots.iwae_figure(
            [1, 10, 100], [-30.0, -29.6, -29.5], -30.0, iwae_se=[0.05, 0.05, 0.05]
        ),
        "toy_gap": lambda: latent_plots.toy_gap_figure(
            qs, [q * math.log(0.8) + (1 - q) * math.log(0.2) for q in qs], math.log(0.5)
        ),
        "particles": lambda: training_plots.particles_figure(
            [10, 100], [-0.7, -0.72], [0.02, 0.01], -0.72, -0.69
        ),
    }


@pytest.mark.parametrize("name", sorted(_figures()))
def test_figure_writes_a_png(name, tmp_path):
    path = image_plots.save(_figures()[name](), tmp_path / "sub" / f"{name}.png")
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_figures_refuse_inputs_they_cannot_draw():
    with pytest.raises(ValueError, match="no rows"):
        training_plots.training_curves_figure([])
    with pytest.raises(ValueError, match="projection"):
        latent_plots.latent_space_figure(torch.zeros(5, 3), projection="tsne")
    with pytest.raises(ValueError, match="log_var or kl_per_dim"):
        latent_plots.latent_space_figure(torch.zeros(5, 3))
    with pytest.raises(ValueError, match="same length"):
        latent_plots.rate_distortion_figure([1.0, 2.0], [3.0])
    with pytest.raises(ValueError, match="steps >= 2"):
        image_plots.interpolations_figure(torch.rand(2, 1, 16), (1, 4, 4))


def test_warmup_spans_follow_the_schedule():
    assert training_plots._warmup_spans(LinearWarmup(25), HISTORY, 40) == [(0, 25)]
    assert training_plots._warmup_spans(None, HISTORY, 40) == [
        (0, 30)
    ]  # beta < 1 up to epoch 2's end
    constant = [{**row, "beta": 1.0} for row in HISTORY]
    assert training_plots._warmup_spans(None, constant, 40) == []


@pytest.mark.parametrize(
    ("n", "shape", "ncol"), [(12, (1, 4, 4), 6), (13, (4, 4), 5), (6, (3, 2, 3), 3)]
)
def test_image_tiles_sit_in_a_grid_with_one_pixel_lines(n, shape, ncol):
    # Written out by index: tile i at row i // ncol, column i % ncol, each tile h x w after a
    # 1-pixel line of value 1, the lines also framing the grid; empty cells stay 1.
    c, h, w = (1, *shape) if len(shape) == 2 else shape
    images = torch.rand(n, c * h * w, generator=torch.Generator().manual_seed(n)) * 1.2 - 0.1
    canvas = image_plots._tile(images, shape, ncol)
    rows = -(-n // ncol)
    expected = torch.ones(c, rows * (h + 1) + 1, ncol * (w + 1) + 1)
    tiles = images.clamp(0, 1).reshape(n, c, h, w)
    for i in range(n):
        top, left = 1 + (i // ncol) * (h + 1), 1 + (i % ncol) * (w + 1)
        expected[:, top : top + h, left : left + w] = tiles[i]
    expected = expected[0] if c == 1 else expected.permute(1, 2, 0)
    assert torch.equal(canvas, expected)


@pytest.mark.parametrize("z_dim", [1, 2, 4])
def test_latent_space_legend_shows_the_class_names(z_dim):
    generator = torch.Generator().manual_seed(z_dim)
    mu = torch.randn(30, z_dim, generator=generator)
    log_var = torch.randn(30, z_dim, generator=generator)
    labels = torch.tensor([0, 2, 3] * 10)  # class 1 absent: no legend entry for it
    names = ["cat", "dog", "bird", "fish"]
    fig = latent_plots.latent_space_figure(mu, labels, log_var=log_var, class_names=names)
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    shown = ["cat", "bird", "fish"]
    # Above one dimension the prior's circles come first in the legend.
    assert texts == (shown if z_dim == 1 else ["prior's 1, 2 sigma", *shown])
    # Each name labels the points of its own class: the x coordinate of a point is mu's first
    # column for z = 1, 2 (for z = 4 the KL projection picks columns; compare as a set).
    scatters = {c.get_label(): c.get_offsets() for c in ax.collections}
    assert sorted(scatters) == sorted(shown)
    for k, name in enumerate(names):
        if name not in shown:
            continue
        xs = torch.as_tensor(scatters[name][:, 0], dtype=torch.float64)
        assert xs.shape[0] == int((labels == k).sum())
        if z_dim <= 2:
            torch.testing.assert_close(xs, mu[labels == k, 0].double())
        else:
            column = [c for c in range(z_dim) if torch.allclose(xs, mu[labels == k, c].double())]
            assert len(column) == 1
    # Without names the legend shows the labels themselves.
    plain = latent_plots.latent_space_figure(mu, labels, log_var=log_var)
    plain_texts = [t.get_text() for t in plain.axes[0].get_legend().get_texts()]
    assert plain_texts[-3:] == ["0", "2", "3"]


def test_latent_space_class_names_must_cover_the_labels():
    mu, labels = torch.zeros(6, 2), torch.tensor([0, 1, 2, 0, 1, 2])
    with pytest.raises(ValueError, match=r"labels \[2\] have no entry in the 2 class_names"):
        latent_plots.latent_space_figure(mu, labels, class_names=["a", "b"])
    with pytest.raises(ValueError, match="pass labels too"):
        latent_plots.latent_space_figure(mu, class_names=["a", "b", "c"])


@pytest.mark.parametrize(
    ("shape", "c", "n"), [((1, 4, 4), 3, 5), ((3, 2, 3), 2, 4), ((5, 6), 4, 1)]
)
def test_class_rows_name_each_row(shape, c, n):
    h, w = shape[-2], shape[-1]
    channels = 1 if len(shape) == 2 else shape[0]
    images = torch.rand(c, n, channels * h * w, generator=torch.Generator().manual_seed(c))
    names = [f"class {k}" for k in range(c)]
    fig = image_plots.class_rows_figure(images, shape, names, title="t")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == names
    # Row k's tiles cover canvas rows 1 + k (h + 1) .. k (h + 1) + h, a 1-pixel line around
    # each; its label sits at their middle.
    assert ax.get_yticks().tolist() == [1 + k * (h + 1) + (h - 1) / 2 for k in range(c)]
    shown = torch.as_tensor(ax.images[0].get_array())
    for k in range(c):
        for j in range(n):
            top, left = 1 + k * (h + 1), 1 + j * (w + 1)
            tile = shown[top : top + h, left : left + w]
            expected = images[k, j].reshape(channels, h, w)
            expected = expected[0] if channels == 1 else expected.permute(1, 2, 0)
            torch.testing.assert_close(tile.float(), expected)
    assert ax.get_title() == "t"


def test_class_rows_refuse_bad_input():
    images = torch.rand(3, 5, 16)
    with pytest.raises(ValueError, match=r"\(classes, n, D\).*got shape \(15, 16\)"):
        image_plots.class_rows_figure(images.reshape(15, 16), (1, 4, 4), ["a", "b", "c"])
    with pytest.raises(ValueError, match="D = 1 x 4 x 5 = 20"):
        image_plots.class_rows_figure(images, (1, 4, 5), ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"each of the 3 rows.*got 2 names"):
        image_plots.class_rows_figure(images, (1, 4, 4), ["a", "b"])
    with pytest.raises(ValueError, match="not one string"):
        image_plots.class_rows_figure(images, (1, 4, 4), "abc")
    with pytest.raises(ValueError, match="at least one class and one image"):
        image_plots.class_rows_figure(torch.rand(3, 0, 16), (1, 4, 4), ["a", "b", "c"])
