"""Personalisation speed and answer latency on LLaVA-1.5-7B / 13B architectures, with random bf16 weights.

Not a test: a measurement to run once on a GPU. Real weights are not needed (speed does not depend on weight
values): each model is built from its published configuration (`shared/reference/llava-1.5-configs.json`, the
same values kept below), directly on the target device in bf16, with a 32002-entry llama-like tokenizer, and
freed before the next. For each model it measures

1. one personalisation step (`mcllava.train`'s pieces: concept tokens, `answer_loss`, AdamW):
   - fast recipe: batch 8 (`TrainConfig()`), only the concept rows trainable (PEFT trainable tokens), visual
     tokens cached once;
   - paper recipe: batch 1 (`presets.paper()`), the full embedding and head matrices in the optimizer with
     the other rows restored after each step, the vision tower run at every step;
   reporting wall time per step (median), tokens/s (real tokens of the batch, the 576 image tokens each
   included), trainable parameters and AdamW state, peak memory (CUDA: max_memory_allocated; CPU: the process's
   peak RSS, which never resets) and, on CUDA, the fraction of the GPU's dense bf16 peak (`PEAK_BF16` or
   `--peak-tflops`; FLOPs counted as `step_flops` documents: 4*P*T + attention, not 6*P*T, as frozen layers
   need no weight gradients);
2. the latency of one greedy answer of `--new-tokens` tokens (EOS suppressed so every answer has that length),
   vision tower included, for a plain answer, a personalised answer (system text introducing the concepts) and a
   personalised answer with the visual prompt (location maps, Set-of-Mark marks drawn, marked image re-embedded,
   "Mark n is <c>." added). Random weights locate nothing, so the marks are forced on every concept. With
   `--many N` (default 50) also a personalised answer with N concepts introduced, and one with only the concept
   the question names (`--introduce relevant`): what the prompt's growth costs on the real architecture.

On a GPU (a few minutes for both models; 13B's weights alone take 26 GB, so use an 80 GB card):

    python benchmarks/gpu_llava15.py --model 7b,13b --out benchmarks/out/gpu_llava15.json

Writes the JSON (configuration, device, every figure) and a PNG bar plot beside it (if matplotlib is installed).
`--text-layers`, `--vision-layers` and `--image-size` shrink the models for a smoke run on CPU (tests/test_gpu_bench.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import platform
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image

from mcllava import presets
from mcllava.backbone import Backbone
from mcllava.locate import draw_marks, locate, mark_prompt
from mcllava.tiny import llama_like_tokenizer
from mcllava.tokens import (
    ConceptTokens,
    add_concept_tokens,
    make_trainable,
    trained_rows,
    word_embedding_norm,
    write_rows,
)
from mcllava.train import TrainConfig
from mcllava.training_data import NO_ANSWERS, RECOGNITION_QUESTIONS, YES_ANSWERS, collate

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "llava-1.5-configs.json"
_VISION = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05,
}
_TEXT = {"vocab_size": 32064, "max_position_embeddings": 4096, "rms_norm_eps": 1e-05}
# Published values of llava-hf/llava-1.5-{7b,13b}-hf (used when shared/reference is not in this checkout).
PUBLISHED = {
    "7b": {
        "text_config": {
            **_TEXT,
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
        },
        "vision_config": _VISION,
    },
    "13b": {
        "text_config": {
            **_TEXT,
            "hidden_size": 5120,
            "intermediate_size": 13824,
            "num_hidden_layers": 40,
            "num_attention_heads": 40,
            "num_key_value_heads": 40,
        },
        "vision_config": _VISION,
    },
}
TOP = {
    "image_token_index": 32000,
    "pad_token_id": 32001,
    "projector_hidden_act": "gelu",
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
}
# Dense bf16 peak (no sparsity), FLOP/s, first matching substring of torch.cuda.get_device_name().
PEAK_BF16 = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
    ("L4", 121e12),
]
CONCEPTS = ["bo", "ana"]


def published_config(model: str) -> dict:
    """The published text and vision configuration of `model` ('7b' or '13b')."""
    if REFERENCE.exists():
        ref = json.loads(REFERENCE.read_text())
        base, own = ref["llava-1.5-7b"], ref[f"llava-1.5-{model}"]
        cfg = {
            "text_config": dict(own.get("text_config", base["text_config"])),
            "vision_config": dict(base["vision_config"]),
        }
    else:
        cfg = json.loads(json.dumps(PUBLISHED[model]))
    for part in cfg.values():
        part.pop("model_type", None)
    return cfg


def build_llava15(
    model: str,
    device: torch.device,
    text_layers: int | None = None,
    vision_layers: int | None = None,
    image_size: int | None = None,
) -> tuple[Backbone, dict]:
    """A LLaVA-1.5 `model` ('7b'/'13b') with random bf16 weights built on `device`, and the configuration used."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    cfg = published_config(model)
    text, vision = cfg["text_config"], cfg["vision_config"]
    if text_layers is not None:
        text["num_hidden_layers"] = text_layers
    if vision_layers is not None:
        vision["num_hidden_layers"] = vision_layers
    if image_size is not None:
        vision["image_size"] = image_size
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=LlamaConfig(**text, tie_word_embeddings=False),
        tie_word_embeddings=False,
        **TOP,
    )
    from transformers.initialization import no_init_weights

    before = torch.get_default_dtype()
    torch.manual_seed(0)
    try:
        torch.set_default_dtype(torch.bfloat16)
        with torch.device(device), no_init_weights():  # one random fill below instead of torch's then HF's
            net = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(before)
    with torch.no_grad():
        for module in net.modules():
            norm = isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")
            for name, p in module.named_parameters(recurse=False):
                if name == "bias":
                    p.zero_()
                elif norm:
                    p.fill_(1.0)
                else:  # std 0.02 like HF's init; uniform is cheaper than normal on CPU
                    p.uniform_(-0.02 * 3**0.5, 0.02 * 3**0.5)
    side = vision["image_size"]
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}),
        tokenizer=llama_like_tokenizer(),
        patch_size=vision["patch_size"],
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return Backbone(net, processor, f"llava-1.5-{model}-random"), cfg


