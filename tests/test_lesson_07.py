"""Lesson 07, labels for free (M2): every view of the notebook, driven at several values and
checked against computations written here from the trained networks themselves: the
closed-form Gaussian KL, E_q[log p(x | y, z)] by Gauss-Hermite quadrature over z (no draws),
U(x) = sum_y q(y | x) L(x, y) + H(q) from those, test accuracies and confusion counts
from the classifiers' own argmax, and the class rows decoded one class at a time.

Monte Carlo numbers are compared with |difference| <= Z_BOUND * s.e. (+ FLOAT32, the rounding
of the networks' float32 outputs), the s.e. being the one the notebook reports for its own
draws: a two-sided normal tail of 7e-6 per check. Seeds are fixed, so every run draws the
same numbers.
"""

import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lessons import Driver, run_notebook

NOTEBOOK = "07_labels_for_free.ipynb"
Z_BOUND = 4.5
FLOAT32 = 1e-4  # nats: float32 networks summed over 9 pixels, against float64 sums here
NODES = 40  # Gauss-Hermite nodes per dimension of z (2-D: 1,600 points)


@pytest.fixture(scope="module")
def namespace(tmp_path_factory):
    return run_notebook(NOTEBOOK, tmp_path_factory.mktemp("lesson_07"))


@pytest.fixture(scope="module")
def drive(namespace):
    return Driver(namespace)


def gaussian_kl(mu, log_var):
    """KL(N(mu, diag exp(log_var)) || N(0, I)) per row, by hand."""
    return 0.5 * (mu.square() + log_var.exp() - log_var - 1).sum(-1)


def bernoulli_log_lik(x, logits):
    """log p(x | z) = sum_d x_d l_d - softplus(l_d), summed over the last dimension."""
    return (x * logits - F.softplus(logits)).sum(-1)


def expected_log_lik(decoder, x, y, mu, log_var):
    """E_{N(z; mu, diag sigma^2)}[log p(x | y, z)] for a 2-D z by Gauss-Hermite quadrature:
    (1 / pi) sum_ij w_i w_j f(mu + sqrt(2) sigma (t_i, t_j))."""
    t, w = np.polynomial.hermite.hermgauss(NODES)
    t, w = torch.from_numpy(t), torch.from_numpy(w)
    grid = torch.stack(torch.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2)  # (NODES^2, 2)
    weight = (w[:, None] * w[None, :]).reshape(-1) / math.pi
    z = mu.double() + math.sqrt(2) * (0.5 * log_var.double()).exp() * grid
    with torch.no_grad():
        logits = decoder(z.float(), torch.full((len(z),), y, dtype=torch.int64)).double()
    return float((weight * bernoulli_log_lik(x.double(), logits)).sum())


def exact_terms(namespace, x):
    """Per class: q(y | x), KL_z(y) closed form and E_q[log p(x | y, z)] by quadrature."""
    classifier, encoder = namespace["toy_classifier"], namespace["toy_encoder"]
    decoder, c = namespace["toy_decoder"], len(namespace["STROKES"])
    with torch.no_grad():
        logits = classifier(x[None])[0].double()
        mu, log_var = encoder(x.expand(c, -1), torch.arange(c))  # (C, 2) each
    q = (logits - logits.max()).exp() / (logits - logits.max()).exp().sum()
    kl = gaussian_kl(mu.double(), log_var.double())
    recon = [expected_log_lik(decoder, x, y, mu[y], log_var[y]) for y in range(c)]
    return q, kl, torch.tensor(recon, dtype=torch.float64)


# -- the label summed out on the tiny M2 ----------------------------------------------------


@pytest.mark.parametrize("index", [0, 1, 2, 3, 9])
def test_label_sum_view_against_quadrature(namespace, drive, index):
    out = drive("label_sum_view", index=index)
    assert out["index"] == index
    x = namespace["toy_test"][index]
    assert out["image"] == x.tolist()
    q, kl, recon = exact_terms(namespace, x)
    c = len(q)
    assert out["q"] == pytest.approx(q.tolist(), abs=1e-6)
    assert out["kl_z"] == pytest.approx(kl.tolist(), rel=1e-5, abs=1e-7)
    assert out["log_p_y"] == pytest.approx(-math.log(c), abs=1e-12)
    se = torch.tensor(out["elbo_per_class_se"], dtype=torch.float64)
    assert (se > 0).all()
    # Each L(x, y) is a mean of 2,000 draws of log p(x | y, z) less two exact terms.
    theirs = torch.tensor(out["reconstruction"], dtype=torch.float64)
    assert ((theirs - recon).abs() <= Z_BOUND * se + FLOAT32).all(), (theirs - recon) / se
    elbo = torch.tensor(out["elbo_per_class"], dtype=torch.float64)
    assert elbo.tolist() == pytest.approx((theirs - math.log(c) - kl).tolist(), abs=1e-5)
    # U(x) from Pyro's enumeration against sum_y q L + H with L from the quadrature.
    entropy = float(-torch.special.xlogy(q, q).sum())
    assert out["entropy"] == pytest.approx(entropy, abs=1e-6)
    exact_u = float((q * (recon - math.log(c) - kl)).sum()) + entropy
    assert abs(out["u"] - exact_u) <= Z_BOUND * out["u_se"] + FLOAT32


