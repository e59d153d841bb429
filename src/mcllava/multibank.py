"""Many concept banks on one base model: one copy of the base in memory, one bank in use at a time.

`SharedBase` adds every bank's token strings to the one tokenizer (a string that two banks share, such as two
users' `<bo>`, is one token) and grows the embedding matrix once. A bank is put in use for one request, under the
model's lock (`SharedBase.use`): its rows are written over its tokens' rows; the prompt is encoded as a server of
that bank alone encodes it (`BankTokenizer`: the bank's own token strings are tokens, everything else, other
banks' token strings included, is plain text); every other bank's token id is never generated; and the prompt
cache is the bank's own. So an answer is the one a server holding that bank alone gives, and no request sees
another bank's rows or cached prompts. The cost of a bank is its rows, its assistant and, while it is among the
`prompt_caches` banks used last, its prompt cache.
"""

from __future__ import annotations

import copy
import re
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from .assistant import PersonalAssistant
from .backbone import Backbone
from .bank import MANIFEST, ConceptBank, config_hash
from .errors import BankError
from .generation import PromptCache
from .tokens import ConceptTokens, grow_embeddings, write_rows


def bank_folders(paths: Iterable[str | Path]) -> dict[str, Path]:
    """Bank folders by name (the folder's name): each path is a bank, or a folder whose sub-folders are banks.
    Two banks with the same folder name, or a path that holds no bank, are refused naming them."""
    found: dict[str, Path] = {}
    for path in map(Path, paths):
        if (path / MANIFEST).is_file():
            banks = [path]
        elif path.is_dir():
            banks = sorted(p for p in path.iterdir() if (p / MANIFEST).is_file())
            if not banks:
                raise BankError(
                    f"{path} is neither a concept bank nor a folder of concept banks (no {MANIFEST} in it or its sub-folders)"
                )
        else:
            raise BankError(f"no concept bank at {path} (folder not found)")
        for bank in banks:
            if bank.name in found:
                raise BankError(
                    f"two banks are named {bank.name!r} ({found[bank.name]} and {bank}): a bank's name is its folder's name"
                )
            found[bank.name] = bank
    if not found:
        raise BankError("no concept bank given")
    return found


def check_same_base(banks: Mapping[str, ConceptBank]) -> None:
    """Refuse banks trained on different base models (or tokenizers), naming the first that differs."""
    (first_name, first), *rest = banks.items()
    for name, bank in rest:
        for attr in ("base_config_hash", "tokenizer_len_before"):
            if getattr(bank, attr) != getattr(first, attr):
                raise BankError(
                    f"bank {name!r} was trained on base {bank.base_model} ({attr} {getattr(bank, attr)}), not on the base "
                    f"of bank {first_name!r} ({first.base_model}, {getattr(first, attr)}): one server holds banks of one base"
                )


class BankTokenizer:
    """The shared tokenizer as one bank sees it: the bank's own token strings encode to their ids, and the text
    between them is encoded by the base tokenizer (which knows no concept token), just as a tokenizer holding
    that bank alone splits text at its added tokens and encodes each piece. Everything else is the shared one's."""

    def __init__(self, shared, base, ids: Mapping[str, int]):
        self._shared, self._base, self._ids = shared, base, dict(ids)
        self._split = re.compile("|".join(re.escape(s) for s in sorted(self._ids, key=len, reverse=True)) or r"(?!)")

    def __call__(self, text: str, add_special_tokens: bool = False, **kwargs) -> dict[str, list[int]]:
        if add_special_tokens or not isinstance(text, str):
            raise TypeError("BankTokenizer encodes one text without special tokens (as Backbone.encode asks)")
        ids, at = [], 0
        for m in self._split.finditer(text):
            if m.start() > at:
                ids += self._base(text[at : m.start()], add_special_tokens=False, **kwargs)["input_ids"]
            ids.append(self._ids[m.group(0)])
            at = m.end()
        if at < len(text):
            ids += self._base(text[at:], add_special_tokens=False, **kwargs)["input_ids"]
        return {"input_ids": ids}

    def __len__(self) -> int:
        return len(self._shared)

    def __getattr__(self, name: str):
        return getattr(self._shared, name)


