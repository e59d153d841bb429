"""The request and response bodies of the HTTP API (pydantic), shaped as OpenAI's where OpenAI has one."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = Field(
        None, description="The request parameter at fault, when there is one (e.g. 'n', 'messages[0].content')."
    )
    code: str | None = Field(
        None, description="A machine-readable reason, when there is one (e.g. 'unsupported_parameter')."
    )


class ErrorResponse(BaseModel):
    error: ErrorBody


class ImageURL(BaseModel):
    url: str = Field(
        description="A data URL, data:image/png;base64,... (JPEG, PNG, WebP or BMP). Remote URLs are refused."
    )
    detail: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]] | None = None
    name: str | None = None

    def texts(self) -> list[str]:
        if isinstance(self.content, str):
            return [self.content]
        return [p.text for p in self.content or [] if isinstance(p, TextPart)]

    def images(self) -> list[str]:
        return (
            []
            if isinstance(self.content, (str, type(None)))
            else [p.image_url.url for p in self.content if isinstance(p, ImagePart)]
        )


class ChatOptions(BaseModel):
    """mcllava's extension of the request: the personalised visual prompt and the marked image."""

    visual_prompt: bool = Field(True, description="Locate the concepts and draw numbered marks before answering.")
    return_image: bool = Field(False, description="Return the marked image (when marks were drawn) as a data URL.")


class StreamOptions(BaseModel):
    include_usage: bool = Field(False, description="Send the usage as a last chunk of its own, with no choices.")


class ChatRequest(BaseModel):
    """OpenAI's chat request. The last user message is the question (its image, if any, the photo); earlier
    turns and system messages are ignored: the model answers one question at a time, and its system text is
    the concept introductions. Decoding is greedy: temperature, top_p, seed and the penalties are accepted and
    ignored; `n` must be 1; `stop` is honoured; response_format (other than text), logprobs and tools are
    refused with a 400 naming the parameter, since the model cannot do them."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int | None = Field(None, description="Must be 1 (decoding is greedy, so more choices would all be the same).")
    stop: str | list[str] | None = Field(None, description="Up to 4 strings; the answer ends before the first of them.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: dict[str, Any] | None = Field(None, description="Only {'type': 'text'}.")
    logprobs: bool | None = Field(None, description="Not supported: only false.")
    top_logprobs: int | None = Field(None, description="Not supported.")
    tools: list[Any] | None = Field(None, description="Not supported.")
    tool_choice: Any = Field(None, description="Not supported (other than 'none').")
    functions: list[Any] | None = Field(None, description="Not supported.")
    function_call: Any = Field(None, description="Not supported (other than 'none').")
    mcllava: ChatOptions = Field(default_factory=ChatOptions)


class LocationOut(BaseModel):
    concept: str
    name: str
    score: float = Field(description="Presence score in [0, 1].")
    present: bool
    peak: tuple[float, float] = Field(description="(x, y) in pixels of the sent image.")
    box: tuple[float, float, float, float] | None = Field(description="(x0, y0, x1, y1) in pixels, when present.")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int = Field(description="Prompt tokens, image tokens included.")
    completion_tokens: int
    total_tokens: int


class ChatExtras(BaseModel):
    marks: dict[str, str] = Field(description="Mark number -> concept id, as drawn on the image.")
    locations: list[LocationOut]
    marked_image: str | None = Field(
        None, description="The marked image (JPEG data URL) when asked for and marks were drawn."
    )
    parts: dict[str, str] = Field(
        default_factory=dict,
        description="For 'are <a> and <b> both here?' and captions: concept id -> its own answer to 'Is <c> in this photo?'.",
    )


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    mcllava: ChatExtras


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed answer. The one with finish_reason carries mcllava; with
    stream_options.include_usage a last chunk with no choices carries the usage."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    mcllava: ChatExtras | None = None


class LocateRequest(BaseModel):
    image: str = Field(description="A data URL, data:image/png;base64,...")
    return_image: bool = False


class LocateResponse(BaseModel):
    width: int
    height: int
    locations: list[LocationOut]
    marks: dict[str, str]
    marked_image: str | None = Field(None, description="The image with numbered marks (JPEG data URL), if asked for.")


class ConceptOut(BaseModel):
    id: str
    token: str = Field(description="How to name the concept in a question, e.g. <bo>.")
    name: str
    category: str | None = None
    description: str | None = None
    thumbnail: str | None = Field(
        None, description="A small JPEG data URL, when the bank or --concepts folder has one."
    )


class ConceptList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ConceptOut]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mcllava"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    version: str


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": words}
    for code, words in {
        400: "Invalid input (bad image, empty question, invalid text, a parameter the model cannot honour, a request "
        "that does not match the schema, a Host or Origin refused without a key, ...); `param` names the parameter",
        401: "Missing or wrong API key",
        403: "A cross-origin request to a server without an API key",
        404: "No such route or model",
        408: "The request body did not arrive in time",
        413: "A limit was exceeded (body, image bytes, pixels, text, messages, tokens)",
        415: "Unsupported content type (chat: application/json; locate: JSON or multipart/form-data)",
        500: "Internal error (details are logged by the server, never sent)",
        503: "The queue for the model is full; retry later",
    }.items()
}
