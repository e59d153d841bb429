"""A chat request's parameters, checked: what the model can honour is planned, what it cannot is refused with
a 400 naming the parameter (as OpenAI-compatible servers do), and every limit is checked before the model runs."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from .images import ImageDecoder
from .limits import DEFAULT_MAX_TOKENS, ApiError, ServerLimits
from .schemas import ChatRequest
from .served import ServedBank

MAX_STOPS = 4


@dataclass
class ChatPlan:
    """What to answer and how: the question, its photo, the answer's length and where it stops."""

    question: str
    image: Image.Image | None
    max_tokens: int
    stops: list[str]
    include_usage: bool


def _unsupported(param: str, why: str) -> ApiError:
    return ApiError(400, f"{param} is not supported: {why}", param=param, code="unsupported_parameter")


def refuse_unsupported(req: ChatRequest) -> None:
    """Refuse the parameters that would change what a client expects but that this model cannot honour."""
    if req.n is not None and req.n != 1:
        raise ApiError(
            400,
            f"n must be 1, not {req.n}: decoding is greedy, so every choice would be the same",
            param="n",
            code="invalid_value",
        )
    if req.response_format is not None and req.response_format.get("type", "text") != "text":
        raise _unsupported("response_format", 'the model cannot be held to JSON; only {"type": "text"}')
    if req.logprobs or req.top_logprobs is not None:
        raise _unsupported(
            "logprobs" if req.logprobs else "top_logprobs", "the server does not return token probabilities"
        )
    for param in ("tools", "functions"):
        if getattr(req, param):
            raise _unsupported(param, "the model does not call tools")
    for param in ("tool_choice", "function_call"):
        if getattr(req, param) not in (None, "none"):
            raise _unsupported(param, "the model does not call tools")


def _text_problem(text: str) -> str | None:
    """Why `text` cannot be tokenised (a lone surrogate, which JSON's \\uD800 escapes can carry), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"a lone surrogate (U+{ord(text[exc.start]):04X}) at character {exc.start}: it is not valid Unicode"
    return None


def stops_of(req: ChatRequest) -> list[str]:
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > MAX_STOPS:
        raise ApiError(
            400, f"stop has {len(stops)} strings; the limit is {MAX_STOPS}", param="stop", code="invalid_value"
        )
    for s in stops:
        problem = _text_problem(s)
        if problem:
            raise ApiError(400, f"a stop string has {problem}", param="stop", code="invalid_value")
    return [s for s in stops if s]


def plan_chat(req: ChatRequest, limits: ServerLimits, bank: ServedBank, images: ImageDecoder) -> ChatPlan:
    """The question, the photo and the answer's length and stops of a chat request, with every limit checked."""
    refuse_unsupported(req)
    stops = stops_of(req)
    if len(req.messages) > limits.max_messages:
        raise ApiError(
            413, f"{len(req.messages)} messages; the limit is {limits.max_messages}", "limit_exceeded", param="messages"
        )
    for i, m in enumerate(req.messages):
        if sum(len(t) for t in m.texts()) > limits.max_text_chars:
            raise ApiError(
                413,
                f"a {m.role} message is longer than the limit of {limits.max_text_chars:,} characters",
                "limit_exceeded",
                param=f"messages[{i}].content",
            )
        for text in m.texts():
            problem = _text_problem(text)
            if problem:
                raise ApiError(
                    400,
                    f"the text of a {m.role} message has {problem}",
                    param=f"messages[{i}].content",
                    code="invalid_value",
                )
    users = [m for m in req.messages if m.role == "user"]
    if not users:
        raise ApiError(400, "there is no user message to answer", param="messages")
    question = "\n".join(users[-1].texts()).strip()
    if not question:
        raise ApiError(400, "the last user message has no text: ask a question", param="messages")
    urls = users[-1].images()
    if len(urls) > 1:
        raise ApiError(
            400, f"the last user message has {len(urls)} images; send one photo per question", param="messages"
        )
    max_tokens = req.max_completion_tokens or req.max_tokens or min(DEFAULT_MAX_TOKENS, limits.max_new_tokens)
    if max_tokens > limits.max_new_tokens:
        raise ApiError(
            413,
            f"max_tokens is {max_tokens}; the limit is {limits.max_new_tokens}",
            "limit_exceeded",
            param="max_tokens",
        )
    _check_question_tokens(question, max_tokens, limits, bank)
    image = images.from_data_url(urls[0]) if urls else None
    include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
    return ChatPlan(question, image, max_tokens, stops, include_usage)


def _check_question_tokens(question: str, max_tokens: int, limits: ServerLimits, bank: ServedBank) -> None:
    """Refuse a question longer in tokens than the limit, or than the model's context leaves for it."""
    room = bank.question_room(max_tokens)
    limit = min(limits.max_question_tokens, room)
    n = bank.count_tokens(question)
    if n > limit:
        why = (
            (
                f"the model reads at most {bank.context:,} tokens, and the concepts' introductions, the photo and "
                f"{max_tokens} answer tokens take the rest"
            )
            if room < limits.max_question_tokens
            else "the server's limit"
        )
        raise ApiError(
            413,
            f"the question is {n:,} tokens long; the limit is {limit:,} tokens ({why})",
            "limit_exceeded",
            param="messages",
            code="context_length_exceeded",
        )


class StopText:
    """Cut an answer before the first of its stop strings; fed piece by piece (streaming), it holds back only
    the text that could still be the start of a stop string."""

    def __init__(self, stops: list[str]):
        self.stops, self.pending, self.stopped = stops, "", False

    def feed(self, piece: str) -> str:
        """The part of the answer so far that can be sent."""
        if self.stopped or not self.stops:
            return "" if self.stopped else piece
        self.pending += piece
        cuts = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.stopped = True
            out, self.pending = self.pending[: min(cuts)], ""
            return out
        keep = max(
            (
                n
                for s in self.stops
                for n in range(min(len(s) - 1, len(self.pending)), 0, -1)
                if self.pending.endswith(s[:n])
            ),
            default=0,
        )
        out, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
        return out

    def finish(self) -> str:
        """What is held back once the answer is complete."""
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out

    def cut(self, text: str) -> str:
        """A whole answer, cut."""
        return self.feed(text) + self.finish()
