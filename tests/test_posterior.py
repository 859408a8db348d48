"""enumerate_joint: the brute-force posterior table, factorised over plates, and its refusals.

Every oracle is written here: Bayes' rule by hand, explicit Python loops over every joint
configuration (small N), the chain rule of the KL over independent datapoints (large N).
Each pair is checked on the joint table (the default while it fits under the cap) and, with
``max_configurations`` lowered below the joint count, on the factorised table.

Tolerances: the pairs' log-probabilities are float32 (relative rounding <= 6e-8, half an
ulp); the table adds them in float64. A sum over n terms of magnitude <= m is then exact to
about n * m * 1e-7: for the small pairs here (n * m < 100) that is < 1e-5, the tolerance used
unless a test says otherwise.
"""

import itertools
import math
import time

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from ppl_vae import JointTable, enumerate_joint
from ppl_vae.elbo import PosteriorTable
from ppl_vae.errors import ModelGuideMismatchError, NotEnumerableError
from ppl_vae.guides import binary_toy as toy_guide
from ppl_vae.models import binary_toy

TOL = 1e-5  # see the module docstring


def _normal(x: float, loc: float, scale: float) -> float:
    return -0.5 * ((x - loc) / scale) ** 2 - math.log(scale * math.sqrt(2 * math.pi))


def _exact(rows: list[tuple[float, float]]) -> tuple[float, float, float]:
    """(log p(x), KL(q || p(z | x)), ELBO) from (log p(x, z), log q(z)) of every z."""
    top = max(lp for lp, _ in rows)
    log_px = top + math.log(math.fsum(math.exp(lp - top) for lp, _ in rows))
    kl = math.fsum(math.exp(lq) * (lq - lp + log_px) for lp, lq in rows if lq > -math.inf)
    elbo = math.fsum(math.exp(lq) * (lp - lq) for lp, lq in rows if lq > -math.inf)
    return log_px, kl, elbo


def _bern_kl(q: float, p: float) -> float:
    return q * math.log(q / p) + (1 - q) * math.log((1 - q) / (1 - p))


# --- The binary toy: prior 0.5, p(x=1 | z) = (0.2, 0.8), q(z=1 | x) = (0.3, 0.7).


def _toy_by_hand(x: float) -> tuple[float, float]:
    """(log p(x), KL(q(z | x) || p(z | x))) of one datapoint by Bayes' rule."""
    like = [0.2, 0.8] if x == 1 else [0.8, 0.2]
    evidence = 0.5 * like[0] + 0.5 * like[1]
    posterior = 0.5 * like[1] / evidence
    return math.log(evidence), _bern_kl(0.7 if x == 1 else 0.3, posterior)


@pytest.mark.parametrize(("cap", "factorised"), [(2**16, False), (6, True)])
def test_binary_toy_by_bayes_rule(cap, factorised):
    toy_guide.initialise(q_given_x1=0.7)
    x = torch.tensor([1.0, 0.0, 1.0])
    table = enumerate_joint(binary_toy.model, toy_guide.guide, x, max_configurations=cap)
    assert table.factorised is factorised
    # 2^3 joint configurations, or 1 global x 2 local x 3 datapoints.
    assert table.num_configurations == (6 if factorised else 8)
    per = [_toy_by_hand(float(v)) for v in x]
    log_px, kl = sum(p[0] for p in per), sum(p[1] for p in per)
    assert table.log_evidence == pytest.approx(log_px, abs=TOL)
    assert table.kl_q_to_posterior() == pytest.approx(kl, abs=TOL)
    assert table.elbo() == pytest.approx(log_px - kl, abs=TOL)
    assert table.kl_reason is None
    # The worked example: log p(x=1) = log 0.5, gap KL(Bern(.7) || Bern(.8)) = 0.0282.
    assert _toy_by_hand(1.0)[0] == pytest.approx(-0.6931, abs=1e-4)
    assert _toy_by_hand(1.0)[1] == pytest.approx(0.0282, abs=1e-4)


