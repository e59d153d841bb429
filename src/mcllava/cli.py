"""`mcllava` command line: personalize, ask, eval, info (and the proving ground's `world`)."""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Optional

import transformers.modeling_gguf_pytorch_utils as gguf_utils
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from sklearn.exceptions import ConvergenceWarning
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from . import presets, proving_base
from .assistant import EVAL_CACHE_SIZE, AssistantAnswerer, PersonalAssistant
from .backbone import Backbone
from .bank import ConceptBank
from .concepts import ConceptSet, load_image
from .datasets import read_any
from .errors import McLlavaError
from .evaluate import evaluate, print_table
from .export import export
from .multibank import SharedBase, bank_folders
from .proving_base.cli import base_app
from .report import write_html
from .retrieval import RetrievalArm
from .train import TrainConfig
from .train import personalize as personalize_concepts
from .world.cli import world_app

app = typer.Typer(
    help="Personalise LLaVA-family vision-language models with several concepts at once.", no_args_is_help=True
)
console = Console()
err = Console(stderr=True)


@app.callback()
def _setup() -> None:
    quiet_libraries()


def quiet_libraries() -> None:
    """Keep output clean: library progress bars and notices go away, our own progress and errors stay."""
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    gguf_utils.tqdm = partial(tqdm, disable=True)  # the GGUF loader's own bar, which the switch above does not reach
    logging.getLogger("transformers").setLevel(logging.ERROR)
    # k-means over fewer distinct visual tokens than k still gives k rows (kmeans_init); other warnings still show
    warnings.filterwarnings("ignore", category=ConvergenceWarning)


def _fail(exc: Exception) -> None:
    err.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True, highlight=False)
    raise typer.Exit(code=2)


API_KEY_HELP = (
    "Require a key on every route but /health: KEY (every bank) or KEY=bank1,bank2 (those banks only); "
    "give it several times for several keys."
)
PROMPT_CACHES_HELP = "How many banks, of those used last, keep their prompt cache (0: none)."
INTRODUCE_HELP = (
    "all: the system text introduces every concept; relevant: only those the question names or the photo "
    "shows (shorter prompts for large banks). Default: as the bank was trained."
)
JOINT_HELP = (
    "Ask 'are <a> and <b> both in this photo?' as one question; by default each concept is asked about on its "
    "own and the answer is Yes only if all are there."
)
FREE_CAPTIONS_HELP = (
    "Let the model choose which names a caption says ('Describe this photo.'); by default each concept "
    "is asked about on its own first and the caption starts with the names of those found."
)
GENERATE_CHOICES_HELP = (
    "Let the model write a multiple-choice answer itself; by default it ranks the offered options (each one's "
    "text scored as the answer) and the reply is the best one's letter."
)


def _introduce(value: str | None) -> str | None:
    if value not in (None, "all", "relevant"):
        _fail(ValueError(f"--introduce must be all or relevant, not {value!r}"))
    return value


