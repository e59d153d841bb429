"""The concept bank: the trained concept rows, saved as ``concepts.safetensors`` + ``manifest.json``.

A bank is everything personalisation produces: for each concept the input-embedding rows of ``<c>`` and
``<c_1>..<c_k>`` (and the LM-head rows where the head is not tied), the locator's reference features, and
the display information. It remembers its base model by id and by a hash of the model's config, so that it
is never applied to another model. Loading reads only JSON and safetensors (never pickle), and checks every
shape against the manifest. Saving is atomic: the previous bank survives any failed write.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .concepts import id_clashes, validate_concept_id
from .errors import BankError, ConceptError
from .files import fsync_path, os_error_text
from .manifest import FORMAT_VERSION, MANIFEST, PROVING_GROUND, is_hub_id, read_manifest
from .manifest import token_strings as _token_strings
from .version import __version__

TENSORS = "concepts.safetensors"
MAX_ROW_NORM_RATIO = 1000.0  # a concept row may be at most this many times the base's mean word-embedding norm

# Config keys that do not change what the concept rows mean: names, versions, runtime switches, and
# vocab_size, which grows when concept tokens are added.
VOLATILE_CONFIG_KEYS = frozenset(
    {
        "_name_or_path",
        "transformers_version",
        "dtype",
        "torch_dtype",
        "vocab_size",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "architectures",
        "output_attentions",
        "output_hidden_states",
        "use_cache",
        "_commit_hash",
        "return_dict",
    }
)


def config_hash(config: Any) -> str:
    """Short sha256 of a model config (``PretrainedConfig`` or dict), ignoring volatile keys at every depth."""

    def clean(value: Any) -> Any:
        if hasattr(value, "to_dict"):
            value = value.to_dict()
        if isinstance(value, Mapping):
            return {str(k): clean(v) for k, v in value.items() if k not in VOLATILE_CONFIG_KEYS}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    text = json.dumps(clean(config), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A detached, contiguous float32 CPU copy (a bank owns its tensors)."""
    return t.detach().to("cpu", torch.float32).clone().contiguous()