@pytest.mark.parametrize("n", [17, 10_000])
def test_binary_toy_many_datapoints_is_exact_and_fast(n):
    toy_guide.initialise(q_given_x1=0.7)
    x = (torch.arange(n) % 3 == 0).float()
    start = time.perf_counter()
    table = enumerate_joint(binary_toy.model, toy_guide.guide, x)
    elapsed = time.perf_counter() - start
    ones = int(x.sum())
    log_px = ones * _toy_by_hand(1.0)[0] + (n - ones) * _toy_by_hand(0.0)[0]
    kl = ones * _toy_by_hand(1.0)[1] + (n - ones) * _toy_by_hand(0.0)[1]
    assert table.factorised
    assert f"factorised over 'data' ({n:,} elements)" in table.method
    assert table.num_configurations == 2 * n
    # n identical float32 roundings (<= 1e-7 x 1.61 nats per term) add up: relative error
    # <= ~4e-6 of the KL (0.028 n nats), < 1e-6 of log p(x).
    assert math.isfinite(table.kl_q_to_posterior())
    assert table.kl_q_to_posterior() == pytest.approx(kl, rel=1e-5)
    assert table.log_evidence == pytest.approx(log_px, rel=1e-6)
    # Measured ~0.5 s for n = 10,000; a per-datapoint Python loop takes ~10 s.
    assert elapsed < 3.0


# --- A global switch over local latents: a ~ Cat, z_i | a ~ Bern, x_i | z_i ~ Normal.

W_A, P_Z, LOCS = (0.2, 0.5, 0.3), (0.1, 0.5, 0.9), (-1.0, 1.5)
Q_A, Q_TABLE, SLOPE = (0.3, 0.3, 0.4), (0.3, 0.6, 0.7), 0.8


def switch_model(x):
    a = pyro.sample("a", dist.Categorical(torch.tensor(W_A)))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Bernoulli(torch.tensor(P_Z)[a.long()]))
        pyro.sample("x", dist.Normal(torch.tensor(LOCS)[z.long()], 0.8), obs=x)


def switch_guide(x):
    a = pyro.sample("a", dist.Categorical(torch.tensor(Q_A)))
    with pyro.plate("data", x.shape[0]):
        logits = torch.logit(torch.tensor(Q_TABLE)[a.long()]) + SLOPE * x
        pyro.sample("z", dist.Bernoulli(logits=logits))


def _q_z1(a: int, xi: float) -> float:
    return 1 / (1 + math.exp(-(math.log(Q_TABLE[a] / (1 - Q_TABLE[a])) + SLOPE * xi)))


def _switch_rows(x):
    rows = []
    for a in range(3):
        for zs in itertools.product((0, 1), repeat=len(x)):
            lp, lq = math.log(W_A[a]), math.log(Q_A[a])
            for xi, z in zip(x, zs, strict=True):
                lp += math.log(P_Z[a] if z else 1 - P_Z[a]) + _normal(xi, LOCS[z], 0.8)
                lq += math.log(_q_z1(a, xi) if z else 1 - _q_z1(a, xi))
            rows.append((lp, lq))
    return rows


@pytest.mark.parametrize(("cap", "factorised"), [(2**16, False), (24, True)])
def test_global_switch_against_every_configuration(cap, factorised):
    x = [-1.2, 0.3, 2.0, 1.1]
    table = enumerate_joint(switch_model, switch_guide, torch.tensor(x), max_configurations=cap)
    assert table.factorised is factorised
    assert table.num_configurations == (24 if factorised else 48)  # 3 x 2 x 4, or 3 x 2^4
    log_px, kl, elbo = _exact(_switch_rows(x))
    assert table.log_evidence == pytest.approx(log_px, abs=TOL)
    assert table.kl_q_to_posterior() == pytest.approx(kl, abs=TOL)
    assert table.elbo() == pytest.approx(elbo, abs=TOL)
    if not factorised:  # the joint table keeps log p(x, z) and log q(z) per configuration
        assert isinstance(table, JointTable)
        assert sorted(table.log_joint.tolist()) == pytest.approx(
            sorted(lp for lp, _ in _switch_rows(x)), abs=TOL
        )
        assert float(table.log_posterior.exp().sum()) == pytest.approx(1.0, abs=TOL)