@app.command()
def personalize(
    concepts_dir: Path = typer.Argument(..., help="Folder with one sub-folder per concept (see README)."),
    base: Optional[str] = typer.Option(
        None,
        "--base",
        help="HF id, local folder (save_pretrained), or 'proving-ground'. Default with --extend: the bank's.",
    ),
    out: Path = typer.Option(..., "--out", help="Where to write the concept bank (a folder)."),
    extend: Optional[Path] = typer.Option(
        None,
        "--extend",
        help="A trained bank to add CONCEPTS_DIR's concepts to: only theirs train; the bank's rows stay as they are.",
    ),
    concepts_of_bank: Optional[Path] = typer.Option(
        None,
        "--concepts-of-bank",
        help="With --extend: the bank's concept folder; its photos are the new concepts' negatives.",
    ),
    k: Optional[int] = typer.Option(
        None, "--k", min=1, help="Soft tokens per concept. Default: 16 (6 on proving-ground; the bank's with --extend)."
    ),
    epochs: Optional[int] = typer.Option(
        None, "--epochs", min=1, help="Default: 8 (fast) or 15 (paper); 10 on proving-ground."
    ),
    lr: Optional[float] = typer.Option(None, "--lr", help="Default: 1e-3 (1e-2 on proving-ground)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Default: 8 (fast) or 1 (paper)."),
    init: str = typer.Option("kmeans", "--init", help="kmeans | random"),
    recipe: str = typer.Option("fast", "--recipe", help="fast | paper (the MC-LLaVA code's choices, for comparison)"),
    negatives: Optional[Path] = typer.Option(
        None, "--negatives", help="Optional folder of generic images without any concept."
    ),
    hard_negatives: Optional[int] = typer.Option(
        None,
        "--hard-negatives",
        min=0,
        help="Per concept, mine this many of the --negatives that look most like it; half of its negatives come from them.",
    ),
    group_pairs: Optional[int] = typer.Option(
        None,
        "--group-pairs",
        min=0,
        help="Per group photo and epoch, this many 'are A and B both here?' Yes/No pairs (the later No's on photos of one of them alone). Default: 1.",
    ),
    open_answers: Optional[int] = typer.Option(
        None,
        "--open-answers",
        min=0,
        help="Per concept and epoch, this many answers to open questions about its photos ('What is <c> doing?'), written by the base from the concepts' descriptions before training. Default: 0.",
    ),
    text: Optional[int] = typer.Option(
        None,
        "--text",
        min=0,
        help="Per concept and epoch, this many text-only questions from its description and facts (concept.yaml). Default: all (none on proving-ground).",
    ),
    captions: Optional[int] = typer.Option(
        None,
        "--captions",
        min=0,
        help="Per concept and epoch, this many 'Describe this photo.' answers naming it, written by the base from the concepts' descriptions before training. Default: 0 (1 on proving-ground).",
    ),
    holdout: int = typer.Option(1, "--holdout", min=0, help="Images per concept held out for the per-epoch check."),
    introduce: Optional[str] = typer.Option(
        None,
        "--introduce",
        help="all | relevant: which concepts each training sample's system text introduces (see ask). Default: all (the bank's with --extend).",
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its last epoch checkpoint."),
    seed: int = typer.Option(0, "--seed"),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Train one concept bank for every concept in CONCEPTS_DIR, jointly (or add them to a bank with --extend)."""
    if init not in ("kmeans", "random"):
        _fail(ValueError(f"--init must be kmeans or random, not {init!r}"))
    if recipe not in ("fast", "paper"):
        _fail(ValueError(f"--recipe must be fast or paper, not {recipe!r}"))
    if concepts_of_bank is not None and extend is None:
        _fail(ValueError("--concepts-of-bank goes with --extend BANK"))
    try:
        old = ConceptBank.load(extend) if extend is not None else None
        if old is not None:  # the bank decides what its new rows must match (a local base path only with --base)
            base, k, introduce = old.base_to_load(base), k or old.k, introduce or old.recipe.get("introduce", "all")
    except McLlavaError as exc:
        _fail(exc)
    if base is None:
        _fail(ValueError("--base is required (or --extend BANK, whose base is used)"))
    introduce = _introduce(introduce) or "all"
    overrides = {
        k_: v for k_, v in {"k": k, "epochs": epochs, "lr": lr, "batch_size": batch_size}.items() if v is not None
    }
    common = {"init": init, "seed": seed, "holdout": holdout, "introduce": introduce, **overrides}
    if base == proving_base.NAME:  # the recipe measured on that base (short "Yes"/"No" answers, k = one slot row)
        paper = {"recipe": "paper", "batch_size": 1, "epochs": 15} if recipe == "paper" else {}
        config = presets.proving_ground(**{**paper, **common})
    else:
        config = presets.paper(**common) if recipe == "paper" else TrainConfig(**common)
    if hard_negatives is not None:
        config.data = replace(config.data, hard_negatives=hard_negatives)
    if group_pairs is not None:
        config.data = replace(config.data, group_pairs=group_pairs)
    if captions is not None:
        config.data = replace(config.data, captions=captions)
    if text is not None:
        config.data = replace(config.data, text=text > 0, text_per_concept=text)
    if open_answers is not None:
        config.data = replace(config.data, open_answers=open_answers)
    try:
        backbone = Backbone.load(base)
        concept_set = ConceptSet.load(concepts_dir, tokenizer=backbone.tokenizer)
        old_set = (
            ConceptSet.load(concepts_of_bank, tokenizer=backbone.tokenizer) if concepts_of_bank is not None else None
        )
        result = personalize_concepts(
            concept_set,
            backbone,
            out,
            config,
            negatives=negatives,
            resume=resume,
            progress=not quiet,
            log=console.print,
            extend=old,
            extend_concepts=old_set,
        )
    except (McLlavaError, OSError) as exc:
        _fail(exc)
    last = result.history[-1] if result.history else {}
    added = f" ({len(concept_set)} added to {len(old.concept_ids)} of {extend})" if old is not None else ""
    console.print(
        f"[green]saved[/] {out} ({len(result.bank.concept_ids)} concepts{added}, k={config.k}); final loss {last.get('loss', float('nan')):.4f}"
    )


@app.command()
def ask(
    bank: Path = typer.Argument(..., help="A concept bank folder."),
    question: str = typer.Argument(..., help="The question; name concepts as <id>."),
    image: Optional[Path] = typer.Option(None, "--image", help="Photo to ask about."),
    no_visual_prompt: bool = typer.Option(False, "--no-visual-prompt", help="Do not draw location marks."),
    introduce: Optional[str] = typer.Option(None, "--introduce", help=INTRODUCE_HELP),
    joint: bool = typer.Option(False, "--joint", help=JOINT_HELP),
    free_captions: bool = typer.Option(False, "--free-captions", help=FREE_CAPTIONS_HELP),
    generate_choices: bool = typer.Option(False, "--generate-choices", help=GENERATE_CHOICES_HELP),
    marks: Optional[Path] = typer.Option(None, "--marks", help="Save the marked photo here (PNG)."),
    base: Optional[str] = typer.Option(None, "--base", help="Override the base model the bank remembers."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON with the answer, marks and locations."),
) -> None:
    """Answer a question about a photo (or about the concepts alone)."""
    try:
        pil = load_image(image) if image else None
        assistant = PersonalAssistant.load(
            bank,
            base,
            introduce=_introduce(introduce),
            joint=joint,
            free_captions=free_captions,
            generate_choices=generate_choices,
        )
        result = assistant.respond(pil, question, visual_prompt=not no_visual_prompt)
    except (McLlavaError, OSError) as exc:
        _fail(exc)
    if marks is not None and result.marked_image is not None:
        result.marked_image.save(marks)
    if as_json:
        payload = {
            "answer": result.text,
            "marks": {str(n): c for n, c in result.marks.items()},
            "parts": result.parts,
            "locations": [
                {
                    "concept": loc.concept_id,
                    "score": loc.score,
                    "present": loc.present,
                    "peak": loc.peak,
                    "box": loc.box,
                }
                for loc in result.locations
            ],
        }
        sys.stdout.write(json.dumps(payload) + "\n")
    else:
        sys.stdout.write(result.text + "\n")


METHOD_HELP = (
    "bank: the personalised bank (first argument) answers every question; retrieval: the training-free arm "
    "(first argument: the concept folder; needs --base) answers the recognition questions by visual "
    "similarity to the concepts' masked training photos, thresholds from training photos only."
)
PROMPTS_HELP = "ours: our wording; official: the MC-LLaVA code's wording ('Can you see <c> in this photo? ...')."


def _answerer(target: Path, method: str, base: str | None, negatives: Path | None, opts: dict):
    """The model that answers: the bank's assistant, or the retrieval arm fitted on the concept folder."""
    if method == "retrieval":
        if base is None:
            raise McLlavaError("--method retrieval needs --base (the model whose visual tokens it compares)")
        if (target / "manifest.json").is_file():
            raise McLlavaError(f"{target} is a bank; --method retrieval takes the concept folder instead")
        return RetrievalArm.fit(Backbone.load(base), ConceptSet.load(target), negatives)
    if method != "bank":
        raise McLlavaError(f"--method must be bank or retrieval, not {method!r}")
    assistant = PersonalAssistant.load(
        target,
        base,
        introduce=_introduce(opts["introduce"]),
        joint=opts["joint"],
        free_captions=opts["free_captions"],
        generate_choices=opts["generate_choices"],
        cache_size=EVAL_CACHE_SIZE,
    )
    return AssistantAnswerer(assistant, visual_prompt=not opts["no_visual_prompt"], keep_marks=opts["html"])


@app.command("eval")
def evaluate_cmd(
    bank: Path = typer.Argument(..., help="A concept bank folder (with --method retrieval: the concept folder)."),
    tests: Path = typer.Argument(..., help="tests.jsonl, or an MC-LLaVA / Yo'LLaVA release folder."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the report as JSON here."),
    html: Optional[Path] = typer.Option(None, "--html", help="Write a browsable HTML report into this folder."),
    method: str = typer.Option("bank", "--method", help=METHOD_HELP),
    prompts: str = typer.Option("ours", "--prompts", help=PROMPTS_HELP),
    negatives: Optional[Path] = typer.Option(
        None,
        "--negatives",
        help="--method retrieval: generic photos without any concept, as extra negatives for its thresholds.",
    ),
    mcllava_labels: str = typer.Option(
        "official",
        "--mcllava-labels",
        help="MC-LLaVA release folders: 'official' labels every concept of a group photo present, as its code does; 'positions' says No where position.json marks the concept null.",
    ),
    no_visual_prompt: bool = typer.Option(False, "--no-visual-prompt"),
    introduce: Optional[str] = typer.Option(None, "--introduce", help=INTRODUCE_HELP),
    joint: bool = typer.Option(False, "--joint", help=JOINT_HELP),
    free_captions: bool = typer.Option(False, "--free-captions", help=FREE_CAPTIONS_HELP),
    generate_choices: bool = typer.Option(False, "--generate-choices", help=GENERATE_CHOICES_HELP),
    base: Optional[str] = typer.Option(None, "--base"),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Evaluate only the first N questions."),
    quiet: bool = typer.Option(False, "--quiet"),
) -> None:
    """Evaluate a bank (or the retrieval arm) on a test set: recognition, choice, VQA, caption and grounding, each
    scored the official way and our lenient way, per split and per scenario."""
    if prompts not in ("ours", "official"):
        _fail(ValueError(f"--prompts must be ours or official, not {prompts!r}"))
    try:
        records = read_any(tests, labels=mcllava_labels)
        if method == "retrieval":
            records = [r for r in records if r["task"] == "recognition"]
        if limit:
            records = records[:limit]
        opts = {
            "introduce": introduce,
            "joint": joint,
            "free_captions": free_captions,
            "generate_choices": generate_choices,
            "no_visual_prompt": no_visual_prompt,
            "html": html is not None,
        }
        answerer = _answerer(bank, method, base, negatives, opts)
        report = evaluate(records, answerer, progress=not quiet, prompts=prompts)
    except (McLlavaError, OSError, ValueError) as exc:
        _fail(exc)
    report["method"] = method
    if method == "retrieval":
        report["retrieval"] = answerer.summary()
    print_table(report, console)
    if method == "retrieval":
        console.print(
            f"retrieval arm: {report['retrieval']['seconds_per_photo'] or 0:.3f} s per photo, "
            f"fitted in {report['retrieval']['fit_seconds']:.1f} s, no training"
        )
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=2, default=str))
        tmp.replace(out)
        console.print(f"report written to {out}")
    if html:
        path = write_html(report, html, marked_images=getattr(answerer, "marked", {}))
        console.print(f"HTML report: {path}")


@app.command()
def info(bank: Path = typer.Argument(..., help="A concept bank folder.")) -> None:
    """Show what a bank holds: base model, concepts, k, size, recipe and training metrics."""
    try:
        b = ConceptBank.load(bank)
    except (McLlavaError, OSError) as exc:
        _fail(exc)
    console.print(
        f"[bold]{bank}[/]: {len(b.concept_ids)} concepts on base [cyan]{b.base_model}[/] (config {b.base_config_hash})"
    )
    console.print(
        f"k={b.k}, hidden size {b.hidden_size}, head {'tied' if b.tied_head else 'untied'}, {ConceptBank.size_bytes(bank) / 1024:.1f} KiB on disk"
    )
    table = Table("id", "name", "category", "tokens")
    for cid in b.concept_ids:
        d = b.display.get(cid) or {}
        table.add_row(cid, str(d.get("name") or cid), str(d.get("category") or ""), f"{b.k + 1}")
    console.print(table)
    hist = (b.metrics or {}).get("history") or []
    if hist:
        last = hist[-1]
        probe = last.get("probe", {}).get("weighted_accuracy")
        console.print(
            f"trained {last['epoch']} epochs; final loss {last['loss']:.4f}"
            + (f"; held-out recognition {probe:.3f}" if probe is not None else "")
        )


@app.command()
def serve(
    banks: list[Path] = typer.Argument(..., help="Concept bank folders, or folders of banks (all on one base model)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", min=1, max=65535),
    api_key: Optional[list[str]] = typer.Option(None, "--api-key", envvar="MCLLAVA_API_KEY", help=API_KEY_HELP),
    api_keys: Optional[Path] = typer.Option(
        None, "--api-keys", help="A file of keys: one KEY or KEY=bank1,bank2 a line."
    ),
    allowed_host: list[str] = typer.Option(
        [],
        "--allowed-host",
        help="Without --api-key, also answer requests naming this host "
        "(besides --host and loopback; '*': any). Repeatable.",
    ),
    concepts: Optional[Path] = typer.Option(None, "--concepts", help="Concept folder to take thumbnails from."),
    base: Optional[str] = typer.Option(
        None, "--base", help="Override the base model the banks remember (needed when one names a local path)."
    ),
    prompt_caches: int = typer.Option(8, "--prompt-caches", min=0, help=PROMPT_CACHES_HELP),
    joint: bool = typer.Option(False, "--joint", help=JOINT_HELP),
    free_captions: bool = typer.Option(False, "--free-captions", help=FREE_CAPTIONS_HELP),
    generate_choices: bool = typer.Option(False, "--generate-choices", help=GENERATE_CHOICES_HELP),
) -> None:
    """Serve the personalised model: OpenAI-compatible HTTP API and a web page (see docs/server.md). Several banks
    share one copy of the base model; a request's `model` (a bank's folder name) picks its bank."""
    if os.environ.get("MCLLAVA_API_KEY") == "" and not api_key:
        api_key = [""]  # an empty variable is a mistake, not "no key"
    try:
        from .server import create_app, run
        from .server.keys import KeyRing
    except ImportError as exc:
        _fail(McLlavaError(f"{exc.name} is missing: pip install 'mcllava[serve]'"))
    options = dict(joint=joint, free_captions=free_captions, generate_choices=generate_choices)
    try:
        keys = KeyRing.parse([*(api_key or []), *(KeyRing.read(api_keys) if api_keys else [])])
        folders = bank_folders(banks)
        if len(folders) == 1:  # one bank: served as always, under the id mcllava-<folder>, for any model name
            served = PersonalAssistant.load(next(iter(folders.values())), base, **options)
        else:
            served = SharedBase.load(folders.values(), base, prompt_caches=prompt_caches, **options)
        server_app = create_app(
            served, api_key=keys or None, concepts_dir=concepts, allowed_hosts=[host, *allowed_host]
        )
    except (McLlavaError, OSError) as exc:
        _fail(exc)
    if not keys and (host not in ("127.0.0.1", "localhost", "::1") or allowed_host):
        err.print(f"[yellow]warning:[/] serving on {host} without --api-key: anyone who can reach it can use it")
    if len(folders) > 1:
        console.print(f"serving {len(folders)} banks on one base: {', '.join(folders)}", highlight=False)
    run(server_app, host=host, port=port)


@app.command("export")
def export_cmd(
    bank: Path = typer.Argument(..., help="A concept bank folder."),
    out_dir: Path = typer.Argument(..., help="Where to write the Hugging Face checkpoint (a new folder)."),
    base: Optional[str] = typer.Option(None, "--base", help="Override the base model the bank remembers."),
) -> None:
    """Write base model + concepts as a standard HF checkpoint (vLLM, SGLang, TGI, transformers serve it as is)."""
    try:
        path = export(bank, out_dir, base)
    except (McLlavaError, OSError) as exc:
        _fail(exc)
    console.print(f"[green]exported[/] {path}: the concept introductions are the chat template's default system text")


app.add_typer(world_app, name="world", help="The proving ground: a procedural multi-concept world.")
app.add_typer(base_app, name="base", help="The proving ground: build and check the small offline base model.")

if __name__ == "__main__":
    app()
