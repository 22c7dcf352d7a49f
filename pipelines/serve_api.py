"""OpenAI's chat-completions format for one adaptive answer: read a request, write the answer.

Pure functions, no Ray, so every rule is testable without a server. A request is one user
message with exactly one image (an `image_url` part holding a `data:` URI, or a local path
under the folder the server allows) and its question as text parts. Extra body fields `scale`
("auto" or one of the model's scales) and `budget` ("tokens<=20", "loss<=0.01@0.1") steer the
routing; the model name may carry a budget too ("adaptive-m3:tokens<=20"), the way RouteLLM
names its routers. Anything wrong raises `ApiError`, which the server answers with HTTP 400 and
OpenAI's error JSON. Remote URLs are never fetched.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image

from predictor.calibrate import parse_target

DEFAULT_MODEL_NAME = "adaptive-m3"
_REMOTE_SCHEMES = ("http", "https", "ftp", "ftps", "s3", "gs")


class ApiError(Exception):
    """A request the server refuses: `body()` is OpenAI's error JSON, `status` its HTTP code."""

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int = 400,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code
        self.status, self.kind = status, kind

    def body(self) -> dict:
        error = {"message": self.message, "type": self.kind, "param": self.param}
        return {"error": error | {"code": self.code}}


@dataclass(frozen=True)
class ApiLimits:
    """What a server accepts: its model name and scales, the default budget, the folder local
    image paths may come from (None: no local paths), and size limits."""

    scales: tuple[int, ...]
    model_name: str = DEFAULT_MODEL_NAME
    default_budget: str | None = None
    allow_local_files: Path | None = None
    max_body_bytes: int = 16 << 20
    max_image_pixels: int = 4096 * 4096
    max_tokens: int = 64
    default_max_tokens: int = 8


@dataclass
class ChatRequest:
    """One checked request: the decoded image, the question and how to answer it."""

    image: Image.Image
    question: str
    model: str
    scale: str | int = "auto"
    budget: str | None = None
    max_tokens: int = 8
    stream: bool = False
    include_usage: bool = False

    @property
    def group(self) -> tuple:
        """Requests with the same group can share one `AdaptiveLMM.generate` call."""
        return (self.scale, self.budget, self.max_tokens)


@dataclass
class Answer:
    """What the model produced for one request, with the counts `usage` reports.

    `prompt_tokens` is every token the LLM prefilled: text and visual tokens, once per scale
    tried (a cascade that tried 1 then 9 visual tokens prefilled the text twice);
    `batch_size` is how many requests shared the server's batch."""

    text: str
    scale: int
    visual_tokens: int
    tried_scales: list[int]
    routed_by: str
    confidence: float
    completion_tokens: int
    prompt_tokens: int
    finished: bool
    batch_size: int = 1


def check_body_size(content_length: str | None, limits: ApiLimits) -> None:
    if content_length and content_length.isdigit() and int(content_length) > limits.max_body_bytes:
        raise body_too_large(limits)


def body_too_large(limits: ApiLimits) -> ApiError:
    return ApiError(
        f"request body is larger than the server's limit of {limits.max_body_bytes} bytes",
        code="body_too_large",
    )