def test_global_switch_factorises_for_many_datapoints():
    # 3 x 2^30 joint configurations. The oracle is the chain rule of the KL:
    # KL(q(a, z) || p(a, z | x)) = KL(q(a) || p(a | x)) + sum_a q(a) sum_i KL(q(z_i | a) ||
    # p(z_i | a, x_i)), with p(a | x) and p(z_i | a, x_i) by Bayes' rule.
    x = torch.randn(30, generator=torch.Generator().manual_seed(1)).tolist()
    table = enumerate_joint(switch_model, switch_guide, torch.tensor(x))
    assert table.factorised
    assert "3 global x 2 local configurations per element of plate 'data'" in table.method
    log_joint_a, kl_local = [], []
    for a in range(3):
        total, local = math.log(W_A[a]), 0.0
        for xi in x:
            joint = [math.log(1 - P_Z[a]) + _normal(xi, LOCS[0], 0.8)]
            joint.append(math.log(P_Z[a]) + _normal(xi, LOCS[1], 0.8))
            evidence = math.log(math.exp(joint[0]) + math.exp(joint[1]))
            total += evidence
            local += _bern_kl(_q_z1(a, xi), math.exp(joint[1] - evidence))
        log_joint_a.append(total)
        kl_local.append(local)
    top = max(log_joint_a)
    log_px = top + math.log(sum(math.exp(v - top) for v in log_joint_a))
    kl = sum(
        Q_A[a] * (math.log(Q_A[a]) - (log_joint_a[a] - log_px)) + Q_A[a] * kl_local[a]
        for a in range(3)
    )
    # 30 datapoints x 3 configurations of float32 terms <= ~5 nats: error < 1e-4 (see top).
    assert table.log_evidence == pytest.approx(log_px, abs=1e-4)
    assert table.kl_q_to_posterior() == pytest.approx(kl, abs=1e-4)


# --- An amortised guide: 5 categories per point, logits from a small network.

PI, MU = (0.1, 0.2, 0.3, 0.25, 0.15), (-2.0, -1.0, 0.0, 1.0, 2.0)


def amortised_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Categorical(torch.tensor(PI)))
        pyro.sample("x", dist.Normal(torch.tensor(MU)[z], 1.0), obs=x)


def test_amortised_guide_over_the_old_cap():
    torch.manual_seed(0)
    encoder = torch.nn.Linear(1, 5)

    def guide(x):
        pyro.module("encoder", encoder)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Categorical(logits=encoder(x.unsqueeze(-1))))

    x = torch.tensor([-2.1, -0.4, 0.3, 1.7, 0.9, -1.2, 2.4])  # 5^7 = 78,125 joint configurations
    table = enumerate_joint(amortised_model, guide, x)
    assert table.factorised
    assert table.num_configurations == 5 * 7
    with torch.no_grad():
        q = torch.softmax(encoder(x.unsqueeze(-1)).double(), -1).tolist()
    log_px, kl = 0.0, 0.0
    for xi, qi in zip(x.tolist(), q, strict=True):
        joint = [math.log(PI[k]) + _normal(xi, MU[k], 1.0) for k in range(5)]
        evidence = math.log(sum(math.exp(v) for v in joint))
        log_px += evidence
        kl += sum(qk * (math.log(qk) - (joint[k] - evidence)) for k, qk in enumerate(qi))
    assert math.isfinite(table.kl_q_to_posterior())
    assert table.log_evidence == pytest.approx(log_px, abs=TOL)
    assert table.kl_q_to_posterior() == pytest.approx(kl, abs=TOL)


# --- Nested plates: c_i per datapoint, z_ij in a nested plate of 2 under it.

BASE = ((0.1, 0.7, 0.4), (0.8, 0.3, 0.6))  # q(z_ij = 1 | c_i = 0); 1 - BASE if c_i = 1
Q_C, P_C, X_NEST = (0.2, 0.6, 0.5), (0.2, 0.7), ((0.5, -0.3, 1.2), (1.4, 0.1, -0.8))


def nested_model(x):
    with pyro.plate("data", 3, dim=-1):
        c = pyro.sample("c", dist.Bernoulli(0.3))
        with pyro.plate("pixels", 2, dim=-2):
            z = pyro.sample("z", dist.Bernoulli(torch.tensor(P_C)[c.long()]))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def nested_guide(x):
    with pyro.plate("data", 3, dim=-1):
        c = pyro.sample("c", dist.Bernoulli(torch.tensor(Q_C)))
        with pyro.plate("pixels", 2, dim=-2):
            base = torch.tensor(BASE)
            pyro.sample("z", dist.Bernoulli(torch.where(c.bool(), 1 - base, base)))


