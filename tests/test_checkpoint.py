"""Checkpoints: exact round trips, constraints by name, atomic writes, refusal of bad files."""

import errno
import hashlib
import json
import os
import pathlib
import pickle
import random
import tempfile

import numpy as np
import pyro
import pytest
import safetensors
import safetensors.torch
import torch
from pyro.distributions import constraints
from torch import nn

from ppl_vae.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    constraint_from_name,
    constraint_name,
    load_checkpoint,
    restore,
    restore_optimizer,
    save_checkpoint,
)
from ppl_vae.errors import CheckpointError

CONSTRAINED = {
    "scale": (torch.tensor([0.5, 2.0]), constraints.positive),
    "prob": (torch.tensor([0.2, 0.7]), constraints.unit_interval),
    "weights": (torch.tensor([0.2, 0.3, 0.5]), constraints.simplex),
    "width": (torch.tensor(1.5), constraints.interval(1.0, 3.0)),
    "loc": (torch.zeros(2), constraints.real),
}


def _populate(seed: int) -> nn.Module:
    """A network and constrained params in the param store, with different values per seed."""
    torch.manual_seed(seed)
    net = nn.Linear(3, 2)
    pyro.module("net", net)
    for name, (value, constraint) in CONSTRAINED.items():
        pyro.param(name, value.clone(), constraint=constraint)
    return net


def _params() -> list[torch.Tensor]:
    return [p for _, p in pyro.get_param_store().named_parameters()]


def _train(optimizer, scheduler, steps: int) -> None:
    """A few Adam steps on a noisy loss, so the result depends on the RNG and Adam's state."""
    for _ in range(steps):
        net_out = pyro.get_param_store()["net$$$weight"].sum()
        noise = torch.randn(())
        loss = (net_out - noise) ** 2 + sum(
            (pyro.param(name) - noise).pow(2).sum() for name in CONSTRAINED
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()


def _draws() -> tuple:
    return torch.rand(3), np.random.rand(3), random.random()  # noqa: NPY002


def _store_snapshot() -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in pyro.get_param_store().named_parameters()}


