"""Training on several processes (gloo, 2 ranks on the CPU): the numbers of one process,
exact resume after a kill, signals and a dead rank, and torchrun's ways of starting a job.

The ranks are real processes: ``torch.distributed.run`` (torchrun) or, where a test must signal
one rank, two ``python -m ppl_vae train`` processes given the variables torchrun sets (RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so that each rank's pid, exit code and stderr are known.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ppl_vae.checkpoint import load_checkpoint
from ppl_vae.cli import main
from ppl_vae.cli.launch import without_nproc
from ppl_vae.errors import EXIT_PEER_LOST

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

# A quick CLI run: 640 digits, 20 steps an epoch, a checkpoint every 4 steps.
TRAIN = [
    "train",
    "--dataset",
    "digits",
    "--train-subset",
    "640",
    "--batch-size",
    "32",
    "--z-dim",
    "4",
    "--epochs",
    "12",
    "--threads",
    "1",
    "--checkpoint-every",
    "4",
    "--no-progress",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks(args: list[str], world: int = 2) -> list[subprocess.Popen]:
    """``python -m ppl_vae *args`` as every rank of one job, as torchrun would start them."""
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = {
            **ENV,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "WORLD_SIZE": str(world),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "ppl_vae", *args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return procs


def _finish(procs: list[subprocess.Popen], timeout: float = 180) -> list[tuple[int, str, str]]:
    return [(*_wait(p, timeout),) for p in procs]


def _wait(p: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def _state(run: Path) -> dict[str, torch.Tensor]:
    """Every tensor of ``last.ckpt``: parameters, Adam's moments, the random state."""
    ckpt = load_checkpoint(run / "checkpoints" / "last.ckpt")
    out = {f"param/{k}": v for k, v in ckpt.params.items()}
    for index, state in ckpt.optimizer["state"].items():
        out.update({f"optim/{index}/{k}": v for k, v in state.items()})
    out["rng/torch"] = ckpt.rng["torch"]
    return out


def _assert_bitwise(a: Path, b: Path) -> None:
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"{b} differs from {a} in {different[:5]}"


def _resume_on_two_ranks_to(reference: Path, run: Path) -> None:
    """``--resume`` the stopped ``run`` on 2 ranks; it must end bitwise at ``reference``."""
    results = _finish(_ranks(["train", "--resume", str(run), "--no-progress"]))
    assert [r[0] for r in results] == [0, 0], results
    _assert_bitwise(reference, run)


def _history(run: Path) -> list[dict]:
    rows = json.loads((run / "history.json").read_text())
    return [{k: v for k, v in row.items() if "seconds" not in k} for row in rows]