@pytest.mark.parametrize(("cap", "factorised"), [(2**16, False), (24, True)])
def test_nested_plates_against_every_configuration(cap, factorised):
    table = enumerate_joint(
        nested_model, nested_guide, torch.tensor(X_NEST), max_configurations=cap
    )
    assert table.factorised is factorised
    if factorised:  # c_i and its two z_ij: 2^3 local configurations per datapoint
        assert "8 local configurations per element of plate 'data'" in table.method
    rows = []
    for cs in itertools.product((0, 1), repeat=3):
        for zs in itertools.product((0, 1), repeat=6):
            lp = lq = 0.0
            for i, c in enumerate(cs):
                lp += math.log(0.3 if c else 0.7)
                lq += math.log(Q_C[i] if c else 1 - Q_C[i])
                for j in range(2):
                    z, q1 = zs[2 * i + j], BASE[j][i] if c == 0 else 1 - BASE[j][i]
                    lp += math.log(P_C[c] if z else 1 - P_C[c]) + _normal(X_NEST[j][i], z, 1.0)
                    lq += math.log(q1 if z else 1 - q1)
            rows.append((lp, lq))
    log_px, kl, _ = _exact(rows)
    assert table.log_evidence == pytest.approx(log_px, abs=TOL)
    assert table.kl_q_to_posterior() == pytest.approx(kl, abs=TOL)


# --- Two factor plates, both at dim -1, coupled through a global g.

X_A, X_B = (0.4, 1.3, -0.2), (2.2, 0.5)


def two_plate_model(xa, xb):
    g = pyro.sample("g", dist.Bernoulli(0.4))
    with pyro.plate("a", 3):
        z = pyro.sample("z", dist.Bernoulli(torch.tensor([0.3, 0.8])[g.long()]))
        pyro.sample("xa", dist.Normal(z, 1.0), obs=xa)
    with pyro.plate("b", 2):
        w = pyro.sample(
            "w", dist.Categorical(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]])[g.long()])
        )
        pyro.sample("xb", dist.Normal(w.float(), 1.0), obs=xb)


def two_plate_guide(xa, xb):
    g = pyro.sample("g", dist.Bernoulli(0.55))
    with pyro.plate("a", 3):
        pyro.sample("z", dist.Bernoulli(torch.tensor([0.6, 0.4])[g.long()]))
    with pyro.plate("b", 2):
        pyro.sample(
            "w", dist.Categorical(torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])[g.long()])
        )


@pytest.mark.parametrize(("cap", "factorised"), [(2**16, False), (24, True)])
def test_two_factor_plates_against_every_configuration(cap, factorised):
    table = enumerate_joint(
        two_plate_model, two_plate_guide, torch.tensor(X_A), torch.tensor(X_B),
        max_configurations=cap,
    )  # fmt: skip
    assert table.factorised is factorised
    # 2 x 2^3 x 3^2 joint configurations, or 2 x (2 x 3 + 3 x 2) entries.
    assert table.num_configurations == (24 if factorised else 144)
    pw, qw = ((0.5, 0.3, 0.2), (0.1, 0.2, 0.7)), ((0.2, 0.3, 0.5), (0.6, 0.3, 0.1))
    rows = []
    for g in (0, 1):
        for zs in itertools.product((0, 1), repeat=3):
            for ws in itertools.product(range(3), repeat=2):
                lp, lq = math.log(0.4 if g else 0.6), math.log(0.55 if g else 0.45)
                pz, qz = (0.3, 0.8)[g], (0.6, 0.4)[g]
                for xi, z in zip(X_A, zs, strict=True):
                    lp += math.log(pz if z else 1 - pz) + _normal(xi, z, 1.0)
                    lq += math.log(qz if z else 1 - qz)
                for xi, w in zip(X_B, ws, strict=True):
                    lp += math.log(pw[g][w]) + _normal(xi, w, 1.0)
                    lq += math.log(qw[g][w])
                rows.append((lp, lq))
    log_px, kl, _ = _exact(rows)
    assert table.log_evidence == pytest.approx(log_px, abs=TOL)
    assert table.kl_q_to_posterior() == pytest.approx(kl, abs=TOL)


# --- Model-side enumeration: a 2-component mixture whose assignments only the model has.

LOCS_C, W_K, P_CG, Q_CG = ((-1.0, 1.0), (0.0, 2.5)), (0.3, 0.7), (0.4, 0.6), (0.7, 0.3)


def mixture_model(x):
    c = pyro.sample("c", dist.Categorical(torch.tensor(P_CG)))
    with pyro.plate("data", x.shape[0]):
        k = pyro.sample("k", dist.Categorical(torch.tensor(W_K)))
        pyro.sample("x", dist.Normal(torch.tensor(LOCS_C)[c.long(), k.long()], 1.0), obs=x)