# ------------------------------------------------------------------------------------------------ measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict:
    """CUDA: max_memory_allocated since the last reset. CPU: the process's peak RSS so far (never resets)."""
    if device.type == "cuda":
        return {"peak_bytes": torch.cuda.max_memory_allocated(device), "kind": "cuda_max_memory_allocated"}
    return {"peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "kind": "process_peak_rss"}


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def step_flops(backbone: Backbone, mask: torch.Tensor, n_answer: int, recipe: str) -> float:
    """FLOPs of one personalisation step (fwd + bwd), counted on real (unpadded) tokens.

    Decoder, P = decoder-layer parameters, T = tokens, L layers, D width, n = each sequence's length:
      forward 2*P*T + attention 4*L*D*sum(n^2) (QK^T and AV, not halved for causality, as PaLM's count);
      backward of frozen layers computes input gradients only: 2*P*T for the matmuls + 2x the attention forward
      -> 4*P*T + 12*L*D*sum(n^2).
    LM head on answer positions only (A of them, vocabulary V): 6*V*D*A (forward, input grad, weight grad).
    Paper recipe only: the vision tower's forward at every step (Pv params, Tv = 577 tokens per image, Lv, Dv)
      2*Pv*Tv + 4*Lv*Dv*Tv^2 per image, plus the projector's 2*Pp*576 per image.
    """
    cfg, lm = backbone.model.config, backbone.model.model.language_model
    lens = mask.sum(1).double()
    tokens, sq = float(lens.sum()), float((lens**2).sum())
    L, D = cfg.text_config.num_hidden_layers, cfg.text_config.hidden_size
    flops = 4 * _params(lm.layers) * tokens + 12 * L * D * sq + 6 * cfg.text_config.vocab_size * D * n_answer
    if recipe == "paper":
        v = cfg.vision_config
        tv = (v.image_size // v.patch_size) ** 2 + 1
        per_image = (
            2 * _params(backbone.model.model.vision_tower) * tv + 4 * v.num_hidden_layers * v.hidden_size * tv**2
        )
        per_image += 2 * _params(backbone.model.model.multi_modal_projector) * (tv - 1)
        flops += per_image * mask.shape[0]
    return flops


def _image(seed: int, size: tuple[int, int] = (500, 400)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _batch(backbone: Backbone, tokens: ConceptTokens, n: int):
    system = tokens.system_text()
    encoded = []
    for i in range(n):
        c = tokens.token(CONCEPTS[i % len(CONCEPTS)])
        answer = (YES_ANSWERS if i % 2 == 0 else NO_ANSWERS)[i % 7].format(c=c)
        encoded.append(
            backbone.encode(backbone.format_prompt(RECOGNITION_QUESTIONS[i].format(c=c), system=system), answer)
        )
    batch = collate(encoded, [None] * n, backbone.tokenizer.pad_token_id)
    dev = backbone.device
    return batch.input_ids.to(dev), batch.attention_mask.to(dev), batch.labels.to(dev)


def train_steps(
    backbone: Backbone, tokens: ConceptTokens, config: TrainConfig, steps: int, warmup: int, peak: float | None
) -> dict:
    """Time `steps` personalisation steps of `config.recipe`, as `mcllava.train.personalize` takes them."""
    model, dev = backbone.model, backbone.device
    ids, mask, labels = _batch(backbone, tokens, config.batch_size)
    images = [_image(i) for i in range(config.batch_size)]
    _reset_peak(dev)
    if config.recipe == "fast":
        params = make_trainable(model, tokens)
        cache = backbone.visual_tokens(images).features  # the training loop embeds each image once

        def features() -> torch.Tensor:
            return cache
    else:
        params = list(dict.fromkeys([model.get_input_embeddings().weight, model.get_output_embeddings().weight]))
        for p in params:
            p.requires_grad_(True)
        index = torch.tensor(tokens.all_ids, device=dev)
        originals = [p.detach().clone() for p in params]

        def features() -> torch.Tensor:  # the vision tower at every step
            return backbone.visual_tokens(images).features

    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    times, losses = [], []
    for step in range(warmup + steps):
        _sync(dev)
        t0 = time.perf_counter()
        loss = backbone.answer_loss(ids, mask, labels, features())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if config.recipe == "paper":
            with torch.no_grad():
                for p, orig in zip(params, originals):
                    keep = p[index].clone()
                    p.copy_(orig)
                    p[index] = keep
        losses.append(loss.item())  # synchronises, as the training loop does
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    n_tokens = int(mask.sum())
    n_answer = int((labels[:, 1:] != -100).sum())
    flops = step_flops(backbone, mask, n_answer, config.recipe)
    state = sum(
        t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)
    )
    out = {
        "batch_size": config.batch_size,
        "steps": steps,
        "warmup": warmup,
        "step_s": step_s,
        "step_s_all": times,
        "seconds_per_sample": step_s / config.batch_size,
        "tokens_per_step": n_tokens,
        "answer_tokens_per_step": n_answer,
        "tokens_per_s": n_tokens / step_s,
        "loss": losses[-1],
        "trainable_parameters": sum(p.numel() for p in params),
        "optimizer_state_bytes": state,
        "flops_per_step": flops,
        "achieved_tflops": flops / step_s / 1e12,
        "fraction_of_peak": flops / step_s / peak if peak else None,
        **peak_memory(dev),
    }
    for p in params:
        p.grad = None
    if config.recipe == "paper":
        for p in params:
            p.requires_grad_(False)
    return out


class _Clock:
    """A `generate` streamer that only notes when each new token reaches the host."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        if value.numel():  # the first call carries the (empty) prompt ids: generation starts from embeddings
            self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.no_grad()
def _generate(backbone: Backbone, prompt: str, features: torch.Tensor, n: int, clock: _Clock) -> int:
    """`Backbone.generate`'s path with exactly `n` new tokens (EOS suppressed); returns the prompt length."""
    ids = torch.tensor([backbone.encode(prompt).input_ids], device=backbone.device)
    backbone.model.generate(
        inputs_embeds=backbone.embed(ids, features[None]),
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=backbone.tokenizer.pad_token_id,
        eos_token_id=backbone.tokenizer.eos_token_id,
        streamer=clock,
    )
    return ids.shape[1]


def answer_latency(
    backbone: Backbone, tokens: ConceptTokens, new_tokens: int, repeats: int, warmup: int, many: int = 0
) -> dict:
    """Latency of plain, personalised and visual-prompt answers, following `PersonalAssistant.respond`.

    With `many` > 0 also a personalised answer whose system text introduces `many` concepts (benchmark 4's plain
    method at that scale; the bank's introductions repeated, which gives the prompt exactly the length of `many`
    distinct ones, and speed does not depend on which rows are read) and one introducing only the concept the
    question names (the `--introduce relevant` remedy).
    answer_s: from the photo to the last token (vision tower, locating and marks included); first_token_s: to the
    first new token (the prompt's cost); per_token_s: each further token. Medians of `repeats` answers.
    """
    image = _image(99)
    refs = {cid: rows[1:] for cid, rows in zip(tokens.concept_ids, trained_rows(backbone.model, tokens)[0])}
    gh, gw = backbone.grid
    question = "What is <bo> doing in this photo?"

    def plain(clock: _Clock) -> dict:
        feats = backbone.visual_tokens([image]).features[0]
        return {
            "prompt_tokens": _generate(
                backbone, backbone.format_prompt("What is the person doing in this photo?"), feats, new_tokens, clock
            )
        }

    def introducing(cids: list[str]) -> Callable[[_Clock], dict]:
        """A personalised answer whose system text introduces `cids`."""

        def answer(clock: _Clock) -> dict:
            feats = backbone.visual_tokens([image]).features[0]
            return {
                "prompt_tokens": _generate(
                    backbone, backbone.format_prompt(question, tokens.system_text(cids)), feats, new_tokens, clock
                ),
                "concepts_introduced": len(cids),
            }

        return answer

    def visual_prompt(clock: _Clock) -> dict:
        feats = backbone.visual_tokens([image]).features[0]
        found = locate(feats[-gh * gw :].float().cpu(), refs, (gh, gw), image.size)
        forced = not any(loc.present for loc in found)
        if forced:  # random weights: mark every concept so that the marked path is what is timed
            found = [dataclasses.replace(loc, present=True) for loc in found]
        marked, marks = draw_marks(image, found)
        feats = backbone.visual_tokens([marked]).features[0]
        prompt = backbone.format_prompt(question, tokens.system_text(extra=mark_prompt(marks, tokens.token)))
        return {
            "prompt_tokens": _generate(backbone, prompt, feats, new_tokens, clock),
            "marks": len(marks),
            "marks_forced": forced,
        }

    kinds = [("plain", plain), ("personalised", introducing(tokens.concept_ids)), ("visual_prompt", visual_prompt)]
    if many:
        ids = tokens.concept_ids
        kinds += [
            (f"personalised_{many}", introducing([ids[i % len(ids)] for i in range(many)])),
            ("personalised_relevant", introducing(tokens.relevant(question))),
        ]
    for _ in range(warmup):  # kernels, caches
        for _, fn in kinds:
            fn(_Clock())
    info: dict[str, dict] = {}
    runs: dict[str, list[dict]] = {name: [] for name, _ in kinds}
    for _ in range(repeats):  # round robin, so that drift in clocks or host load falls on every kind alike
        for name, fn in kinds:
            clock = _Clock()
            _reset_peak(backbone.device)
            _sync(backbone.device)
            t0 = time.perf_counter()
            info[name] = fn(clock)
            _sync(backbone.device)
            end = time.perf_counter()
            assert len(clock.times) == new_tokens, "generate stopped early"
            runs[name].append(
                {
                    "answer_s": end - t0,
                    "first_token_s": clock.times[0] - t0,
                    "per_token_s": (clock.times[-1] - clock.times[0]) / (new_tokens - 1),
                    "peak_bytes": peak_memory(backbone.device)["peak_bytes"],
                }
            )
    out = {}
    for name, rs in runs.items():
        medians = {key: statistics.median(r[key] for r in rs) for key in ("answer_s", "first_token_s", "per_token_s")}
        out[name] = {
            **info[name],
            "new_tokens": new_tokens,
            **medians,
            "peak_bytes": max(r["peak_bytes"] for r in rs),
            "kind": peak_memory(backbone.device)["kind"],
        }
    return out


def measure_model(model: str, args: argparse.Namespace, device: torch.device, peak: float | None) -> dict:
    """Build one model, time its answers and both recipes' steps, then free it."""
    t0 = time.perf_counter()
    backbone, cfg = build_llava15(model, device, args.text_layers, args.vision_layers, args.image_size)
    build_s = time.perf_counter() - t0
    n_ordinary = len(backbone.tokenizer)
    fast, paper = TrainConfig(), presets.paper()
    tokens = add_concept_tokens(backbone.model, backbone.tokenizer, CONCEPTS, fast.k)
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(len(CONCEPTS), fast.k + 1, backbone.hidden_size, generator=g)
    write_rows(
        backbone.model, tokens, rows / rows.norm(dim=-1, keepdim=True) * word_embedding_norm(backbone.model, n_ordinary)
    )
    result = {
        "config": cfg,
        "parameters": _params(backbone.model),
        "parameters_language_layers": _params(backbone.model.model.language_model.layers),
        "build_s": build_s,
        "memory_after_build": peak_memory(device),
        "answer": answer_latency(backbone, tokens, args.new_tokens, args.repeats, args.warmup, args.many),
        # paper first: it trains plain weights; the fast recipe then wraps the layers in PEFT for good
        "train": {
            "paper": train_steps(backbone, tokens, paper, args.steps, args.warmup, peak),
            "fast": train_steps(backbone, tokens, fast, args.steps, args.warmup, peak),
        },
    }
    del backbone, tokens
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def plot(results: dict, path: Path) -> bool:
    """Bar plots of step time per sample, time to the first answer token and whole-answer latency per model; False
    (with a note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (the JSON has every figure)")
        return False
    models = list(results["models"])
    fig, (a, *latency) = plt.subplots(1, 3, figsize=(14, 4.5))
    x = np.arange(len(models))
    for i, recipe in enumerate(("fast", "paper")):
        a.bar(
            x + (i - 0.5) * 0.35,
            [results["models"][m]["train"][recipe]["seconds_per_sample"] for m in models],
            0.35,
            label=recipe,
        )
    a.set(xticks=x, xticklabels=models, ylabel="seconds per training sample", title="personalisation step")
    a.legend(fontsize=8)
    kinds = list(results["models"][models[0]]["answer"])
    w = 0.8 / len(kinds)
    titles = {
        "first_token_s": "to the first answer token",
        "answer_s": f"whole answer ({results['config']['new_tokens']} new tokens)",
    }
    for ax, (key, title) in zip(latency, titles.items()):
        for i, kind in enumerate(kinds):
            ax.bar(
                x + (i - (len(kinds) - 1) / 2) * w,
                [results["models"][m]["answer"][kind][key] for m in models],
                w,
                label=kind,
            )
        ax.set(xticks=x, xticklabels=models, ylabel="seconds", title=title)
    latency[0].legend(fontsize=8, loc="upper left")
    fig.suptitle(f"LLaVA-1.5, random bf16 weights, {results['device']['name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="7b,13b", help="comma-separated: 7b, 13b")
    ap.add_argument("--text-layers", type=int, default=None, help="truncate the language model (default: full depth)")
    ap.add_argument("--vision-layers", type=int, default=None, help="truncate the vision tower (default: full depth)")
    ap.add_argument(
        "--image-size", type=int, default=None, help="vision input side, a multiple of 14 (default: 336, 576 tokens)"
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=5, help="timed training steps per recipe (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed training steps (and answers) first")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="answers per kind (median reported)")
    ap.add_argument(
        "--many", type=int, default=50, help="also time answers with this many concepts introduced (0: skip)"
    )
    ap.add_argument(
        "--peak-tflops", type=float, default=None, help="bf16 peak of the device (default: from a table for known GPUs)"
    )
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "gpu_llava15.json")
    args = ap.parse_args(argv)
    bad = [m for m in args.model.split(",") if m not in PUBLISHED]
    if bad:
        ap.error(f"unknown model(s) {bad}; choose from {sorted(PUBLISHED)}")
    if args.image_size is not None and (args.image_size <= 0 or args.image_size % 14):
        ap.error("--image-size must be a positive multiple of the patch size, 14")
    if args.steps < 1 or args.repeats < 1 or args.new_tokens < 2 or args.warmup < 0 or args.many < 0:
        ap.error("--steps and --repeats must be >= 1, --new-tokens >= 2, --warmup and --many >= 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        known = next((v for k, v in PEAK_BF16 if k in name), None)
    else:
        name, known = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)", None
    peak = args.peak_tflops * 1e12 if args.peak_tflops else known
    results = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "device": {"type": device.type, "name": name, "peak_bf16_flops": peak},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "models": {},
    }
    for model in args.model.split(","):
        print(f"measuring llava-1.5-{model} on {name} ...", flush=True)
        results["models"][model] = measure_model(model, args, device, peak)
        m = results["models"][model]
        for recipe, r in m["train"].items():
            frac = f", {r['fraction_of_peak']:.1%} of peak" if r["fraction_of_peak"] else ""
            print(
                f"  {recipe:5s} batch {r['batch_size']}: {r['step_s']:.3f} s/step, {r['tokens_per_s']:.0f} tok/s, "
                f"peak {r['peak_bytes'] / 2**30:.1f} GiB{frac}"
            )
        for kind, r in m["answer"].items():
            print(f"  {kind:13s}: {r['answer_s']:.3f} s ({r['prompt_tokens']} prompt + {r['new_tokens']} new tokens)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    results["plot"] = str(args.out.with_suffix(".png")) if plot(results, args.out.with_suffix(".png")) else None
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
