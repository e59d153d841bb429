"""Interrupted training: `mcllava personalize` killed with SIGKILL, then `--resume`, ends with the same bank.

A real subprocess trains an untrained tiny base on shape concepts. It is killed at named points inside a step
or a checkpoint write (the `MCLLAVA_KILL_AT` hook in checkpoint.py) and, in the long run, at random moments after an
epoch's log line. Each kill is followed by `--resume`; the last resume must finish, and its bank must be
tensor-equal to the bank of an uninterrupted run, with no checkpoint or temporary folder left behind.

CI runs one chain of 3 kills; MCLLAVA_LONG=1 adds a chain of every hook point and random timed kills
(the counts go to benchmarks/out/reliability_kill.json).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from mcllava.bank import ConceptBank
from mcllava.testing import make_base
from mcllava.tiny import make_shape_concepts

pytestmark = pytest.mark.slow  # kills training subprocesses at many points

LONG = os.environ.get("MCLLAVA_LONG") == "1"
EPOCHS = 3
ARGS = ["--k", "2", "--epochs", str(EPOCHS), "--batch-size", "2", "--holdout", "0", "--seed", "3", "--quiet"]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # the same arithmetic in every process


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("kill")
    base = make_base(tokenizer_dir, root / "base")
    concepts, _ = make_shape_concepts(
        root / "shapes", {"bo": ("red", "circle"), "ana": ("blue", "square")}, n_train=3, n_test=1, seed=1
    )
    return base, concepts


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    """The uninterrupted run's bank: the same settings in this process (one thread, like the subprocesses)."""
    from mcllava.backbone import Backbone
    from mcllava.concepts import ConceptSet
    from mcllava.train import TrainConfig, personalize

    base, concepts = setup
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        backbone = Backbone.load(base)
        config = TrainConfig(k=2, epochs=EPOCHS, batch_size=2, holdout=0, seed=3)
        out = tmp_path_factory.mktemp("ref") / "bank"
        return personalize(
            ConceptSet.load(concepts, tokenizer=backbone.tokenizer),
            backbone,
            out,
            config,
            progress=False,
            log=lambda *_: None,
        ).bank
    finally:
        torch.set_num_threads(threads)