def mixture_guide(x):
    pyro.sample("c", dist.Categorical(torch.tensor(Q_CG)))


@pytest.mark.parametrize(
    ("n", "cap", "factorised"), [(3, 2**16, False), (3, 12, True), (20, 2**16, True)]
)
def test_model_side_enumeration_by_hand(n, cap, factorised):
    x = torch.linspace(-1.5, 3.0, n).tolist()
    table = enumerate_joint(mixture_model, mixture_guide, torch.tensor(x), max_configurations=cap)
    assert table.factorised is factorised
    assert table.marginalised_sites == ("k",)
    assert "'k' summed out" in table.method
    # p(x | c) = prod_i sum_k w_k N(x_i; loc[c, k], 1); KL(q(c) || p(c | x)) by Bayes' rule.
    log_joint = [
        math.log(P_CG[c])
        + sum(
            math.log(sum(W_K[k] * math.exp(_normal(xi, LOCS_C[c][k], 1.0)) for k in (0, 1)))
            for xi in x
        )
        for c in (0, 1)
    ]
    log_px = math.log(sum(math.exp(v) for v in log_joint))
    kl = sum(Q_CG[c] * (math.log(Q_CG[c]) - (log_joint[c] - log_px)) for c in (0, 1))
    elbo = sum(Q_CG[c] * (log_joint[c] - math.log(Q_CG[c])) for c in (0, 1))
    assert table.log_evidence == pytest.approx(log_px, abs=TOL)
    assert table.kl_q_to_posterior() == pytest.approx(kl, abs=TOL)
    assert table.elbo() == pytest.approx(elbo, abs=TOL)


def test_model_only_global_coupling_local_guide_sites_is_refused():
    def model(x):
        s = pyro.sample("s", dist.Bernoulli(0.5))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(z + s, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Bernoulli(0.5))

    with pytest.raises(NotEnumerableError, match=r"model-only global sites 's'.*couple.*'z'"):
        enumerate_joint(model, guide, torch.zeros(20))


def test_continuous_model_only_site_is_a_mismatch():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            k = pyro.sample("k", dist.Bernoulli(0.5))
            u = pyro.sample("u", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(k + u, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("k", dist.Bernoulli(0.5))

    with pytest.raises(ModelGuideMismatchError, match="site 'u' is a Normal"):
        enumerate_joint(model, guide, torch.zeros(3))


# --- Pairs whose log-probabilities do not split over the plate.


def _violating_model(kind):
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Bernoulli(0.4))
            loc = z + 0.5 * torch.roll(z, 1, -1) if kind == "neighbour" else z
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x)
        if kind == "sum":
            pyro.sample("s", dist.Normal(z.sum(), 1.0), obs=torch.tensor(2.0))
        if kind == "event":  # z's plate dim becomes an event dim
            pyro.sample("y", dist.Normal(z, 1.0).to_event(1), obs=x + 1)
        if kind == "undeclared":  # z's plate dim becomes a batch dim of no plate
            pyro.sample("y", dist.Normal(z, 1.0), obs=x + 1)

    return model


def _plain_guide(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Bernoulli(torch.sigmoid(x)))


@pytest.mark.parametrize("kind", ["sum", "event", "undeclared", "neighbour"])
def test_non_factorising_pair_is_right_on_the_joint_table(kind):
    x = [0.3, -1.1, 1.8, 0.6]
    table = enumerate_joint(_violating_model(kind), _plain_guide, torch.tensor(x))
    assert not table.factorised
    rows = []
    for zs in itertools.product((0, 1), repeat=4):
        lp = lq = 0.0
        for i, (xi, z) in enumerate(zip(x, zs, strict=True)):
            loc = z + 0.5 * zs[i - 1] if kind == "neighbour" else z
            lp += math.log(0.4 if z else 0.6) + _normal(xi, loc, 1.0)
            lp += _normal(xi + 1, z, 1.0) if kind in ("event", "undeclared") else 0.0
            q1 = 1 / (1 + math.exp(-xi))
            lq += math.log(q1 if z else 1 - q1)
        lp += _normal(2.0, sum(zs), 1.0) if kind == "sum" else 0.0
        rows.append((lp, lq))
    log_px, kl, _ = _exact(rows)
    assert table.log_evidence == pytest.approx(log_px, abs=TOL)
    assert table.kl_q_to_posterior() == pytest.approx(kl, abs=TOL)