def test_round_trip_resumes_training_exactly(tmp_path):
    net = _populate(seed=1)
    optimizer = torch.optim.Adam(_params(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.9)
    _train(optimizer, scheduler, steps=3)
    path = save_checkpoint(
        tmp_path / "run.ckpt",
        modules={"net": net},
        optimizer=optimizer,
        scheduler=scheduler,
        counters={"step": 3, "epoch": 1, "position": 17},
        config_digest="0123abcd" * 8,
    )
    after_save = _draws()
    _train(optimizer, scheduler, steps=3)
    expected = _store_snapshot()
    expected_lr = scheduler.get_last_lr()

    # A fresh "process": empty store, a network with other weights, new optimizer.
    pyro.clear_param_store()
    torch.manual_seed(99)
    net2 = nn.Linear(3, 2)
    checkpoint = load_checkpoint(path)
    assert checkpoint.counters == {"step": 3, "epoch": 1, "position": 17}
    assert checkpoint.config_digest == "0123abcd" * 8
    assert checkpoint.version == FORMAT_VERSION == 2
    restore(checkpoint, modules={"net": net2})
    optimizer2 = torch.optim.Adam(_params(), lr=0.05)
    scheduler2 = torch.optim.lr_scheduler.ExponentialLR(optimizer2, gamma=0.9)
    restore_optimizer(checkpoint, optimizer2, scheduler=scheduler2, modules={"net": net2})
    assert optimizer2.param_groups[0]["betas"] == optimizer.param_groups[0]["betas"]

    # The network's own tensors are the param store's (else pyro.module would split them).
    store = dict(pyro.get_param_store().named_parameters())
    assert store["net$$$weight"] is net2.weight and store["net$$$bias"] is net2.bias

    for got, want in zip(_draws(), after_save, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    _train(optimizer2, scheduler2, steps=3)
    resumed = _store_snapshot()
    assert resumed.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(resumed[name], value), name
    assert scheduler2.get_last_lr() == expected_lr


def test_restore_rolls_back_in_place(tmp_path):
    """Restoring into the same process keeps the tensors an optimizer already holds."""
    net = _populate(seed=2)
    before = _store_snapshot()
    ids = {name: id(p) for name, p in pyro.get_param_store().named_parameters()}
    path = save_checkpoint(tmp_path / "a.ckpt", modules={"net": net})
    with torch.no_grad():
        for p in _params():
            p.add_(1.0)
    pyro.param("extra", torch.ones(2))  # not in the checkpoint: removed by restore
    restore(load_checkpoint(path), modules={"net": net}, rng=False)
    after = dict(pyro.get_param_store().named_parameters())
    assert set(after) == set(before)
    for name, value in before.items():
        assert torch.equal(after[name], value)
        assert id(after[name]) == ids[name]


def test_constraints_round_trip(tmp_path):
    _populate(seed=3)
    expected = {name: pyro.param(name).detach().clone() for name in CONSTRAINED}
    path = save_checkpoint(tmp_path / "c.ckpt", rng=False)
    pyro.clear_param_store()
    checkpoint = load_checkpoint(path)
    assert checkpoint.constraints["scale"] == "positive"
    assert checkpoint.constraints["prob"] == "unit_interval"
    assert checkpoint.constraints["weights"] == "simplex"
    assert checkpoint.constraints["width"] == "interval(1.0, 3.0)"
    assert checkpoint.constraints["loc"] == "real"
    restore(checkpoint, rng=False)
    state = pyro.get_param_store().get_state()
    for name, (_, constraint) in CONSTRAINED.items():
        assert constraint_name(state["constraints"][name]) == constraint_name(constraint)
        torch.testing.assert_close(pyro.param(name), expected[name], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(checkpoint.constrained(name), expected[name])
    assert float(pyro.param("weights").detach().sum()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "constraint",
    [
        constraints.real,
        constraints.positive,
        constraints.nonnegative,
        constraints.unit_interval,
        constraints.simplex,
        constraints.lower_cholesky,
        constraints.corr_cholesky,
        constraints.softplus_positive,
        constraints.greater_than(-3.5),
        constraints.less_than(2.0),
        constraints.interval(-1.5, 2.25),
        constraints.half_open_interval(0.0, 1e-3),
        constraints.real_vector,
        constraints.independent(constraints.interval(0.1, 0.9), 2),
    ],
)
def test_constraint_names_map_back(constraint):
    name = constraint_name(constraint)
    back = constraint_from_name(name)
    assert type(back) is type(constraint)
    assert constraint_name(back) == name
    # The same bijection as the original: the param store's unconstrained values stay valid.
    u = torch.randn(3, 3) if "cholesky" in name else torch.randn(4, 3)
    if name in ("simplex",):
        u = torch.randn(4)
    transform, back_transform = (torch.distributions.transform_to(c) for c in (constraint, back))
    torch.testing.assert_close(back_transform(u), transform(u))


@pytest.mark.parametrize(
    "name", ["bogus", "__import__('os').system('true')", "interval(0.0)", "greater_than(x)", ""]
)
def test_unknown_constraint_names_refused(name):
    with pytest.raises(CheckpointError, match="unknown constraint"):
        constraint_from_name(name)


def test_unnamed_constraint_refused_at_save():
    with pytest.raises(CheckpointError, match="no name"):
        constraint_name(constraints.integer)


def _forge(path: pathlib.Path, tensors: dict, text: str) -> None:
    """Write a file as save_checkpoint does, with a valid digest, around any metadata text."""
    meta = {"format": FORMAT, "ppl_vae": text}
    draft = safetensors.torch.save(tensors, meta)
    start = 8 + int.from_bytes(draft[:8], "little")
    meta["sha256"] = hashlib.sha256(text.encode() + draft[start:]).hexdigest()
    path.write_bytes(safetensors.torch.save(tensors, meta))


def _rewrite_body(path: pathlib.Path, edit) -> None:
    """Edit the JSON metadata of a checkpoint in place (to forge bad files)."""
    with safetensors.safe_open(str(path), "pt") as handle:
        meta = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    body = json.loads(meta["ppl_vae"])
    edit(body)
    _forge(path, tensors, json.dumps(body))


def test_unknown_constraint_in_file_refused(tmp_path):
    _populate(seed=4)
    path = save_checkpoint(tmp_path / "c.ckpt", rng=False)
    _rewrite_body(path, lambda body: body["constraints"].update(scale="bogus_constraint"))
    with pytest.raises(CheckpointError, match="bogus_constraint"):
        load_checkpoint(path)


def test_a_version_1_file_loads_without_a_digest(tmp_path):
    """Version 1 held a copy of the run's configuration where version 2 holds its digest: such
    a file still loads and restores (no digest), and a digest that is not text is refused."""
    net = _populate(seed=6)
    path = save_checkpoint(tmp_path / "v1.ckpt", modules={"net": net}, config_digest="ab" * 32)
    expected = _store_snapshot()

    def as_version_1(body):
        del body["config_digest"]
        body.update(version=1, config={"train": {"lr": 0.1}, "vae": {"z_dim": 2}})

    _rewrite_body(path, as_version_1)
    old = load_checkpoint(path)
    assert old.version == 1 and old.config_digest is None
    pyro.clear_param_store()
    restore(old, modules={"net": _populate(seed=7)})
    assert all(torch.equal(v, expected[k]) for k, v in _store_snapshot().items())
    _rewrite_body(path, lambda body: body.update(version=2, config_digest=[1]))
    with pytest.raises(CheckpointError, match="digest is not text"):
        load_checkpoint(path)


def _leftovers(folder: pathlib.Path, keep: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != keep)


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_crash_during_write_keeps_previous_checkpoint(tmp_path, monkeypatch, failing):
    net = _populate(seed=5)
    path = tmp_path / "last.ckpt"
    save_checkpoint(path, modules={"net": net}, counters={"step": 1})
    with torch.no_grad():
        net.weight.add_(1.0)

    def crash(*args, **kwargs):
        raise OSError(errno.EIO, "simulated crash")

    monkeypatch.setattr(os, failing, crash)
    with pytest.raises(CheckpointError, match="simulated crash") as info:
        save_checkpoint(path, modules={"net": net}, counters={"step": 2})
    assert str(path) in str(info.value)
    monkeypatch.undo()
    assert load_checkpoint(path).counters == {"step": 1}
    assert _leftovers(tmp_path, keep="last.ckpt") == []


def test_full_disk_raises_and_leaves_nothing(tmp_path, monkeypatch):
    """A write that fails (disk full) is reported; chmod-based tests would not fail as root."""
    net = _populate(seed=6)
    path = tmp_path / "best.ckpt"
    save_checkpoint(path, modules={"net": net}, counters={"step": 1})
    real = tempfile.NamedTemporaryFile

    def full_disk(*args, **kwargs):
        handle = real(*args, **kwargs)

        def write(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        handle.write = write
        return handle

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", full_disk)
    with pytest.raises(CheckpointError, match="No space left on device"):
        save_checkpoint(path, modules={"net": net}, counters={"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path).counters == {"step": 1}
    assert _leftovers(tmp_path, keep="best.ckpt") == []


def test_unwritable_destination(tmp_path):
    _populate(seed=7)
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    with pytest.raises(CheckpointError, match="cannot write checkpoint"):
        save_checkpoint(not_a_folder / "a.ckpt")
    with pytest.raises(CheckpointError, match="cannot write checkpoint"):
        save_checkpoint(tmp_path / "missing" / "a.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_values_that_are_not_json_refused(tmp_path):
    with pytest.raises(CheckpointError, match="plain JSON"):
        save_checkpoint(tmp_path / "a.ckpt", counters={"fn": print})
    with pytest.raises(CheckpointError, match="config_digest must be text"):
        save_checkpoint(tmp_path / "a.ckpt", config_digest={"lr": 0.1})
    assert not (tmp_path / "a.ckpt").exists()


class _Hostile:
    """Unpickling this object creates ``marker``: proof that code ran."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_hostile_pickle_is_not_executed(tmp_path):
    # The payload is live: unpickling it does create a marker (checked on a decoy).
    decoy = tmp_path / "decoy"
    pickle.loads(pickle.dumps(_Hostile(decoy)))
    assert decoy.exists()

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"params": _Hostile(marker)}))
    with pytest.raises(CheckpointError, match="pickle") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert not marker.exists()


def test_torch_save_archive_refused(tmp_path):
    path = tmp_path / "torch.ckpt"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match=r"torch\.save"):
        load_checkpoint(path)


def test_truncated_file_refused(tmp_path):
    net = _populate(seed=8)
    path = save_checkpoint(tmp_path / "a.ckpt", modules={"net": net})
    data = path.read_bytes()
    for cut in (len(data) - 1, len(data) // 2, 100, 9, 4):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=r"truncated|not a safetensors") as info:
            load_checkpoint(path)
        assert str(path) in str(info.value)


@pytest.mark.parametrize("seed", range(5))
def test_random_bytes_refused(tmp_path, seed):
    path = tmp_path / "noise.ckpt"
    path.write_bytes(np.random.default_rng(seed).bytes(4096))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_missing_empty_and_foreign_files_refused(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.ckpt")
    with pytest.raises(CheckpointError, match="folder"):
        load_checkpoint(tmp_path)
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(empty)
    foreign = tmp_path / "foreign.safetensors"
    foreign.write_bytes(safetensors.torch.save({"w": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match="not a ppl-vae checkpoint"):
        load_checkpoint(foreign)
    bad_meta = tmp_path / "bad_meta.ckpt"
    _forge(bad_meta, {}, "{not json")
    with pytest.raises(CheckpointError, match="metadata is not JSON"):
        load_checkpoint(bad_meta)
    _forge(bad_meta, {}, "[1, 2]")
    with pytest.raises(CheckpointError, match="malformed metadata"):
        load_checkpoint(bad_meta)


def test_damaged_bytes_refused(tmp_path):
    """Any flipped byte after the header's layout (metadata text or tensor bytes) is caught."""
    net = _populate(seed=11)
    optimizer = torch.optim.Adam(_params())
    path = save_checkpoint(tmp_path / "a.ckpt", modules={"net": net}, optimizer=optimizer)
    data = path.read_bytes()
    start = 8 + int.from_bytes(data[:8], "little")
    body_at = data.index(b'"version')  # inside the metadata text
    for offset in (start, len(data) - 1, (start + len(data)) // 2, body_at + 12):
        damaged = bytearray(data)
        damaged[offset] ^= 0x01
        path.write_bytes(bytes(damaged))
        with pytest.raises(CheckpointError, match=r"corrupt|not a safetensors"):
            load_checkpoint(path)
    path.write_bytes(data)
    assert load_checkpoint(path).optimizer is not None


def test_missing_tensor_refused(tmp_path):
    _populate(seed=9)
    path = save_checkpoint(tmp_path / "a.ckpt", rng=False)
    _rewrite_body(path, lambda body: body["params"].append("ghost"))
    with pytest.raises(CheckpointError, match="ghost"):
        load_checkpoint(path)


def test_restore_checks_networks_and_optimizer(tmp_path):
    net = _populate(seed=10)
    optimizer = torch.optim.Adam(_params(), lr=0.1)
    path = save_checkpoint(tmp_path / "a.ckpt", modules={"net": net}, optimizer=optimizer)
    checkpoint = load_checkpoint(path)
    with pytest.raises(CheckpointError, match="networks"):
        restore(checkpoint)
    with pytest.raises(CheckpointError, match="does not fit network"):
        restore(checkpoint, modules={"net": nn.Linear(3, 5)})
    restore(checkpoint, modules={"net": net})
    reordered = torch.optim.Adam(list(reversed(_params())), lr=0.1)
    with pytest.raises(CheckpointError, match="optimizer's parameters"):
        restore_optimizer(checkpoint, reordered, modules={"net": net})


def test_module_buffers_are_saved(tmp_path):
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    pyro.module("net", net)
    net(torch.randn(8, 3))  # updates the running statistics (buffers, not params)
    running = net[1].running_mean.clone()
    path = save_checkpoint(tmp_path / "bn.ckpt", modules={"net": net})
    pyro.clear_param_store()
    fresh = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    restore(load_checkpoint(path), modules={"net": fresh}, rng=False)
    assert torch.equal(fresh[1].running_mean, running)
    assert torch.equal(fresh[0].weight, net[0].weight)
    assert int(fresh[1].num_batches_tracked) == 1


def test_checkpoint_without_param_store(tmp_path):
    """Networks alone (param_store=False): restore loads them and leaves the store alone."""
    net = _populate(seed=12)
    weight = net.weight.detach().clone()
    path = save_checkpoint(tmp_path / "n.ckpt", modules={"net": net}, param_store=False, rng=False)
    with torch.no_grad():
        net.weight.zero_()
    checkpoint = load_checkpoint(path)
    assert checkpoint.params == {} and not checkpoint.has_param_store
    with pytest.raises(CheckpointError, match="no random states"):
        restore(checkpoint, modules={"net": net})
    before = _store_snapshot()
    restore(checkpoint, modules={"net": net}, rng=False)
    assert torch.equal(net.weight, weight)
    after = _store_snapshot()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before if not k.startswith("net$$$"))


def test_trainer_state_round_trips_exactly(tmp_path):
    generator = torch.Generator().manual_seed(3)
    torch.rand(5, generator=generator)
    state = {
        "order_rng": generator.get_state(),
        "epoch_total": torch.tensor(-1234.5678901234, dtype=torch.float64),
        "history": [{"epoch": 1, "val_elbo": -30.25, "val_elbo_se": float("nan"), "best": True}],
        "pair": (1, "two"),
    }
    path = save_checkpoint(tmp_path / "s.ckpt", state=state, counters={"best": -float("inf")})
    loaded = load_checkpoint(path)
    assert torch.equal(loaded.state["order_rng"], state["order_rng"])
    assert loaded.state["epoch_total"].dtype == torch.float64
    assert torch.equal(loaded.state["epoch_total"], state["epoch_total"])
    assert loaded.state["pair"] == (1, "two")
    row = loaded.state["history"][0]
    assert row["val_elbo"] == -30.25 and row["best"] is True and np.isnan(row["val_elbo_se"])
    assert loaded.counters["best"] == -float("inf")
    again = torch.Generator()
    again.set_state(loaded.state["order_rng"])
    assert torch.equal(torch.rand(3, generator=again), torch.rand(3, generator=generator))
    assert load_checkpoint(save_checkpoint(tmp_path / "n.ckpt")).state == {}


def test_write_failures_are_typed_and_stale_temporaries_removed(tmp_path, monkeypatch):
    from ppl_vae.checkpoint import remove_stale_temporaries
    from ppl_vae.errors import CheckpointWriteError, WriteError

    def crash(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(CheckpointWriteError) as info:
        save_checkpoint(tmp_path / "a.ckpt")
    monkeypatch.undo()
    assert isinstance(info.value, WriteError) and isinstance(info.value, OSError)
    assert info.value.exit_code == 4 and "Read-only file system" in str(info.value)
    stale = [tmp_path / ".last.ckpt.abc123.tmp", tmp_path / ".best.ckpt.x.tmp"]
    for path in stale:
        path.write_bytes(b"partial")
    keep = [tmp_path / "last.ckpt", tmp_path / ".history.json.x.tmp", tmp_path / "notes.tmp"]
    for path in keep:
        path.write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path) == sorted(stale)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in stale)


def test_header_length_starting_with_the_pickle_byte_loads(tmp_path):
    """A safetensors header length whose first byte is 0x80 (one file in 256) is not taken
    for a pickle."""
    _populate(seed=13)
    for pad in range(300):
        path = save_checkpoint(tmp_path / "a.ckpt", counters={"pad": "x" * pad}, rng=False)
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no padding gave a header length starting with 0x80")
    assert load_checkpoint(path).counters == {"pad": "x" * pad}
