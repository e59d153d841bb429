"""The frozen base model: loading, visual tokens and the one chat formatter.

Everything that touches the base vision-language model goes through `Backbone`: training, inference and
evaluation all build prompts with `Backbone.encode` and embed images with `Backbone.embed`, so the three
can never disagree about where the image tokens sit or how a turn is closed.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoProcessor,
    DynamicCache,
    LlavaForConditionalGeneration,
    LogitsProcessorList,
)

from .bases import CUSTOM_BASES, is_custom_base, register_base  # noqa: F401  (the last two: importable here too)
from .errors import McLlavaError
from .generation import PromptCache, SuppressIds, cache_kwarg
from .layout import layout_for
from .training_data import collate

SUPPORTED_ARCHITECTURES = ("LlavaForConditionalGeneration",)
MAX_ASPECT = 4.0  # longer side / shorter side handed to the image processor (see `Backbone.pixel_values`)

# Used when a processor carries no chat template: the LLaVA-1.5 conversation format.
FALLBACK_FORMAT = "{system}USER: <image>\n{question} ASSISTANT:"

# A batch's common leading tokens (the chat template's start and the system text that introduces every concept)
# run once instead of once per row when there are at least this many of them (see `Backbone.hidden_states`).
MIN_SHARED_PREFIX = 16

# Private-use characters that fence control-token text of a user's question inside a formatted prompt:
# `encode` tokenises fenced text as plain text, so a question cannot open or close chat turns.
FENCE_OPEN, FENCE_CLOSE = "\ue000", "\ue001"
_FENCED = re.compile(f"{FENCE_OPEN}(.*?){FENCE_CLOSE}", re.S)


class UnsupportedModelError(McLlavaError, ValueError):
    """The checkpoint is not of a model family that mcllava can personalise."""


@dataclass
class VisualTokens:
    """Projected visual tokens of a batch of images, as the language model sees them.

    features: [B, N, D] tokens fed to the language model (N includes a CLS token for the "full" strategy).
    grid: (gh, gw) patch grid; the last gh*gw tokens of each image are the patches, row-major.
    coverage: [B, gh*gw] fraction of each patch inside the mask (1.0 everywhere without a mask).
    """

    features: torch.Tensor
    grid: tuple[int, int]
    coverage: torch.Tensor

    @property
    def patches(self) -> torch.Tensor:
        gh, gw = self.grid
        return self.features[:, -gh * gw :]


@dataclass
class Encoded:
    """A tokenised turn: input ids with the image placeholder expanded, and labels on the answer only."""

    input_ids: list[int]
    labels: list[int]
    has_image: bool


def _check_architecture(config) -> None:
    archs = list(getattr(config, "architectures", None) or [])
    model_type = getattr(config, "model_type", "")
    if model_type == "llava" or "LlavaForConditionalGeneration" in archs:
        return
    raise UnsupportedModelError(
        f"unsupported model family {archs or model_type!r}: mcllava supports {', '.join(SUPPORTED_ARCHITECTURES)} "
        "(the LLaVA-1.5 layout, e.g. llava-hf/llava-1.5-7b-hf). LLaVA-NeXT and LLaVA-OneVision tile images into a "
        "variable number of tokens and are not supported yet."
    )


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU (where bf16 matmuls are slow on many chips)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def bounded_aspect(image: Image.Image, ratio: float = MAX_ASPECT) -> Image.Image:
    """`image`, or its centred middle part of aspect `ratio` where it is longer than that (see `pixel_values`)."""
    w, h = image.size
    if max(w, h) <= ratio * min(w, h):
        return image
    if w > h:
        keep = max(1, round(ratio * h))
        return image.crop(((w - keep) // 2, 0, (w - keep) // 2 + keep, h))
    keep = max(1, round(ratio * w))
    return image.crop((0, (h - keep) // 2, w, (h - keep) // 2 + keep))


class Backbone:
    """A frozen LLaVA-family model with its processor, and the prompt/visual-token plumbing around it."""

    def __init__(self, model, processor, name: str):
        _check_architecture(model.config)
        self.model = model
        self.processor = processor
        self.name = name
        self.model.requires_grad_(False)
        self.model.eval()
        cfg = model.config
        self.image_token_id: int = cfg.image_token_id if hasattr(cfg, "image_token_id") else cfg.image_token_index
        self.image_token: str = getattr(processor, "image_token", "<image>")
        vcfg = cfg.vision_config
        side = vcfg.image_size // vcfg.patch_size
        self.grid: tuple[int, int] = (side, side)
        self.layout = layout_for(cfg, self.grid)  # which tokens show a mask; where a token map lies in the image
        self.strategy: str = cfg.vision_feature_select_strategy
        self.prompt_cache = PromptCache()  # `generate` reuses the key-value cache of a prefix prompts share
        self.num_image_tokens: int = side * side + (1 if self.strategy == "full" else 0)
        self.image_size: int = vcfg.image_size

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls, name_or_path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device | None = None
    ) -> Backbone:
        """Load a base model and processor by Hugging Face id, local folder, or `proving-ground` (the committed
        weights; a folder that `mcllava base build` exported loads the same way, by its path).

        Weights go to the GPU when there is one (`accelerate` places them, spilling to CPU if they do not fit).
        """
        name = str(name_or_path)
        for claims, load in CUSTOM_BASES:
            if claims(name):
                model, processor = load(name)
                return cls(model, processor, name)
        try:
            config = AutoConfig.from_pretrained(name)
            _check_architecture(config)
            device = torch.device(device) if device is not None else default_device()
            dtype = dtype or default_dtype(device)
            kwargs = {"dtype": dtype}
            if device.type == "cuda":
                kwargs["device_map"] = "auto"  # accelerate: fill the GPU(s), offload the rest
            model = LlavaForConditionalGeneration.from_pretrained(name, **kwargs)
            if device.type != "cuda":
                model.to(device)
            processor = AutoProcessor.from_pretrained(name)
        except (OSError, ValueError, pickle.UnpicklingError) as exc:
            if isinstance(exc, McLlavaError):
                raise
            raise McLlavaError(f"cannot load base model {name!r}: {str(exc).splitlines()[0][:300]}") from exc
        return cls(model, processor, name)

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def hidden_size(self) -> int:
        return self.model.config.text_config.hidden_size

    # ------------------------------------------------------------------ images
    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Images -> normalised pixel tensor [B, 3, H, W] in the processor's geometry (resize + centre crop).

        A photo more than `MAX_ASPECT` times longer than wide is first cut to its middle part of that shape: the
        processor stretches the short side to the model's input size, so a thin 8x150000 strip would become
        hundreds of millions of pixels (gigabytes) only for the centre crop to keep a square of them.
        """
        out = self.processor.image_processor([bounded_aspect(im.convert("RGB")) for im in images], return_tensors="pt")
        return out["pixel_values"]

    def mask_coverage(self, masks: Sequence[np.ndarray | None], images: Sequence[Image.Image]) -> torch.Tensor:
        """Share of each image token showing what each mask covers, after the same resize/crop as the image
        ([B, gh*gw]; for the patch grid, the fraction of each patch inside the mask)."""
        gh, gw = self.grid
        out = torch.ones(len(images), gh * gw)
        for i, (mask, _image) in enumerate(zip(masks, images)):
            if mask is None:
                continue
            as_image = bounded_aspect(Image.fromarray(mask.astype(np.uint8) * 255).convert("RGB"))
            px = self.processor.image_processor([as_image], do_normalize=False, do_rescale=True, return_tensors="pt")[
                "pixel_values"
            ][0, 0]
            out[i] = self.layout.coverage(px)
        return out

    @torch.no_grad()
    def visual_tokens(
        self, images: Sequence[Image.Image], masks: Sequence[np.ndarray | None] | None = None, batch_size: int = 16
    ) -> VisualTokens:
        """Run the frozen vision tower and projector: the visual tokens the language model would see."""
        feats = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            px = self.pixel_values(chunk).to(self.device, self.dtype)
            out = self.model.get_image_features(
                pixel_values=px,
                vision_feature_layer=self.model.config.vision_feature_layer,
                vision_feature_select_strategy=self.strategy,
            )
            pooled = out.pooler_output if hasattr(out, "pooler_output") else out
            feats.append(torch.stack(list(pooled)) if isinstance(pooled, (list, tuple)) else pooled)
        features = torch.cat(feats)
        coverage = self.mask_coverage(masks if masks is not None else [None] * len(images), images)
        return VisualTokens(features=features, grid=self.grid, coverage=coverage)

    # ------------------------------------------------------------------ text
    def format_prompt(self, question: str, system: str | None = None, image: bool = True) -> str:
        """The one chat formatter: system text, a user turn (image placeholder + question), the assistant cue."""
        question = self.fence_control_tokens(question)
        template = getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)
        if template is None:
            head = f"{system}\n" if system else ""
            text = FALLBACK_FORMAT.format(system=head, question=question)
            return text if image else text.replace("<image>\n", "")
        user = ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]
        messages = ([{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []) + [
            {"role": "user", "content": user}
        ]
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def fence_control_tokens(self, text: str) -> str:
        """Mark the tokenizer's special tokens in user text (e.g. ``<|im_start|>``) to be encoded as plain text.

        The image placeholder is left alone (a second one is refused by `encode`); concept tokens are not special.
        """
        if getattr(self, "_control", None) is None:
            tok = self.tokenizer
            special = set(tok.all_special_tokens) | {t.content for t in tok.added_tokens_decoder.values() if t.special}
            special.discard(self.image_token)
            self._control = re.compile(
                "|".join(re.escape(t) for t in sorted(special, key=len, reverse=True) if t) or r"(?!)"
            )
        text = text.replace(FENCE_OPEN, "").replace(FENCE_CLOSE, "")
        return self._control.sub(lambda m: FENCE_OPEN + m.group(0) + FENCE_CLOSE, text)

    def _token_ids(self, text: str) -> list[int]:
        """Token ids of a prompt; fenced spans (see `fence_control_tokens`) with special tokens split into plain text."""
        ids, at = [], 0
        for m in _FENCED.finditer(text):
            ids += self.tokenizer(text[at : m.start()], add_special_tokens=False)["input_ids"]
            ids += self.tokenizer(m.group(1), add_special_tokens=False, split_special_tokens=True)["input_ids"]
            at = m.end()
        return ids + self.tokenizer(text[at:], add_special_tokens=False)["input_ids"]

    @property
    def end_of_turn(self) -> str:
        """The token that closes an assistant answer (ChatML's <|im_end|>, Llama's </s>)."""
        return self.tokenizer.eos_token or ""

    def encode(self, prompt: str, answer: str | None = None, definition_rows: int = 0) -> Encoded:
        """Tokenise a formatted prompt (+ answer): expand the image placeholder to N tokens, label the answer only.

        With `definition_rows`, placeholders before the last one are definition slots of that many rows each
        (building the proving-ground base: "<x> is <slot>." filled with visual rows of another photo of x).
        """
        ids = self._token_ids(prompt)
        n_image = ids.count(self.image_token_id)
        if n_image > 1 and not definition_rows:
            raise McLlavaError(f"prompt has {n_image} image placeholders; mcllava uses one image per question")
        if n_image >= 1:
            last = len(ids) - 1 - ids[::-1].index(self.image_token_id)
            expanded = []
            for j, t in enumerate(ids):
                if t == self.image_token_id:
                    expanded += [t] * (self.num_image_tokens if j == last else definition_rows)
                else:
                    expanded.append(t)
            ids = expanded
            n_image = 1
        bos = self.tokenizer.bos_token_id
        if bos is not None and getattr(self.tokenizer, "add_bos_token", False) and (not ids or ids[0] != bos):
            ids = [bos] + ids
        labels = [-100] * len(ids)
        if answer is not None:
            ans = self.tokenizer(self.answer_prefix + answer + self.end_of_turn, add_special_tokens=False)["input_ids"]
            ids = ids + ans
            labels = labels + ans
        return Encoded(input_ids=ids, labels=labels, has_image=n_image == 1)

    @property
    def answer_prefix(self) -> str:
        """LLaVA-1.5's fallback format ends in 'ASSISTANT:' and expects a space before the answer."""
        template = getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)
        return " " if template is None or "ASSISTANT:" in str(template) else ""

    def answer_token_id(self, word: str) -> int:
        """Id of the first token of an answer starting with `word` (e.g. 'Yes'), as `encode` tokenises answers."""
        return self.tokenizer(self.answer_prefix + word, add_special_tokens=False)["input_ids"][0]

    def yes_no_margin(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """logit("Yes") - logit("No") of the first answer token from the last prompt position's hidden states
        ([..., D] -> [...]): the model's recognition decision, read without generating."""
        logits = self.model.get_output_embeddings()(last_hidden).float()
        return logits[..., self.answer_token_id("Yes")] - logits[..., self.answer_token_id("No")]

    # ------------------------------------------------------------------ forward
    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        """Input embeddings with each image's visual tokens written over its placeholder positions.

        image_features: [n_images, N, D] in batch order, one per row of input_ids that has an image.
        """
        embeds = self.model.get_input_embeddings()(input_ids)
        if image_features is None:
            return embeds
        slots = (input_ids == self.image_token_id).unsqueeze(-1)
        return embeds.masked_scatter(slots, image_features.to(embeds.dtype).reshape(-1))

    def hidden_states(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, shared_prefix: int = 0
    ) -> torch.Tensor:
        """Last hidden states of the language model (the LM head is applied by the caller, where needed).

        With `shared_prefix` p > 0, the first p positions must be the same in every row (no padding, no image):
        they run once, for the first row, and their key-value cache is repeated for the batch, which is
        mathematically the same forward (and backward) at a fraction of the cost when the system text that
        introduces every concept is most of each prompt.
        """
        lm = self.model.model.language_model
        rows = inputs_embeds.shape[0]
        if shared_prefix <= 0 or rows == 1:
            return lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state
        cache = DynamicCache(config=lm.config)
        head = lm(inputs_embeds=inputs_embeds[:1, :shared_prefix], use_cache=True, **{cache_kwarg(lm): cache})
        cache.batch_repeat_interleave(rows)
        tail = lm(
            inputs_embeds=inputs_embeds[:, shared_prefix:],
            attention_mask=attention_mask,
            use_cache=True,
            **{cache_kwarg(lm): cache},
        )
        return torch.cat([head.last_hidden_state.expand(rows, -1, -1), tail.last_hidden_state], dim=1)

    def shared_prefix_length(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
        """How many leading positions every row of a right-padded batch shares (same token, not padding, not an
        image placeholder), leaving at least one position per row; 0 when sharing would not pay."""
        if input_ids.shape[0] == 1:
            return 0
        same = (
            (input_ids == input_ids[:1]).all(0) & attention_mask.bool().all(0) & (input_ids[0] != self.image_token_id)
        )
        p = min(int(same.long().cumprod(0).sum()), input_ids.shape[1] - 1)
        return p if p >= MIN_SHARED_PREFIX else 0

    def answer_loss(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        image_features: torch.Tensor | None,
    ) -> torch.Tensor:
        """Mean next-token cross-entropy over answer tokens only.

        The LM head runs only at the positions that predict an answer token: with a 32k-50k vocabulary, the
        logits of every prompt position would cost more than the rest of a small model's step.
        """
        shared = self.shared_prefix_length(input_ids, attention_mask)
        hidden = self.hidden_states(self.embed(input_ids, image_features), attention_mask, shared)
        targets = labels[:, 1:]
        keep = targets != -100
        logits = self.model.get_output_embeddings()(hidden[:, :-1][keep])
        return torch.nn.functional.cross_entropy(logits.float(), targets[keep])

    @torch.no_grad()
    def answer_scores(
        self, prompt: str, answers: Sequence[str], image_features: torch.Tensor | None = None
    ) -> list[float]:
        """Mean log-probability per token of each given answer (closed by the end of turn) after one formatted
        prompt, as `encode` tokenises training answers: how the model ranks answers it is offered (multiple
        choice) without generating. The prompt runs once for all answers (`hidden_states`' shared prefix)."""
        encoded = [self.encode(prompt, a) for a in answers]
        if encoded[0].has_image and image_features is None:
            raise McLlavaError("prompt has an image placeholder but no image was given")
        batch = collate(encoded, [None] * len(encoded), self.tokenizer.pad_token_id or 0)
        ids, labels, mask = (t.to(self.device) for t in (batch.input_ids, batch.labels, batch.attention_mask))
        feats = image_features[None].expand(len(encoded), -1, -1) if encoded[0].has_image else None
        hidden = self.hidden_states(self.embed(ids, feats), mask, self.shared_prefix_length(ids, mask))
        targets = labels[:, 1:]
        keep = targets != -100
        logp = self.model.get_output_embeddings()(hidden[:, :-1][keep]).float().log_softmax(-1)
        picked = torch.zeros(targets.shape, device=logp.device)
        picked[keep] = logp.gather(-1, targets[keep].unsqueeze(-1)).squeeze(-1)
        return (picked.sum(1) / keep.sum(1).clamp_min(1)).tolist()

    def image_features_with_grad(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Visual tokens with gradients flowing into the vision tower (for building base models, not personalising)."""
        return self.image_features_with_grad_from_pixels(self.pixel_values(images))

    def image_features_with_grad_from_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        px = pixel_values.to(self.device, self.dtype)
        out = self.model.get_image_features(
            pixel_values=px,
            vision_feature_layer=self.model.config.vision_feature_layer,
            vision_feature_select_strategy=self.strategy,
        )
        return torch.stack(list(out.pooler_output))

    @torch.no_grad()
    def generate(
        self,
        prompt: str,
        image_features: torch.Tensor | None = None,
        max_new_tokens: int = 64,
        suppress: Sequence[int] = (),
        prefix: str = "",
    ) -> str:
        """Greedy answer to one formatted prompt, given the image's visual tokens ([N, D]) if it has an image;
        token ids in `suppress` are never generated. With `prefix`, the answer starts with that text (as a
        training answer would be tokenised) and the model writes the rest."""
        enc = self.encode(prompt + (self.answer_prefix + prefix if prefix else ""))
        if enc.has_image and image_features is None:
            raise McLlavaError("prompt has an image placeholder but no image was given")
        ids = torch.tensor([enc.input_ids], device=self.device)
        feats = image_features[None] if enc.has_image else None
        embeds = self.embed(ids, feats)
        cache = self.prompt_cache.lookup(self.model.model.language_model, embeds[0])
        return (prefix + self.generate_from_embeds(embeds, max_new_tokens, suppress, cache)).strip()

    def generate_from_embeds(
        self, embeds: torch.Tensor, max_new_tokens: int = 64, suppress: Sequence[int] = (), cache=None
    ) -> str:
        """Greedy answer to one prompt already embedded ([1, T, D]: image rows, or rows of visual definitions, in
        place), decoded; `cache` is a key-value cache of the prompt's start (`PromptCache.lookup`)."""
        out = self.model.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device),
            **({cache_kwarg(self.model): cache} if cache is not None else {}),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            logits_processor=LogitsProcessorList([SuppressIds(suppress, self.device)]) if suppress else None,
        )
        return self.tokenizer.decode(out[0], skip_special_tokens=True)