def _one_and_two_processes(script: Path, one: Path, two: Path, arg: str) -> None:
    """``script OUT ARG`` as one process into ``one``, and as 2 torchrun ranks into ``two``."""
    subprocess.run([sys.executable, str(script), str(one), arg], env=ENV, check=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    subprocess.run(
        [*torchrun, "--nproc-per-node", "2", str(script), str(two), arg],
        env=ENV,
        check=True,
        capture_output=True,
    )


def _stop_one_rank_after_first_checkpoint(run: Path, procs, victim: int, signum: int) -> None:
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 120
    while not last.exists():
        assert time.monotonic() < deadline, "no checkpoint appeared"
        assert all(p.poll() is None for p in procs), "a rank ended before its first checkpoint"
        time.sleep(0.005)
    os.kill(procs[victim].pid, signum)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted 2-rank run of TRAIN."""
    run = tmp_path_factory.mktemp("ddp") / "reference"
    results = _finish(_ranks([*TRAIN, "--out", str(run)]))
    assert [r[0] for r in results] == [0, 0], results
    assert "validation ELBO" in results[0][1] and results[1][1] == ""  # one report: rank 0's
    return run


# --- the numbers of one process -------------------------------------------------------------

_WORKER = textwrap.dedent(
    """
    import functools, os, sys
    import pyro, torch
    from safetensors.torch import save_file
    from ppl_vae.data import datasets
    from ppl_vae.guides import vae as vae_guide
    from ppl_vae.models import vae as vae_model
    from ppl_vae.training import TrainConfig, fit
    from ppl_vae.vae import make_networks

    out, engine = sys.argv[1], sys.argv[2]
    ds = datasets.load("digits", binarize="none")
    pyro.clear_param_store(); pyro.set_rng_seed(0)
    enc, dec = make_networks(ds.image_shape, 4, (32,))
    enc.double(); dec.double()
    config = TrainConfig(epochs=2, batch_size=64, lr=1e-2, progress=False, threads=1,
                         device="cpu", engine=engine, beta="warmup:5")
    fit(functools.partial(vae_model.model, decoder=dec),
        functools.partial(vae_guide.guide, encoder=enc),
        ds.train.images[:300].double(), validation=(ds.test.images[:51] > 0.5).double(),
        config=config, modules={"encoder": enc, "decoder": dec}, dynamic_binarize=True,
        step_kwargs={"check_data": False}, out_dir=out,
        distributed=int(os.environ.get("WORLD_SIZE", "1")) > 1)
    params = {k: v.detach().contiguous() for k, v in pyro.get_param_store().items()}
    save_file(params, f"{out}/params{os.environ.get('RANK', '0')}.safetensors")
    """
)


@pytest.mark.parametrize("engine", ["eager", "compiled"])
def test_two_processes_give_the_parameters_of_one(tmp_path, engine):
    """300 digits, batch 64 (5 steps an epoch, the last of 44 rows split 22 + 22, the others
    32 + 32), 2 epochs of Adam at lr 1e-2, dynamic binarisation and a KL warm-up, in float64.

    Tolerance: the ranks' sums differ from one process's only in their order, so each step's
    gradient has relative error at most about n u (n = 64 rows summed, u = 2^-53); Adam's step
    lr m / sqrt(v) then moves by at most 2 n u times |m / sqrt(v)| <= (1 - b1) / sqrt(1 - b2)
    = 3.2, so after T = 10 steps a parameter differs by at most T lr 2 n u 3.2 = 4.5e-16
    (first order). Any other noise or a misplaced share of the loss differs by ~1e-3."""
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    one, two = tmp_path / "one", tmp_path / "two"
    _one_and_two_processes(script, one, two, engine)
    p1, r0, r1 = (load_file(p) for p in (one / "params0.safetensors", *two.glob("params*")))
    assert p1.keys() == r0.keys() == r1.keys()
    for name in p1:
        assert torch.equal(r0[name], r1[name]), f"ranks disagree on {name}"
    tolerance = 10 * 1e-2 * 2 * 64 * 2.0**-53 * 3.2
    worst = max((p1[k] - r0[k]).abs().max().item() for k in p1)
    assert worst <= tolerance, f"largest difference {worst:.2e} > {tolerance:.2e}"
    # Validation is sharded too: 51 images split 26 + 25, the same ELBOs to rounding.
    h1, h2 = _history(one), _history(two)
    for a, b in zip(h1, h2, strict=True):
        assert b["val_elbo"] == pytest.approx(a["val_elbo"], rel=1e-13, abs=0)
        assert b["train_objective"] == pytest.approx(a["train_objective"], rel=1e-13, abs=0)


# --- exact resume, signals, a dead rank ------------------------------------------------------


def test_a_killed_rank_stops_its_peers_with_a_clear_error_then_resume_is_bitwise(
    reference, tmp_path
):
    """SIGKILL rank 1 after the first checkpoint: rank 0 exits 6 ("peer lost") with one line,
    no traceback; ``last.ckpt`` loads; ``--resume`` on 2 ranks ends bitwise as never killed."""
    run = tmp_path / "killed"
    procs = _ranks([*TRAIN, "--out", str(run)])
    _stop_one_rank_after_first_checkpoint(run, procs, victim=1, signum=signal.SIGKILL)
    (code0, _, err0), (code1, _, _) = _finish(procs)
    assert code1 == -signal.SIGKILL
    assert code0 == EXIT_PEER_LOST, err0
    assert "Traceback" not in err0
    assert "rank 0 of 2" in err0 and "peer" in err0
    load_checkpoint(run / "checkpoints" / "last.ckpt")  # whole, loadable
    _resume_on_two_ranks_to(reference, run)
    assert _history(run) == _history(reference)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_to_one_rank_stops_all_at_one_step_then_resume_is_bitwise(
    reference, tmp_path, signum, code
):
    """The signal reaches rank 1 only; both ranks stop at the same step boundary with its
    exit code after one checkpoint, and the resumed run ends bitwise as never stopped."""
    run = tmp_path / "signalled"
    procs = _ranks([*TRAIN, "--out", str(run)])
    _stop_one_rank_after_first_checkpoint(run, procs, victim=1, signum=signum)
    results = _finish(procs)
    assert [r[0] for r in results] == [code, code], results
    steps = {err.split("step ")[1].split()[0] for _, _, err in results}
    assert len(steps) == 1, f"the ranks stopped at different steps: {results}"
    saved = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert str(saved.counters["step"]) in steps
    _resume_on_two_ranks_to(reference, run)


# --- how users start a job --------------------------------------------------------------------


def test_two_loopback_nodes_by_c10d_rendezvous_match_two_local_ranks(reference, tmp_path):
    """``torchrun --nnodes 2 --node-rank R --rdzv-backend c10d --rdzv-endpoint HOST:PORT``,
    both "nodes" on 127.0.0.1: the same job as two ranks on one machine, bitwise (a sum of
    two values does not depend on their order)."""
    run = tmp_path / "nodes"
    endpoint = f"127.0.0.1:{_free_port()}"
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node-rank",
                str(node),
                "--nproc-per-node",
                "1",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                endpoint,
                "--rdzv-id",
                "ppl-vae-test",
                "-m",
                "ppl_vae",
                *TRAIN,
                "--out",
                str(run),
            ],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in range(2)
    ]
    results = _finish(nodes)
    assert [r[0] for r in results] == [0, 0], results
    _assert_bitwise(reference, run)


def test_nproc_launches_the_job_on_this_machine(reference, tmp_path):
    """``ppl-vae train --nproc 2``: torch's launcher starts the two ranks; the same run."""
    run = tmp_path / "nproc"
    done = subprocess.run(
        [sys.executable, "-m", "ppl_vae", *TRAIN, "--nproc", "2", "--out", str(run)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("validation ELBO") == 1
    _assert_bitwise(reference, run)


def test_nproc_passes_on_every_other_argument():
    argv = ["train", "--nproc", "2", "--out", "x", "--nproc=3", "--epochs", "1"]
    assert without_nproc(argv) == ["train", "--out", "x", "--epochs", "1"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--backend", "gloo"], "--backend applies to several processes"),
        (["--nproc", "0"], "--nproc must be at least 1"),
    ],
)
def test_bad_distributed_flags_are_refused(tmp_path, capsys, extra, message):
    assert main([*TRAIN, "--out", str(tmp_path / "r"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_the_own_pair_example_runs_under_torchrun(tmp_path):
    """``torchrun --nproc-per-node 2 examples/05_distributed_own_pair.py``: one report and
    one figure, from rank 0."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(ROOT / "examples" / "05_distributed_own_pair.py"),
            *("--dataset", "digits", "--z-dim", "2", "--hidden", "16", "--epochs", "1"),
            *("--train-subset", "300", "--no-progress", "--out", str(tmp_path / "run")),
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("trained on 2 process(es)") == 1
    assert (tmp_path / "run" / "validation_elbo.png").exists()


def test_a_run_stopped_on_two_ranks_resumes_on_one_process(reference, tmp_path):
    """The noise and the data order do not depend on the world size, so a 2-rank run resumed
    on one process ends at the 2-rank parameters up to the order of float sums. Bound, as in
    the float64 test above: T lr 2 n u 3.2 with T = 240 steps, lr = 1e-3 (the default),
    n = 32 rows, u = 2^-24 (float32): 2.9e-6."""
    run = tmp_path / "moved"
    procs = _ranks([*TRAIN, "--out", str(run)])
    _stop_one_rank_after_first_checkpoint(run, procs, victim=0, signum=signal.SIGTERM)
    assert [r[0] for r in _finish(procs)] == [143, 143]
    done = subprocess.run(
        [sys.executable, "-m", "ppl_vae", "train", "--resume", str(run), "--no-progress"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    a, b = _state(reference), _state(run)
    params = [k for k in a if k.startswith("param/")]
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in params)
    tolerance = 240 * 1e-3 * 2 * 32 * 2.0**-24 * 3.2
    assert worst <= tolerance, f"largest difference {worst:.2e} > {tolerance:.2e}"


_EVAL_WORKER = textwrap.dedent(
    """
    import functools, json, os, sys
    import pyro, torch
    from safetensors.torch import save_file
    from ppl_vae.data import datasets
    from ppl_vae.guides import vae as vae_guide
    from ppl_vae.models import vae as vae_model
    from ppl_vae.runs import evaluate, vae_log_evidence
    from ppl_vae.training import Distributed
    from ppl_vae.vae import make_networks

    out, route = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    ds = datasets.load("digits", binarize="static")
    pyro.set_rng_seed(0)
    enc, dec = make_networks(ds.data_dim, 4, [32])
    group = Distributed() if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    fast = vae_log_evidence(enc, dec) if route == "fast" else None
    ev = evaluate(functools.partial(vae_model.model, decoder=dec),
                  functools.partial(vae_guide.guide, encoder=enc), ds.test.images,
                  encoder=enc, iwae_samples=20, seed=7, progress=False, log_evidence=fast,
                  distributed=group, block_size=50)
    rank = os.environ.get("RANK", "0")
    save_file({"elbo": ev.elbo_per_image, "iwae": ev.iwae_per_image}, f"{out}/values{rank}.st")
    with open(f"{out}/means{rank}.json", "w") as f:
        json.dump([ev.elbo, ev.elbo_se, ev.iwae, ev.iwae_se, ev.gap_elbo_iwae], f)
    if group is not None:
        group.close()
    """
)


@pytest.mark.parametrize("route", ["pyro", "fast"])
def test_sharded_evaluation_gives_the_numbers_of_one_process(tmp_path, route):
    """359 test digits in blocks of 50 (8 blocks, 4 a rank): each image's ELBO and IWAE bound
    (K = 20, through Pyro traces or the trace-free route) come from one rank and its block's own
    draws, so the all-reduced values equal one process's exactly, and so do the means."""
    script = tmp_path / "evaluate.py"
    script.write_text(_EVAL_WORKER)
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    _one_and_two_processes(script, one, two, route)
    reference = load_file(one / "values0.st")
    for rank in (0, 1):
        values = load_file(two / f"values{rank}.st")
        for name in ("elbo", "iwae"):
            assert torch.equal(values[name], reference[name]), f"rank {rank}: {name} differs"
        means = json.loads((two / f"means{rank}.json").read_text())
        assert means == json.loads((one / "means0.json").read_text())


def test_evaluate_with_nproc_writes_the_one_process_numbers(reference, tmp_path):
    """``ppl-vae evaluate RUN --nproc 2``: one report, and the evaluation.json of one process."""
    command = [sys.executable, "-m", "ppl_vae", "evaluate", str(reference), "--iwae-k", "20"]
    results = []
    for extra in ([], ["--nproc", "2"]):
        done = subprocess.run(
            [*command, "--no-progress", *extra], env=ENV, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.count("VAE evaluation") == 1
        saved = json.loads((reference / "evaluation.json").read_text())
        results.append({k: v for k, v in saved.items() if k != "seconds"})
    assert results[0] == results[1]


def test_sigterm_to_the_nproc_launcher_stops_every_rank_at_one_step(reference, tmp_path):
    """SIGTERM to ``ppl-vae train --nproc 2`` (the launcher, not a rank): it passes the signal
    on, both ranks stop at one step after one checkpoint, the command exits 143 with the ranks'
    one-line messages only (none of the launcher's logging), and the run resumes bitwise."""
    run = tmp_path / "launched"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "ppl_vae", *TRAIN, "--nproc", "2", "--out", str(run)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _stop_one_rank_after_first_checkpoint(run, [launcher], victim=0, signum=signal.SIGTERM)
    code, _, err = _wait(launcher, 180)
    assert code == 143, err
    lines = err.strip().splitlines()
    # Both ranks' messages, each whole on its own line (they share the launcher's stderr:
    # a message written in two pieces could run into the other rank's), and nothing else.
    assert len(lines) == 2, lines
    assert all(line.count("interrupted by SIGTERM after step") == 1 for line in lines), lines
    assert {line.split("(rank ")[1][0] for line in lines} == {"0", "1"}, lines
    assert len({line.split("step ")[1].split()[0] for line in lines}) == 1, lines
    _resume_on_two_ranks_to(reference, run)