@dataclass
class ConceptBank:
    """Trained concepts for one base model: embedding rows, head rows, locator references and display info.

    ``input_rows[i, 0]`` is the row of ``<c>`` and ``input_rows[i, j]`` that of ``<c_j>`` for concept
    ``concept_ids[i]``; ``head_rows`` has the same layout and exists only when the LM head is untied.
    """

    base_model: str
    base_config_hash: str
    tokenizer_len_before: int
    concept_ids: list[str]
    k: int
    hidden_size: int
    tied_head: bool
    input_rows: torch.Tensor
    head_rows: torch.Tensor | None
    locator_refs: dict[str, torch.Tensor] = field(default_factory=dict)
    display: dict[str, dict] = field(default_factory=dict)
    recipe: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    path: Path | None = field(default=None, compare=False, repr=False)  # where it was loaded from / saved to

    def __post_init__(self) -> None:
        self.base_model = str(self.base_model)
        self.concept_ids = list(self.concept_ids)
        self.input_rows = _rows(self.input_rows)
        self.head_rows = None if self.head_rows is None else _rows(self.head_rows)
        self.locator_refs = {cid: _rows(t) for cid, t in self.locator_refs.items()}
        self._validate()

    def _validate(self) -> None:
        """Check that the fields agree with each other; raise :class:`BankError` saying what does not."""
        m, k, d = len(self.concept_ids), self.k, self.hidden_size
        if not (isinstance(k, int) and k >= 1 and isinstance(d, int) and d >= 1):
            raise BankError(f"k and hidden_size must be positive integers, got k={k!r}, hidden_size={d!r}")
        if not isinstance(self.tokenizer_len_before, int) or self.tokenizer_len_before < 0:
            raise BankError(f"tokenizer_len_before must be a non-negative integer, got {self.tokenizer_len_before!r}")
        if m == 0:
            raise BankError("a concept bank needs at least one concept")
        for cid in self.concept_ids:
            try:
                validate_concept_id(cid)
            except ConceptError as exc:
                raise BankError(str(exc)) from None
        clashes = id_clashes(self.concept_ids)
        if clashes:
            raise BankError("; ".join(clashes))
        expected = (m, k + 1, d)
        tensors = {"input_rows": self.input_rows}
        if self.tied_head and self.head_rows is not None:
            raise BankError("the head is tied, so there must be no head_rows")
        if not self.tied_head:
            if self.head_rows is None:
                raise BankError("the head is untied, so head_rows are needed")
            tensors["head_rows"] = self.head_rows
        for name, t in tensors.items():
            if tuple(t.shape) != expected:
                raise BankError(f"{name} has shape {tuple(t.shape)}, expected (concepts, k+1, hidden) = {expected}")
        for cid, t in self.locator_refs.items():
            if cid not in self.concept_ids:
                raise BankError(f"locator references for unknown concept {cid!r}")
            if t.ndim != 2 or t.shape[0] < 1 or t.shape[1] != d:
                raise BankError(f"locator.{cid} has shape {tuple(t.shape)}, expected (refs, {d})")
            tensors[f"locator.{cid}"] = t
        for name, t in tensors.items():
            if not torch.isfinite(t).all():
                raise BankError(f"{name} contains NaN or infinite values")
        for cid, info in self.display.items():
            if cid not in self.concept_ids or not isinstance(info, dict):
                raise BankError(f"display information for {cid!r} must be a dict about one of the bank's concepts")

    # ------------------------------------------------------------------------------------ tokens

    def token_strings(self, cid: str) -> list[str]:
        """The concept's token strings: ``["<bo>", "<bo_1>", ..., "<bo_k>"]``."""
        if cid not in self.concept_ids:
            raise BankError(f"no concept {cid!r} in this bank (concepts: {', '.join(self.concept_ids)})")
        return _token_strings(cid, self.k)

    @property
    def all_tokens(self) -> list[str]:
        """Every token string of the bank, concept by concept, in row order."""
        return [t for cid in self.concept_ids for t in self.token_strings(cid)]

    @property
    def tokenizer_len_after(self) -> int:
        """Tokenizer length once this bank's tokens are added."""
        return self.tokenizer_len_before + len(self.concept_ids) * (self.k + 1)

    # -------------------------------------------------------------------------------- save / load

    def _manifest(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "mcllava_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "base_model": self.base_model,
            "base_config_hash": self.base_config_hash,
            "tokenizer_len_before": self.tokenizer_len_before,
            "tokenizer_len_after": self.tokenizer_len_after,
            "concept_ids": self.concept_ids,
            "tokens": {cid: self.token_strings(cid) for cid in self.concept_ids},
            "k": self.k,
            "hidden_size": self.hidden_size,
            "tied_head": self.tied_head,
            "locator_refs": {cid: int(t.shape[0]) for cid, t in self.locator_refs.items()},
            "display": self.display,
            "recipe": self.recipe,
            "metrics": self.metrics,
        }

    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"input_rows": self.input_rows}
        if self.head_rows is not None:
            tensors["head_rows"] = self.head_rows
        tensors.update({f"locator.{cid}": t for cid, t in self.locator_refs.items()})
        return tensors

    def save(self, path: str | Path) -> Path:
        """Write the bank folder atomically and return its path.

        The files go to a temporary folder beside ``path`` and are fsynced, then swapped in by rename; the
        previous bank at ``path`` is removed only once the new one is in place. On failure the temporary
        folder is removed, the previous bank is left intact, and :class:`BankError` says what happened.
        """
        target = Path(path).absolute()
        if target.exists() and not (target / MANIFEST).is_file():
            if not target.is_dir() or any(target.iterdir()):
                raise BankError(
                    f"cannot save bank to {target}: it exists and is not a concept bank; refusing to replace it"
                )
        try:
            manifest = json.dumps(self._manifest(), indent=2, ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise BankError(
                f"cannot save bank to {target}: recipe, metrics or display is not JSON-serialisable: {exc}"
            ) from None
        tmp: Path | None = None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
            save_file(self._tensors(), str(tmp / TENSORS), metadata={"format_version": str(FORMAT_VERSION)})
            with open(tmp / MANIFEST, "w", encoding="utf-8") as f:
                f.write(manifest + "\n")
                f.flush()
                os.fsync(f.fileno())
            fsync_path(tmp / TENSORS)
            fsync_path(tmp)
            self._swap_in(tmp, target)
            tmp = None
            fsync_path(target.parent)
        except (OSError, SafetensorError) as exc:
            raise BankError(
                f"could not save bank to {target}: {os_error_text(exc)}; any previous bank there is unchanged"
            ) from None
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        self.path = target
        return target

    @staticmethod
    def _swap_in(tmp: Path, target: Path) -> None:
        """Rename ``tmp`` to ``target``; an existing ``target`` is moved aside first and deleted afterwards."""
        if not target.exists():
            os.rename(tmp, target)
            return
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rmdir(old)
        os.rename(target, old)
        try:
            os.rename(tmp, target)
        except OSError:
            os.rename(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)

    @classmethod
    def load(cls, path: str | Path) -> ConceptBank:
        """Read a bank folder (JSON and safetensors only: no code runs) and check it thoroughly.

        Refuses with :class:`BankError`: a missing folder or file, bad JSON, a newer format version,
        missing or unexpected tensors, shapes that disagree with the manifest, and non-finite values.
        """
        folder = Path(path)
        if not folder.is_dir():
            raise BankError(f"no concept bank at {folder} (folder not found)")
        tpath = folder / TENSORS
        if not tpath.is_file():
            raise BankError(f"bank {folder} is incomplete: {TENSORS} is missing")
        fields = read_manifest(folder)
        try:
            tensors = load_file(str(tpath))
        except (SafetensorError, OSError, ValueError) as exc:
            raise BankError(f"bank {folder}: {TENSORS} is not a readable safetensors file: {exc}") from None
        expected = {"input_rows"} | ({"head_rows"} if not fields["tied_head"] else set())
        expected |= {f"locator.{cid}" for cid in fields["locator_counts"]}
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        if missing or extra:
            what = "; ".join(s for s in (missing and f"missing {missing}", extra and f"unexpected {extra}") if s)
            raise BankError(f"bank {folder}: {TENSORS} does not match {MANIFEST}: {what}")
        for name, t in tensors.items():
            if not t.is_floating_point():
                raise BankError(f"bank {folder}: tensor {name} has dtype {t.dtype}, expected floating point")
        for cid, r in fields["locator_counts"].items():
            if tensors[f"locator.{cid}"].shape[0] != r:
                raise BankError(
                    f"bank {folder}: locator.{cid} has {tensors[f'locator.{cid}'].shape[0]} rows, manifest says {r}"
                )
        del fields["locator_counts"]
        try:
            bank = cls(
                **fields,
                input_rows=tensors["input_rows"],
                head_rows=tensors.get("head_rows"),
                locator_refs={k.removeprefix("locator."): v for k, v in tensors.items() if k.startswith("locator.")},
            )
        except BankError as exc:
            raise BankError(f"bank {folder}: {exc}") from None
        bank.path = folder
        return bank

    # ------------------------------------------------------------------------------- combination

    def check_base(self, config_hash: str, tokenizer_len: int | None = None) -> None:
        """Refuse a base model other than the one this bank was trained on.

        ``tokenizer_len`` is the base tokenizer's length before concept tokens are added.
        """
        where = self.path if self.path is not None else "(unsaved)"
        if config_hash != self.base_config_hash:
            raise BankError(
                f"bank {where} was trained on base {self.base_model} (config {self.base_config_hash}), "
                f"not on this model (config {config_hash})"
            )
        if tokenizer_len is not None and tokenizer_len != self.tokenizer_len_before:
            raise BankError(
                f"bank {where} was trained with a tokenizer of {self.tokenizer_len_before} tokens "
                f"(before concept tokens), but this one has {tokenizer_len}"
            )

    def base_to_load(self, override: str | Path | None = None) -> str:
        """The base model to load this bank on: `override` when the user gives one, else the base the bank names,
        if it names it by a hub id or as `proving-ground`. A local path written in a bank file is not followed
        (a bank from elsewhere could point anywhere on this machine): the user must pass it as `--base`."""
        if override is not None:
            return str(override)
        name = self.base_model
        if name == PROVING_GROUND or (is_hub_id(name) and not Path(name).exists()):
            return name
        where = self.path if self.path is not None else "(unsaved)"
        raise BankError(
            f"bank {where} names its base model by a local path ({name[:200]!r}), which is not followed from a bank file; "
            f"pass it as --base (the base parameter) if you trust it"
        )

    def check_row_norms(self, word_norm: float, head_norm: float | None = None) -> None:
        """Refuse rows that cannot be trained concept rows for this base: norms more than `MAX_ROW_NORM_RATIO` times
        the base's mean word-embedding norm (`word_norm`; `head_norm` for the LM-head rows of an untied head)."""
        where = self.path if self.path is not None else "(unsaved)"
        for name, rows, reference in (
            ("input_rows", self.input_rows, word_norm),
            ("head_rows", self.head_rows, head_norm),
        ):
            if rows is None or reference is None or not math.isfinite(reference) or reference <= 0:
                continue
            norms = rows.double().norm(dim=-1)  # float32 squares of finite 1e30 rows would overflow
            worst = int(norms.argmax())
            i, j = divmod(worst, norms.shape[1])
            if float(norms.max()) > MAX_ROW_NORM_RATIO * reference:
                raise BankError(
                    f"bank {where}: {name} of {self.token_strings(self.concept_ids[i])[j]} has norm {float(norms.max()):.3g}, "
                    f"more than {MAX_ROW_NORM_RATIO:g} times this base's mean word-embedding norm ({reference:.3g}): "
                    "these are not trained concept rows for this model"
                )

    def merge(self, other: ConceptBank) -> ConceptBank:
        """A bank with the concepts of both; they must share base model, k, hidden size, head tying and tokenizer."""
        for attr in ("base_config_hash", "k", "hidden_size", "tied_head", "tokenizer_len_before"):
            a, b = getattr(self, attr), getattr(other, attr)
            if a != b:
                raise BankError(f"cannot merge banks {self.path} and {other.path}: {attr} differs ({a!r} vs {b!r})")
        clashes = id_clashes(self.concept_ids + other.concept_ids)
        if clashes:
            raise BankError(f"cannot merge banks {self.path} and {other.path}: " + "; ".join(clashes))

        def combined(a: dict, b: dict) -> dict:
            return dict(a) if a == b else {"merged": [a, b]}

        return ConceptBank(
            base_model=self.base_model,
            base_config_hash=self.base_config_hash,
            tokenizer_len_before=self.tokenizer_len_before,
            concept_ids=self.concept_ids + other.concept_ids,
            k=self.k,
            hidden_size=self.hidden_size,
            tied_head=self.tied_head,
            input_rows=torch.cat([self.input_rows, other.input_rows]),
            head_rows=None if self.tied_head else torch.cat([self.head_rows, other.head_rows]),
            locator_refs={**self.locator_refs, **other.locator_refs},
            display={**self.display, **other.display},
            recipe=combined(self.recipe, other.recipe),
            metrics=combined(self.metrics, other.metrics),
        )

    def subset(self, ids: Iterable[str]) -> ConceptBank:
        """A bank with only the given concepts, in the given order."""
        ids = list(ids)
        unknown = [cid for cid in ids if cid not in self.concept_ids]
        if unknown:
            raise BankError(
                f"bank {self.path} has no concept {', '.join(map(repr, unknown))} (concepts: {', '.join(self.concept_ids)})"
            )
        if len(set(ids)) != len(ids):
            raise BankError(f"subset lists a concept more than once: {ids}")
        index = torch.tensor([self.concept_ids.index(cid) for cid in ids], dtype=torch.long)
        return ConceptBank(
            base_model=self.base_model,
            base_config_hash=self.base_config_hash,
            tokenizer_len_before=self.tokenizer_len_before,
            concept_ids=ids,
            k=self.k,
            hidden_size=self.hidden_size,
            tied_head=self.tied_head,
            input_rows=self.input_rows[index],
            head_rows=None if self.head_rows is None else self.head_rows[index],
            locator_refs={cid: t for cid, t in self.locator_refs.items() if cid in ids},
            display={cid: d for cid, d in self.display.items() if cid in ids},
            recipe=dict(self.recipe),
            metrics=dict(self.metrics),
        )

    @staticmethod
    def size_bytes(path: str | Path) -> int:
        """Total size in bytes of the files of a bank folder."""
        return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
