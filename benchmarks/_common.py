"""Helpers shared by the method benchmarks (init_compare, joint_vs_separate, visual_prompt, scaling).

Every benchmark takes `--base`: `tiny` (the default) is the tiny shapes base of `make demo` (demo-out/base, built
there if missing); `proving-ground`, a local folder or a hub id go to `Backbone.load` unchanged. The world follows
the base (`--world auto`): the demo's coloured shapes for a tiny base, the proving ground's characters
(`mcllava.world`) otherwise. Results go to `<out>/<name>.json` and a `<out>/<name>.png` plot (matplotlib, the
`bench` extra).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
import resource
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mcllava import presets, proving_base
from mcllava.assistant import CAPTION_QUESTION, AssistantAnswerer, PersonalAssistant
from mcllava.backbone import Backbone
from mcllava.bank import ConceptBank
from mcllava.cli import quiet_libraries
from mcllava.concepts import ConceptSet
from mcllava.datasets import read_tests_jsonl
from mcllava.evaluate import evaluate
from mcllava.tiny import COLOURS, SHAPES, draw_shapes, make_shape_concepts, make_tiny_base
from mcllava.tokens import write_rows
from mcllava.train import TrainConfig, TrainResult, personalize
from mcllava.training_data import PROBE_QUESTION, join_names
from mcllava.world import make_world
from mcllava.world.make import concept_ids, groups_of
from mcllava.world.questions import record

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"
TINY = "tiny"


# ------------------------------------------------------------------------------------------- arguments
def parser(doc: str, epochs: int, test_images: int | None = 24) -> argparse.ArgumentParser:
    """The options every method benchmark shares; with `test_images`, also `--concepts` (one count) and `--test-images`."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    if test_images is not None:
        ap.add_argument("--concepts", type=int, default=4)
        ap.add_argument("--test-images", type=int, default=test_images, help="test scenes")
    ap.add_argument(
        "--base", default=TINY, help="tiny (make demo's shapes base, default) | proving-ground | a folder | a hub id"
    )
    ap.add_argument(
        "--world", choices=("auto", "shapes", "characters"), default="auto", help="auto: shapes for a tiny base"
    )
    ap.add_argument("--epochs", type=int, default=epochs)
    ap.add_argument("--train-images", type=int, default=8, help="training images per concept")
    ap.add_argument(
        "--multi", type=float, default=0.5, help="shapes world: share of test scenes that show two concepts"
    )
    ap.add_argument("--seed", type=int, default=0, help="world seed")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 is fastest for the tiny base on a busy CPU)"
    )
    ap.add_argument("--out", type=Path, default=OUT, help="where <name>.json and <name>.png go")
    ap.add_argument(
        "--work", type=Path, default=None, help="scratch folder for worlds and banks (default: OUT/cache/<name>)"
    )
    return ap


@dataclass
class Setup:
    base: str  # what Backbone.load takes
    world: str  # "shapes" | "characters"
    work: Path


def setup(args: argparse.Namespace, name: str) -> Setup:
    """Quiet the libraries, set the thread count, build or resolve the base and pick the world."""
    quiet_libraries()
    torch.set_num_threads(args.threads)
    base = args.base
    if base == TINY:
        base = str(make_tiny_base(ROOT / "demo-out" / "base", tokenizer_cache=ROOT / "demo-out" / "tokenizer"))
    world = args.world
    if world == "auto":
        world = "shapes" if (Path(base) / "mcllava-tiny.json").exists() else "characters"
    return Setup(base, world, args.work or args.out / "cache" / name)


def train_config(s: Setup, epochs: int, seed: int, **overrides) -> TrainConfig:
    """The recipe `make demo` / `personalize` use on the base: the tiny base's for the shapes world,
    `presets.proving_ground()` on the proving ground, the library's defaults for other bases; no probe."""
    overrides = {"holdout": 0, **overrides}
    if s.world == "shapes":
        return presets.tiny(epochs=epochs, seed=seed, **overrides)
    if s.base == proving_base.NAME:
        return presets.proving_ground(epochs=epochs, seed=seed, **overrides)
    return TrainConfig(epochs=epochs, seed=seed, **overrides)