class SharedBase:
    """Several banks on one `Backbone`: an assistant per bank, used one at a time with `use(name)`."""

    def __init__(
        self, backbone: Backbone, banks: Mapping[str, ConceptBank], prompt_caches: int = 8, **assistant_kwargs
    ):
        if not banks:
            raise BankError("no concept bank given")
        self.backbone = backbone
        tokenizer = backbone.tokenizer
        check_same_base(banks)
        digest = config_hash(backbone.model.config)
        for bank in banks.values():  # names the bank when the base is not its own
            bank.check_base(digest, len(tokenizer))
        self._base_tokenizer = copy.deepcopy(tokenizer)  # before any concept token: encodes the plain text
        strings = list(dict.fromkeys(s for bank in banks.values() for s in bank.all_tokens))
        vocab = tokenizer.get_vocab()
        clashes = [s for s in strings if s in vocab]
        if clashes:
            raise BankError(f"concept tokens already exist in the base tokenizer: {', '.join(clashes[:5])}")
        tokenizer.add_tokens(strings, special_tokens=False)
        grow_embeddings(backbone.model, len(tokenizer))
        token_id = dict(zip(strings, tokenizer.convert_tokens_to_ids(strings)))
        every_id = set(token_id.values())
        self.assistants: dict[str, PersonalAssistant] = {}
        self._tokenizers: dict[str, BankTokenizer] = {}
        for name, bank in banks.items():
            tokens = ConceptTokens(
                list(bank.concept_ids),
                bank.k,
                {c: [token_id[s] for s in bank.token_strings(c)] for c in bank.concept_ids},
            )
            own = set(tokens.all_ids)
            self.assistants[name] = PersonalAssistant(
                backbone, bank, tokens=tokens, never_say=sorted(every_id - own), **assistant_kwargs
            )
            self._tokenizers[name] = BankTokenizer(
                tokenizer, self._base_tokenizer, {s: token_id[s] for s in bank.all_tokens}
            )
        self.prompt_caches = prompt_caches
        self._caches: OrderedDict[str, PromptCache] = OrderedDict()
        self._in_use: str | None = None
        self._idle_cache = backbone.prompt_cache
        self._idle_cache.enabled = False  # between uses, no bank's prompt is cached anywhere
        self._idle_cache.clear()

    @classmethod
    def load(
        cls, paths: Iterable[str | Path], base: str | Backbone | None = None, prompt_caches: int = 8, **assistant_kwargs
    ) -> SharedBase:
        """Load the banks at `paths` (see `bank_folders`) and the base model they remember (or `base`), once."""
        banks = {name: ConceptBank.load(path) for name, path in bank_folders(paths).items()}
        check_same_base(banks)  # before the base model is loaded
        first = next(iter(banks.values()))
        backbone = base if isinstance(base, Backbone) else Backbone.load(first.base_to_load(base))
        return cls(backbone, banks, prompt_caches, **assistant_kwargs)

    @property
    def names(self) -> list[str]:
        return list(self.assistants)

    def _cache(self, name: str) -> PromptCache:
        """The bank's own prompt cache; only the `prompt_caches` banks used last keep theirs."""
        cache = self._caches.pop(name, None) or PromptCache()
        cache.enabled = self.prompt_caches > 0
        self._caches[name] = cache
        while len(self._caches) > max(self.prompt_caches, 1):
            self._caches.popitem(last=False)
        return cache

    @contextmanager
    def use(self, name: str) -> Iterator[PersonalAssistant]:
        """Put bank `name` in use for the block and yield its assistant: its rows in the model, its view of the
        tokenizer, its prompt cache. The caller holds the model's lock: one bank is in use at a time."""
        assistant = self.assistants[name]
        backbone = self.backbone
        if self._in_use != name:
            self._in_use = None  # a failed write leaves no bank marked as in use
            write_rows(backbone.model, assistant.tokens, assistant.bank.input_rows, assistant.bank.head_rows)
            self._in_use = name
        shared = backbone.processor.tokenizer
        backbone.processor.tokenizer, backbone.prompt_cache = self._tokenizers[name], self._cache(name)
        try:
            yield assistant
        finally:
            backbone.processor.tokenizer, backbone.prompt_cache = shared, self._idle_cache
