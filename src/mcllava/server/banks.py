"""Which bank a request is for: the banks a server holds by model id, and `pick` (the request's `model`, the key's banks)."""

from __future__ import annotations

from pathlib import Path

from ..multibank import SharedBase
from .limits import ApiError
from .served import ModelGate, ServedBank


class ModelError(ApiError):
    """An error about the request's `model`, answered in OpenAI's shape with `param` and `code`."""

    def __init__(self, status: int, message: str, kind: str, code: str):
        super().__init__(status, message, kind)
        self.param, self.code = "model", code


def served_banks(
    source, max_queue: int, concepts_dir: str | Path | None, private_paths: tuple[str, ...]
) -> dict[str, ServedBank]:
    """The banks of an assistant (one bank, under its legacy id) or of a `SharedBase` (one gate; each bank's id is its name)."""
    if not isinstance(source, SharedBase):
        served = ServedBank(source, max_queue, concepts_dir, private_paths)
        return {served.model_id: served}
    gate = ModelGate(max_queue)
    paths = tuple(str(a.bank.path) for a in source.assistants.values() if a.bank.path is not None)
    return {
        name: ServedBank(
            assistant,
            max_queue,
            concepts_dir,
            (*private_paths, *paths),
            gate=gate,
            model_id=name,
            use=lambda name=name: source.use(name),
        )
        for name, assistant in source.assistants.items()
    }


def bank_name(served: ServedBank) -> str:
    """The name a key's bank list uses: the bank's folder name."""
    path = served.assistant.bank.path
    return path.name if path is not None else served.model_id


def visible(banks: dict[str, ServedBank], allowed: frozenset[str] | None) -> list[ServedBank]:
    """The banks a key may use (every bank when `allowed` is None), in the server's order."""
    return [b for b in banks.values() if allowed is None or bank_name(b) in allowed]


def pick(banks: dict[str, ServedBank], model: str | None, allowed: frozenset[str] | None) -> ServedBank:
    """The bank a request's `model` names. A server of one bank answers any `model` (as OpenAI clients send one);
    with several, `model` must be one of `GET /v1/models` (404 otherwise, 400 when missing). A key limited to
    other banks is refused with 403."""
    if len(banks) == 1:
        bank = next(iter(banks.values()))
    elif model is None:
        raise ModelError(
            400,
            "this server holds several banks: name one as model (see GET /v1/models)",
            "invalid_request_error",
            "model_required",
        )
    elif model not in banks:
        raise ModelError(
            404,
            f"the model {model[:100]!r} does not exist (see GET /v1/models)",
            "invalid_request_error",
            "model_not_found",
        )
    else:
        bank = banks[model]
    if allowed is not None and bank_name(bank) not in allowed:
        raise ModelError(
            403, f"this API key may not use the model {bank.model_id!r}", "permission_error", "model_not_allowed"
        )
    return bank