# ------------------------------------------------------------------------------------------- worlds
@dataclass
class World:
    concepts: Path  # concept folder
    tests: Path  # tests.jsonl
    negatives: Path | None  # generic images that show no concept
    ids: list[str]
    distinct_looks: int  # fewer than len(ids) when a shapes world repeats looks


def build_world(
    kind: str,
    root: Path,
    n: int,
    seed: int,
    train_images: int,
    test_images: int,
    multi: float = 0.5,
    reuse: bool = False,
) -> World:
    """A fresh world with `n` concepts: concept folder, generic negatives and a test set of `test_images` scenes.

    With `reuse`, a world this function finished earlier in `root` with the same settings is read back instead (a
    resumed benchmark must train on the very photos its checkpoints were made from)."""
    settings = {
        "kind": kind,
        "n": n,
        "seed": seed,
        "train_images": train_images,
        "test_images": test_images,
        "multi": multi,
    }
    marker = root / "world-settings.json"
    if reuse and marker.exists():
        saved = json.loads(marker.read_text())
        if saved["settings"] == settings:
            w = saved["world"]
            negatives = root / w["negatives"] if w["negatives"] else None
            return World(root / w["concepts"], root / w["tests"], negatives, w["ids"], w["distinct_looks"])
    shutil.rmtree(root, ignore_errors=True)
    if kind == "characters":
        make_world(root, seed=seed, concepts=n, train_images=train_images, test_scenes=test_images, progress=False)
        ids = sorted(p.name for p in (root / "concepts").iterdir() if not p.name.startswith("_"))
        world = World(root / "concepts", root / "tests.jsonl", root / "negatives", ids, n)
    else:
        world = shapes_world(root, n, seed, train_images, test_images, multi)
    relative = {
        "concepts": world.concepts.name,
        "tests": world.tests.name,
        "negatives": world.negatives.name if world.negatives else None,
        "ids": world.ids,
        "distinct_looks": world.distinct_looks,
    }
    marker.write_text(json.dumps({"settings": settings, "world": relative}))  # last: only a finished world is reused
    return world