@pytest.mark.parametrize(
    ("kind", "why"),
    [
        ("sum", r"global part \(sites 's'\).*do not split over the plates"),  # (b) sees it
        ("event", r"site 'y' has log-probabilities of shape .* do not line up"),
        ("undeclared", "site 'y' outside plate 'data' depends on its local latents 'z'"),
        ("neighbour", r"element \d+ of plate 'data' \(sites 'z', 'x'\).*do not split"),
    ],
)
@pytest.mark.parametrize("n", [4, 40])
def test_non_factorising_pair_is_refused_not_wrong(kind, why, n):
    x = torch.linspace(-1.0, 1.5, n)
    cap = 2**16 if n == 40 else 8  # n = 4: 2^4 joint > 8 >= 1 x 2 x 4 factorised entries
    with pytest.raises(NotEnumerableError, match=why) as error:
        enumerate_joint(_violating_model(kind), _plain_guide, x, max_configurations=cap)
    limit = "2^40 joint configurations exceed the cap 65536" if n == 40 else "2^4 joint"
    assert limit in str(error.value)


# --- q must be normalised; q > 0 where p = 0 is an explicit infinity.


@pytest.mark.parametrize("n", [3, 20])
def test_scaled_guide_is_refused(n):
    def guide(x):
        with pyro.plate("data", x.shape[0]), poutine.scale(scale=0.5):
            pyro.sample("z", dist.Bernoulli(0.7))

    toy = binary_toy.model
    with pytest.raises(NotEnumerableError, match=r"scale 0.5 in the guide.*not normalised"):
        enumerate_joint(toy, guide, torch.ones(n))
    assert issubclass(NotEnumerableError, ValueError)


@pytest.mark.parametrize("n", [3, 20])
def test_unnormalised_guide_distribution_is_refused(n):
    # A mask inside the distribution: log q = 0 for both values, so q sums to 2 per element.
    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Bernoulli(0.7).mask(False))

    with pytest.raises(NotEnumerableError, match=r"q is not normalised.*sum to [28]"):
        enumerate_joint(binary_toy.model, guide, torch.ones(n))


@pytest.mark.parametrize("n", [1, 20])
def test_q_mass_where_p_has_none_is_infinite_with_its_reason(n):
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Categorical(logits=torch.tensor([0.0, 0.0, -math.inf])))
            pyro.sample("x", dist.Normal(z.float(), 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Categorical(torch.tensor([0.4, 0.3, 0.3])))

    x = torch.linspace(0.0, 1.0, n)
    table = enumerate_joint(model, guide, x)
    assert table.factorised is (n == 20)
    assert table.kl_q_to_posterior() == math.inf
    assert table.elbo() == -math.inf
    assert "q puts mass where p has none: site 'z', value 2" in table.kl_reason
    # p(x) itself is finite: sum over z in {0, 1} of 0.5 N(x_i; z, 1).
    log_px = sum(
        math.log(0.5 * math.exp(_normal(xi, 0, 1)) + 0.5 * math.exp(_normal(xi, 1, 1)))
        for xi in x.tolist()
    )
    assert table.log_evidence == pytest.approx(log_px, abs=TOL)
    assert not any(map(math.isnan, (table.kl, table.log_evidence, table.elbo())))


@pytest.mark.parametrize("n", [1, 20])
def test_q_and_p_both_zero_is_zero_log_zero(n):
    # q(z = 2) = p(z = 2) = 0: the term is 0 log 0 = 0, not NaN; the KL is finite.
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Categorical(logits=torch.tensor([0.0, 0.0, -math.inf])))
            pyro.sample("x", dist.Normal(z.float(), 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            # logits, not probs: torch clamps probs = 0 to log-prob -15.9, i.e. q > 0.
            logits = torch.tensor([math.log(0.6), math.log(0.4), -math.inf])
            pyro.sample("z", dist.Categorical(logits=logits))

    x = torch.linspace(0.0, 1.0, n)
    table = enumerate_joint(model, guide, x)
    kl = 0.0
    for xi in x.tolist():
        joint = [math.log(0.5) + _normal(xi, z, 1.0) for z in (0, 1)]
        evidence = math.log(math.exp(joint[0]) + math.exp(joint[1]))
        kl += sum(q * (math.log(q) - (joint[z] - evidence)) for z, q in enumerate((0.6, 0.4)))
    assert table.kl_reason is None
    assert table.kl_q_to_posterior() == pytest.approx(kl, abs=TOL)


def test_joint_table_name_is_kept():
    assert JointTable is PosteriorTable