def run(
    setup, out: Path, resume: bool = False, kill_at: str | None = None, kill_after: tuple[int, float] | None = None
):
    """Run `mcllava personalize`; SIGKILL it at a hook point, or `delay` s after the log line of epoch `n`."""
    base, concepts = setup
    cmd = [
        sys.executable,
        "-m",
        "mcllava.cli",
        "personalize",
        str(concepts),
        "--base",
        str(base),
        "--out",
        str(out),
        *ARGS,
    ]
    env = {**os.environ, **ONE_THREAD, "MCLLAVA_KILL_AT": kill_at or ""}
    proc = subprocess.Popen(
        cmd + (["--resume"] if resume else []), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    seen, lines = threading.Event(), []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if kill_after and line.startswith(f"epoch {kill_after[0]}:"):
                seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    if kill_after and seen.wait(120) and proc.poll() is None:
        time.sleep(kill_after[1])
        proc.send_signal(signal.SIGKILL)
    proc.wait(180)
    reader.join(10)
    proc.output = "".join(lines)
    return proc


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


def resumed_after(output: str) -> int:
    """The epoch a run resumed after (0: started from scratch)."""
    found = re.search(r"resuming from .* after epoch (\d+)", " ".join(output.split()))
    return int(found.group(1)) if found else 0


def chain(setup, out: Path, kills: list, expect_resume: list[int] | None = None, resumed: list | None = None) -> int:
    """Kill a run at each point in turn (str: hook point, tuple: timed), resuming after each; return kills that landed.

    `expect_resume`: the epoch each resume (one per kill) must continue after; `resumed` collects them.
    """
    landed, resumed = 0, [] if resumed is None else resumed
    for i, kill in enumerate(kills + [None]):
        how = {"kill_at": kill} if isinstance(kill, str) else {"kill_after": kill}
        proc = run(setup, out, resume=i > 0, **how)
        if i > 0:
            resumed.append(resumed_after(proc.output))
        if kill is None:
            assert proc.returncode == 0, proc.output
        elif isinstance(kill, str):
            assert proc.returncode == -signal.SIGKILL, f"hook {kill} not reached:\n{proc.output}"
        assert proc.returncode in (0, -signal.SIGKILL), proc.output
        landed += proc.returncode == -signal.SIGKILL
    if expect_resume is not None:
        assert resumed == expect_resume
    return landed


def assert_same_bank(a: ConceptBank, b: ConceptBank) -> None:
    assert a.concept_ids == b.concept_ids and a.locator_refs.keys() == b.locator_refs.keys()
    assert torch.equal(a.input_rows, b.input_rows)
    assert (a.head_rows is None and b.head_rows is None) or torch.equal(a.head_rows, b.head_rows)
    assert all(torch.equal(a.locator_refs[c], b.locator_refs[c]) for c in a.locator_refs)
    assert [h["loss"] for h in a.metrics["history"]] == [h["loss"] for h in b.metrics["history"]]


def test_killed_mid_step_and_mid_checkpoint_resumes_to_the_same_bank(setup, reference, tmp_path):
    out = tmp_path / "bank"
    # mid-epoch 2, then between the two renames of epoch 2's checkpoint (only bank.ckpt.old is complete)
    assert chain(setup, out, ["step:2:3", "ckpt:2:moved-aside"], expect_resume=[1, 1]) == 2
    assert_same_bank(ConceptBank.load(out), reference)
    assert leftovers(out) == []


def test_a_stale_old_checkpoint_does_not_block_the_next_save(tmp_path):
    """Killed after the swap (ckpt:N:swapped), a run leaves bank.ckpt.old; the next save and the cleanup cope."""
    from mcllava.checkpoint import latest_checkpoint, load_checkpoint, remove_checkpoint, save_checkpoint

    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p])
    p.grad = torch.ones(3)
    opt.step()
    ckpt = tmp_path / "bank.ckpt"
    save_checkpoint(ckpt, [p], opt, {"epoch": 1})
    (tmp_path / "bank.ckpt.old").mkdir()
    (tmp_path / "bank.ckpt.old" / "state.json").write_text("{}")
    save_checkpoint(ckpt, [p], opt, {"epoch": 2})  # used to fail: renaming onto a non-empty folder
    assert latest_checkpoint(ckpt) == ckpt and load_checkpoint(ckpt, [p], opt)["epoch"] == 2
    remove_checkpoint(ckpt)
    assert list(tmp_path.iterdir()) == []


HOOK_POINTS = [
    "step:1:1",
    "step:1:6",
    "ckpt:1:written",
    "ckpt:1:swapped",
    "step:2:1",
    "step:2:5",
    "ckpt:2:written",
    "ckpt:2:moved-aside",
    "ckpt:2:swapped",
    "step:3:2",
    "step:3:7",
    "ckpt:3:written",
    "ckpt:3:moved-aside",
    "ckpt:3:swapped",
    "bank:saved",
]


@pytest.mark.skipif(not LONG, reason="long run: set MCLLAVA_LONG=1")
def test_long_many_kill_points(setup, reference, tmp_path):
    rng = random.Random(7)
    timed = [(rng.randint(1, EPOCHS), rng.uniform(0.0, 0.05)) for _ in range(12)]
    start = time.perf_counter()
    hooks = chain(setup, tmp_path / "hooks", HOOK_POINTS)
    assert_same_bank(ConceptBank.load(tmp_path / "hooks"), reference)
    assert leftovers(tmp_path / "hooks") == []
    landed, resumed = 0, []
    for n, kill in enumerate(timed):  # one kill per run: each timed kill starts from scratch
        out = tmp_path / f"timed{n}"
        landed += chain(setup, out, [kill], resumed=resumed)
        assert_same_bank(ConceptBank.load(out), reference)
        assert not any(".ckpt" in name for name in leftovers(out)), leftovers(out)
    report = {
        "hook_kills": hooks,
        "hook_points": HOOK_POINTS,
        "timed_kills_landed": landed,
        "timed_kills_tried": len(timed),
        "timed_kills": [
            {"after_epoch_log": e, "delay_s": round(d, 4), "resumed_after_epoch": r}
            for (e, d), r in zip(timed, resumed)
        ],
        "seconds": round(time.perf_counter() - start, 1),
    }
    out_file = Path(__file__).resolve().parents[1] / "benchmarks" / "out" / "reliability_kill.json"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(report, indent=2) + "\n")
    assert hooks + landed >= 20, report