def shapes_world(root: Path, n: int, seed: int, train_images: int, test_images: int, multi: float) -> World:
    """The demo's shapes world with `n` concepts, group photos and multi-concept test scenes.

    A concept is a (colour, shape) look: the first six concepts differ in colour, later ones share a colour with an
    earlier one and differ in shape. There are 18 looks, so beyond 18 concepts looks repeat and a question about a
    concept whose look is shown under another name is ambiguous: such questions are left out. As in the character
    world, concepts form groups of 2-3 (`groups_of`) with two training photos per pair of a group. Each test scene
    shows one concept, or (with probability `multi`) two of a group; it gets a Yes question per shown concept, No
    questions about two absent ones, a caption and a grounding question per shown concept.
    """
    rng = random.Random(seed)
    colours, shapes = rng.sample(list(COLOURS), len(COLOURS)), rng.sample(SHAPES, len(SHAPES))
    looks = [(c, shapes[(i + r) % len(shapes)]) for r in range(len(shapes)) for i, c in enumerate(colours)]
    ids = concept_ids(n, np.random.default_rng(seed))
    spec = {cid: looks[i % len(looks)] for i, cid in enumerate(ids)}
    concepts, _ = make_shape_concepts(root, spec, n_train=train_images, n_test=0, seed=seed)
    groups = {c: g for g in groups_of(ids) for c in g}
    for a, b in {
        tuple(sorted(p)) for g in groups.values() for p in itertools.combinations(g, 2) if spec[p[0]] != spec[p[1]]
    }:
        (concepts / "_multi" / f"{a}+{b}").mkdir(parents=True)
        for k in range(2):
            draw_shapes([spec[a], spec[b]], 32, rng)[0].save(concepts / "_multi" / f"{a}+{b}" / f"{k}.png")
    negatives = None
    used = {colour for colour, _ in spec.values()}
    # generic negatives: looks that no concept has, of colours no concept has while there are such colours (the tiny
    # base tells shapes apart poorly, and a same-colour negative contradicts its concept's photos)
    others = [look for look in looks[n:] if look[0] not in used] or looks[n:]
    if others:
        negatives = root / "negatives"
        negatives.mkdir()
        for i in range(train_images):
            draw_shapes([rng.choice(others)], 32, rng)[0].save(negatives / f"{i}.png")
    records = []
    for i in range(test_images):
        shown = [rng.choice(ids)]
        partners = [c for c in groups[shown[0]] if spec[c] != spec[shown[0]]]
        if partners and rng.random() < multi:
            shown.append(rng.choice(partners))
        image, masks = draw_shapes([spec[c] for c in shown], 32, rng)
        path = f"scenes/{i}.png"
        image.save(root / path)
        boxes = {c: box_of(m) for c, m in zip(shown, masks)}
        absent = [c for c in ids if spec[c] not in {spec[s] for s in shown}]
        asked = [(c, "Yes") for c in shown] + [(c, "No") for c in rng.sample(absent, min(2, len(absent)))]
        records += [record(path, "recognition", PROBE_QUESTION.format(c=f"<{c}>"), a, [c], shown) for c, a in asked]
        records.append(
            record(
                path,
                "caption",
                CAPTION_QUESTION,
                f"I see {join_names([f'<{c}>' for c in shown])}.",
                shown,
                shown,
                boxes,
            )
        )
        records += [
            record(path, "grounding", f"Where is <{c}>?", f"<{c}> is here.", [c], shown, {c: boxes[c]}) for c in shown
        ]
    (root / "tests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return World(concepts, root / "tests.jsonl", negatives, sorted(ids), len(set(spec.values())))


def box_of(mask: np.ndarray) -> list[int]:
    """Tight [x0, y0, x1, y1] box of a boolean mask (x1, y1 exclusive, as the world writes them)."""
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def test_records(world: World, tasks: tuple[str, ...] = ("recognition",)) -> list[dict]:
    return [r for r in read_tests_jsonl(world.tests) if r["task"] in tasks]


# ------------------------------------------------------------------------------------------- train / evaluate
def train(
    world: World,
    base: str,
    out: Path,
    config: TrainConfig,
    only: list[str] | None = None,
    on_epoch=None,
    resume: bool = False,
) -> tuple[TrainResult, float]:
    """Personalise a fresh copy of the base on the world's concepts (or `only` these); returns (result, seconds).

    With `resume`, an interrupted run in `out` continues from its last epoch checkpoint (the seconds are then this
    call's alone; the result's history has every epoch's)."""
    backbone = Backbone.load(base)
    concepts = ConceptSet.load(world.concepts, tokenizer=backbone.tokenizer)
    if only is not None:
        keep = set(only)
        concepts = ConceptSet(
            concepts.root, [c for c in concepts if c.id in keep], [m for m in concepts.multi if set(m.present) <= keep]
        )
    t0 = time.perf_counter()
    result = personalize(
        concepts,
        backbone,
        out,
        config,
        negatives=world.negatives,
        progress=False,
        log=lambda *_: None,
        on_epoch=on_epoch,
        resume=resume,
    )
    return result, time.perf_counter() - t0


class RecordingAnswerer(AssistantAnswerer):
    """An `AssistantAnswerer` that also records the length in tokens of each answer's system text."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.system_tokens: list[int] = []

    def answer(self, image, question: str) -> str:
        a = self.assistant.respond(image, question, self.visual_prompt, self.max_new_tokens)
        self.system_tokens.append(
            len(self.assistant.backbone.tokenizer(a.system, add_special_tokens=False)["input_ids"])
        )
        return a.text


class BankEvaluator:
    """Evaluates banks of one concept set on a single loaded copy of the base (later banks' rows are written over)."""

    def __init__(self, base: str, records: list[dict]):
        self.base, self.records, self.assistant = base, records, None

    def __call__(
        self,
        bank: ConceptBank,
        visual_prompt: bool = False,
        reference: str = "features",
        introduce: str | None = None,
        prompt_cache: bool = True,
    ) -> dict:
        """The evaluation report (with rows), `latency_s` (mean seconds per question, by task) and
        `system_tokens_mean` (mean length of the system text the answers were given). `prompt_cache=False`
        answers without reusing the key-value cache of the prefix the prompts share (`Backbone.prompt_cache`)."""
        if self.assistant is None or self.assistant.bank.concept_ids != bank.concept_ids:
            self.assistant = PersonalAssistant(Backbone.load(self.base), bank)
            first = self.records[0]  # one untimed answer: a fresh model's first call pays allocations (~0.3 s on a CPU)
            with Image.open(first["image"]) as im:
                self.assistant.respond(im.convert("RGB"), first["question"], False, 4)
        else:
            write_rows(self.assistant.backbone.model, self.assistant.tokens, bank.input_rows, bank.head_rows)
            self.assistant.bank = bank
        self.assistant.reference = reference
        self.assistant.backbone.prompt_cache.clear()
        self.assistant.backbone.prompt_cache.enabled = prompt_cache
        self.assistant.introduce = introduce or bank.recipe.get("introduce", "all")  # default: as the bank was trained
        answerer = RecordingAnswerer(self.assistant, visual_prompt, max_new_tokens=16)
        report = evaluate(self.records, answerer, progress=False)
        report["latency_s"] = {
            task: statistics.mean(r["seconds"] for r in report["rows"] if r["kind"] == task)
            for task in dict.fromkeys(r["kind"] for r in report["rows"])
        }
        report["system_tokens_mean"] = statistics.mean(answerer.system_tokens) if answerer.system_tokens else None
        return report


def first_reaching(points: list[tuple[int, float]], target: float) -> int | None:
    """The first x whose y reaches `target` (None if none does)."""
    return next((x for x, y in points if y is not None and y >= target), None)


# ------------------------------------------------------------------------------------------- memory
def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark of this process (Linux); elsewhere `peak_rss_mb` stays process-wide."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _status_mb(field: str) -> float | None:
    try:
        return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024
    except (OSError, AttributeError):
        return None


def rss_mb() -> float | None:
    """Resident memory now (Linux), None elsewhere."""
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """Peak resident memory since `reset_peak_rss` (Linux VmHWM), else since the process started (maxrss)."""
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------- output
def _plot_panel(ax, p: dict) -> None:
    """One panel: `series` ({name: [(x, y)]}) as lines, or `bars` ({group: {series: value}}) as grouped bars."""
    if "series" in p:
        for name, pts in p["series"].items():
            pts = [(x, y) for x, y in pts if y is not None]
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", markersize=3, label=name)
        if "target" in p:
            ax.axhline(p["target"], color="#999", linestyle="--", linewidth=1)
        ax.set_xlabel(p.get("x", ""))
    else:
        groups = p["bars"]
        names = list(dict.fromkeys(s for g in groups.values() for s in g))
        width = 0.8 / max(len(names), 1)
        for i, name in enumerate(names):
            xs = [g + i * width for g, values in enumerate(groups.values()) if values.get(name) is not None]
            ax.bar(xs, [v[name] for v in groups.values() if v.get(name) is not None], width, label=name)
        long = max((len(str(g)) for g in groups), default=0) > 12
        ax.set_xticks(
            [g + 0.4 - width / 2 for g in range(len(groups))],
            list(groups),
            rotation=25 if long else 0,
            ha="right" if long else "center",
            fontsize=8 if long else None,
        )
    if p.get("log"):
        ax.set_yscale("log")
    if p.get("ymax"):
        ax.set_ylim(0, p["ymax"])
    ax.set_title(p["title"], fontsize=10)
    ax.legend(fontsize=7)


def write_results(out_dir: Path, name: str, results: dict, panels: list[dict]) -> Path:
    """Write `<name>.json` and a `<name>.png` of `panels` side by side (see `_plot_panel`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    for ax, p in zip(axes[0], panels):
        _plot_panel(ax, p)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=100)
    plt.close(fig)
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return path


def header(name: str, s: Setup, args: argparse.Namespace, world: World | None = None) -> dict:
    """What every result file starts with: the benchmark, base, world (and its concepts) and the command's settings."""
    out = {
        "benchmark": name,
        "base": s.base,
        "world": s.world,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    if world is not None:
        out.update(concepts=world.ids, distinct_looks=world.distinct_looks)
    return out


def strip_rows(report: dict) -> dict:
    """A report without its per-question rows (they stay out of the benchmark JSON)."""
    return {k: v for k, v in report.items() if k != "rows"}