def parse_chat_request(body: bytes, limits: ApiLimits) -> ChatRequest:
    """A checked `ChatRequest` from the raw body; `ApiError` names the first problem."""
    if len(body) > limits.max_body_bytes:
        raise body_too_large(limits)
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ApiError(f"request body is not valid JSON: {error}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError("request body must be a JSON object", code="invalid_json")
    model, name_budget = parse_model(data.get("model"), limits)
    image, question = parse_messages(data.get("messages"), limits)
    scale = parse_scale(data.get("scale", "auto"), limits.scales)
    budget = parse_budget(data.get("budget"), name_budget, scale, limits.default_budget)
    n = data.get("n", 1)
    if n not in (None, 1):
        raise ApiError(f"n must be 1 (answers are greedy), got {n!r}", param="n")
    stream = data.get("stream") or False
    options = data.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise ApiError("stream must be a boolean and stream_options an object", param="stream")
    return ChatRequest(
        image=image,
        question=question,
        model=model,
        scale=scale,
        budget=budget,
        max_tokens=parse_max_tokens(data, limits),
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
    )


def parse_model(value: object, limits: ApiLimits) -> tuple[str, str | None]:
    """(the model name as sent, the budget it carries after ':' or None)."""
    if not isinstance(value, str) or not value.strip():
        raise ApiError("model is required, e.g. " + limits.model_name, param="model")
    name, sep, budget = value.partition(":")
    if name != limits.model_name:
        raise ApiError(
            f"the model {value!r} does not exist; this server serves {limits.model_name!r} "
            f"(a budget may follow a colon: '{limits.model_name}:tokens<=20')",
            param="model",
            code="model_not_found",
            status=404,
        )
    if sep and not budget.strip():
        raise ApiError(f"model {value!r} has an empty budget after ':'", param="model")
    return value, budget.strip() if sep else None


def parse_messages(messages: object, limits: ApiLimits) -> tuple[Image.Image, str]:
    """The image and question of the one user message."""
    if not isinstance(messages, list) or not messages:
        raise ApiError("messages must be a non-empty list", param="messages", code="empty_message")
    roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
    if roles != ["user"]:
        raise ApiError(
            f"this model answers one question about one image: send exactly one user message "
            f"(got roles {roles})",
            param="messages",
        )
    content = messages[0].get("content")
    if isinstance(content, str):
        content = [{"type": "text", "text": content}] if content.strip() else []
    if not isinstance(content, list) or not content:
        raise ApiError("the user message is empty", param="messages", code="empty_message")
    texts, urls = [], []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"].strip())
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url:
                raise ApiError(
                    f"content part {index}: image_url needs a url",
                    param="messages",
                    code="no_image",
                )
            urls.append(url)
        else:
            raise ApiError(
                f"content part {index}: expected a text or image_url part, got {kind!r}",
                param="messages",
            )
    if not urls:
        raise ApiError(
            "the user message has no image; add one image_url part (a data: URI)",
            param="messages",
            code="no_image",
        )
    if len(urls) > 1:
        raise ApiError(
            f"the user message has {len(urls)} images; this model answers about exactly one",
            param="messages",
            code="too_many_images",
        )
    question = " ".join(t for t in texts if t)
    if not question:
        raise ApiError(
            "the user message has no question text", param="messages", code="empty_message"
        )
    return load_image(urls[0], limits), question


def load_image(url: str, limits: ApiLimits) -> Image.Image:
    """Decode a `data:` URI or read a local file under `limits.allow_local_files`."""
    scheme = urlparse(url).scheme.lower()
    if scheme == "data":
        header, comma, payload = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise ApiError(
                "image data URI must be base64: data:image/png;base64,...",
                param="messages",
                code="invalid_image",
            )
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(
                "image data URI is not valid base64", param="messages", code="invalid_image"
            ) from None
        return decode_image(raw, limits)
    if scheme in _REMOTE_SCHEMES:
        raise ApiError(
            f"remote image URLs are never fetched ({scheme}://...); send the image inline as a "
            "data: URI",
            param="messages",
            code="remote_url_refused",
        )
    if scheme not in ("", "file") and len(scheme) > 1:  # "C:" style drive letters are paths
        raise ApiError(
            f"unsupported image URL scheme {scheme!r}; use a data: URI",
            param="messages",
            code="invalid_image",
        )
    return decode_image(read_local(url, limits), limits)


def read_local(url: str, limits: ApiLimits) -> bytes:
    """The bytes of a local file, only if it resolves (links followed) inside the allowed
    folder: `..` and symlinks cannot leave it."""
    root = limits.allow_local_files
    if root is None:
        raise ApiError(
            "local image paths are refused; start the server with --allow-local-files DIR to "
            "read images under DIR, or send a data: URI",
            param="messages",
            code="local_file_refused",
        )
    path = unquote(urlparse(url).path) if url.lower().startswith("file:") else url
    root = root.resolve()
    resolved = (root / path).resolve()
    if not resolved.is_relative_to(root):
        raise ApiError(
            f"image path {path!r} is outside the allowed folder",
            param="messages",
            code="path_not_allowed",
        )
    if not resolved.is_file():
        raise ApiError(
            f"image file {path!r} does not exist", param="messages", code="invalid_image"
        )
    if resolved.stat().st_size > limits.max_body_bytes:
        raise ApiError(
            f"image file {path!r} is larger than {limits.max_body_bytes} bytes",
            param="messages",
            code="invalid_image",
        )
    return resolved.read_bytes()


def decode_image(raw: bytes, limits: ApiLimits) -> Image.Image:
    """An RGB image, or ApiError for bytes that are no image, a truncated one, or one whose
    pixel count (read from the header, before decoding) exceeds the limit."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
            if image.width * image.height > limits.max_image_pixels:
                raise ApiError(
                    f"image is {image.width}x{image.height}; the limit is "
                    f"{limits.max_image_pixels} pixels",
                    param="messages",
                    code="invalid_image",
                )
            image.load()
            return image.convert("RGB")
    except ApiError:
        raise
    except Exception as error:  # PIL raises many types for corrupt input
        raise ApiError(
            f"image is corrupt or not a supported format ({type(error).__name__}: {error})",
            param="messages",
            code="invalid_image",
        ) from None


def parse_scale(value: object, scales: tuple[int, ...]) -> str | int:
    if value == "auto" or value is None:
        return "auto"
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value in scales:
        return value
    raise ApiError(
        f"scale must be 'auto' or one of this model's scales {list(scales)}, got {value!r}",
        param="scale",
        code="invalid_scale",
    )


def parse_budget(
    value: object, name_budget: str | None, scale: str | int, default: str | None
) -> str | None:
    """The request's budget: the body's, else the model name's, else (for scale "auto") the
    server's default; each is checked with the same parser as `adaptive-m3 tune --target`."""
    if value is not None and not isinstance(value, str):
        raise ApiError(f"budget must be a string, got {value!r}", param="budget")
    if value is not None and name_budget is not None and value.strip() != name_budget:
        raise ApiError(
            f"the body's budget {value!r} and the model name's {name_budget!r} differ",
            param="budget",
            code="invalid_budget",
        )
    budget = value.strip() if value is not None else name_budget
    if budget is not None and scale != "auto":
        raise ApiError(
            "a budget needs scale 'auto'; a fixed scale has no knob to tune", param="budget"
        )
    if budget is None and scale == "auto":
        budget = default
    if budget is not None:
        try:
            parse_target(budget)
        except ValueError as error:
            raise ApiError(str(error), param="budget", code="invalid_budget") from None
    return budget


def parse_max_tokens(data: dict, limits: ApiLimits) -> int:
    key = "max_completion_tokens" if data.get("max_completion_tokens") is not None else "max_tokens"
    value = data.get(key)
    if value is None:
        return limits.default_max_tokens
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limits.max_tokens:
        raise ApiError(
            f"{key} must be an integer from 1 to {limits.max_tokens}, got {value!r}", param=key
        )
    return value


# -- responses ------------------------------------------------------------------------------
def _usage(answer: Answer) -> dict:
    return {
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "total_tokens": answer.prompt_tokens + answer.completion_tokens,
    }


def _adaptive(answer: Answer) -> dict:
    return {
        "scale": answer.scale,
        "visual_tokens": answer.visual_tokens,
        "routed_by": answer.routed_by,
        "tried_scales": answer.tried_scales,
        "confidence": answer.confidence,
        "batch_size": answer.batch_size,
    }


def completion_body(request: ChatRequest, answer: Answer, completion_id: str, created: int) -> dict:
    """A `chat.completion` object; the extra `adaptive` field says what the answer cost."""
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": request.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer.text, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop" if answer.finished else "length",
            }
        ],
        "usage": _usage(answer),
        "adaptive": _adaptive(answer),
    }


def stream_events(
    request: ChatRequest, answer: Answer, completion_id: str, created: int
) -> list[str]:
    """Server-sent events as OpenAI streams them: the role, the content, the finish reason
    (with the `adaptive` field), the usage if asked for, then `[DONE]`. The answer is generated
    in a shared batch before the first event, so it arrives as one content chunk."""

    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        body = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": request.model,
            "choices": [choice],
            **extra,
        }
        return f"data: {json.dumps(body)}\n\n"

    events = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": answer.text}),
        chunk({}, "stop" if answer.finished else "length", adaptive=_adaptive(answer)),
    ]
    if request.include_usage:
        usage = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": request.model,
            "choices": [],
            "usage": _usage(answer),
        }
        events.append(f"data: {json.dumps(usage)}\n\n")
    return [*events, "data: [DONE]\n\n"]


def models_body(limits: ApiLimits, created: int, extra: dict) -> dict:
    """`GET /v1/models`: the one served model, with its scales and routing set-up."""
    entry = {
        "id": limits.model_name,
        "object": "model",
        "created": created,
        "owned_by": "adaptive-m3",
    }
    return {"object": "list", "data": [entry | extra]}