@pytest.mark.parametrize("index", [0, 1, 2, 5])
def test_label_sum_view_identities_from_its_own_numbers(drive, index):
    out = drive("label_sum_view", index=index)
    q = torch.tensor(out["q"], dtype=torch.float64)
    elbo = torch.tensor(out["elbo_per_class"], dtype=torch.float64)
    assert float(q.sum()) == pytest.approx(1.0, abs=1e-6)
    entropy = float(-torch.special.xlogy(q, q).sum())
    assert out["identity"] == pytest.approx(float((q * elbo).sum()) + entropy, abs=1e-5)
    # The enumerated U and the identity differ by the noise of both: independent draws.
    se = math.sqrt(
        out["u_se"] ** 2
        + float((q.square() * torch.tensor(out["elbo_per_class_se"]).double().square()).sum())
    )
    assert abs(out["u"] - out["identity"]) <= Z_BOUND * se + FLOAT32
    # log sum_y exp L - U = KL(q || softmax L) >= 0, the best q being softmax L.
    lse = math.log(float(elbo.exp().sum()))
    best = elbo.exp() / elbo.exp().sum()
    assert out["log_sum_exp"] == pytest.approx(lse, abs=1e-5)
    assert out["best_q"] == pytest.approx(best.tolist(), abs=1e-6)
    kl = float((torch.special.xlogy(q, q) - q * best.log()).sum())
    assert out["label_gap"] == pytest.approx(kl, abs=1e-5)
    assert out["label_gap"] >= -1e-6


def test_the_plus_is_ambiguous_and_a_clean_stroke_is_not(drive):
    # The plus (image 1) is across and down at once: q splits between them, and the entropy
    # pays nearly log 2; a clean stroke leaves q sure of one class.
    plus = drive("label_sum_view", index=1)
    assert sorted(plus["q"])[-2] > 0.2
    assert plus["entropy"] > 0.5
    strokes = [drive("label_sum_view", index=i) for i in range(3, 8)]
    assert sum(max(out["q"]) > 0.9 for out in strokes) >= 4


# -- accuracy against the number of labels --------------------------------------------------


def our_accuracy(right):
    a = float(right.double().mean())
    return a, math.sqrt(a * (1 - a) / right.numel())


@pytest.mark.parametrize("labels", [20, 50, 100])
def test_labels_view_against_the_networks(namespace, drive, labels):
    out = drive("labels_view", labels=labels)
    assert out["labels"] == labels
    test = namespace["test"]
    n = len(test.labels)
    assert out["n_test"] == n
    m2 = namespace["runs"][labels].vae
    assert out["alpha"] == namespace["ALPHA"]
    with torch.no_grad():
        predicted = m2.classifier(test.images).argmax(-1)
        predicted_alone = namespace["alone"][labels](test.images).argmax(-1)
    right, right_alone = predicted == test.labels, predicted_alone == test.labels
    a, se = our_accuracy(right)
    b, b_se = our_accuracy(right_alone)
    assert out["accuracy"] == pytest.approx(a, abs=1e-12)
    assert out["accuracy_se"] == pytest.approx(se, rel=1e-9)
    assert out["alone_accuracy"] == pytest.approx(b, abs=1e-12)
    assert out["alone_accuracy_se"] == pytest.approx(b_se, rel=1e-9)
    # Paired over the same images: each image contributes -1, 0 or 1.
    d = right.double() - right_alone.double()
    assert out["difference"] == pytest.approx(a - b, abs=1e-12)
    assert out["difference_se"] == pytest.approx(
        math.sqrt(float((d - d.mean()).square().mean()) / n), rel=1e-9
    )
    counts = Counter(zip(test.labels.tolist(), predicted.tolist(), strict=True))
    c = len(out["confusion"])
    assert out["confusion"] == [[counts[(t, p)] for p in range(c)] for t in range(c)]
    # Both are far above chance (1/C): below chance + Z_BOUND s.e. fails with p < 1e-5.
    chance = 1 / c
    assert min(a, b) > chance + Z_BOUND * math.sqrt(chance * (1 - chance) / n)


# -- one code, every class ------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 7, 20])
def test_samples_view_decodes_the_same_code_as_every_class(namespace, drive, seed):
    out = drive("samples_view", seed=seed)
    assert out["seed"] == seed
    m2 = namespace["sampler"]
    columns, z_dim = namespace["COLUMNS"], m2.decoder.z_dim
    z = torch.randn(columns, z_dim, generator=torch.Generator().manual_seed(seed))
    assert out["z"] == z.tolist()
    images = torch.tensor(out["images"])
    c = m2.decoder.num_classes
    assert images.shape == (c, columns, m2.decoder.x_dim)
    read_back = []
    for y in range(c):  # one class at a time: E[x | y, z] = sigmoid(logits)
        with torch.no_grad():
            row = torch.sigmoid(m2.decoder(z, torch.full((columns,), y, dtype=torch.int64)))
            read_back.append(m2.classifier(row).argmax(-1).tolist())
        assert torch.allclose(images[y], row, atol=1e-6), y
    assert out["read_back"] == read_back
    agreement = sum(r == y for y, row in enumerate(read_back) for r in row) / (c * columns)
    assert out["agreement"] == pytest.approx(agreement, abs=1e-12)


def test_every_view_is_driven(drive):
    assert drive.undriven() == []
