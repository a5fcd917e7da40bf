"""The OpenAI request bodies the server takes (as vLLM takes them) and its error body.

Fields are typed strictly (``"max_tokens": "5"`` or ``true`` is a 400, not a 5);
fields this server does not know are ignored, as vLLM ignores them. Fields it knows
but does not implement (``n`` > 1, ``logprobs``, ``echo``, penalties) are refused with
a 400 that names them, rather than silently answered differently. vLLM's extensions
taken here: ``ignore_eos``, ``stop_token_ids``, ``return_token_ids`` and
``chat_template_kwargs``.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Strict, StrictBool, StrictInt, StrictStr

from .request import RequestError, SamplingParams

Float = Annotated[float, Strict()]  # accepts 1 and 1.0, refuses "1"


def error_body(message: str, param: str | None = None, status: int = 400,
               kind: str = "BadRequestError") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: StrictStr | None = None
    temperature: Float | None = None
    top_p: Float | None = None
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[StrictInt] | None = None
    stream: StrictBool = False
    stream_options: dict[str, StrictBool] | None = None
    ignore_eos: StrictBool = False
    return_token_ids: StrictBool = False
    n: StrictInt = 1
    logprobs: Any = None
    presence_penalty: Float = 0.0
    frequency_penalty: Float = 0.0
    user: StrictStr | None = None

    def refuse_unsupported(self) -> None:
        if self.n != 1:
            raise RequestError("only n=1 is supported")
        if self.logprobs not in (None, False):
            raise RequestError("logprobs are not supported")
        if self.presence_penalty or self.frequency_penalty:
            raise RequestError("presence/frequency penalties are not supported")

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def sampling(self, max_tokens: int, defaults: dict) -> SamplingParams:
        """The engine's SamplingParams (their ranges are checked in one place, by the
        engine: request.check_request); unset fields take generation_config's values."""
        temperature = self.temperature if self.temperature is not None \
            else defaults.get("temperature", 1.0)
        top_p = self.top_p if self.top_p is not None else defaults.get("top_p", 1.0)
        return SamplingParams(max_tokens=max_tokens, temperature=float(temperature),
                              top_p=float(top_p), seed=self.seed,
                              stop_token_ids=list(self.stop_token_ids or []),
                              ignore_eos=self.ignore_eos)


class CompletionRequest(_Common):
    prompt: StrictStr | list[StrictInt] | list[StrictStr] | list[list[StrictInt]]
    max_tokens: StrictInt | None = 16
    echo: StrictBool = False
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo:
            raise RequestError("echo is not supported")
        if self.best_of not in (None, 1):
            raise RequestError("best_of is not supported")
        if self.suffix:
            raise RequestError("suffix is not supported")

    def prompts(self) -> list:
        """A batch: a list of str or of token-id lists (one choice each)."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        if not p:
            raise RequestError("the prompt is empty")
        return list(p)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: StrictStr
    content: StrictStr | list[dict[str, Any]] | None = None

    def as_template_input(self) -> dict:
        d = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):  # [{"type": "text", "text": ...}, ...]
            parts = []
            for part in self.content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise RequestError("only text content parts are supported")
                parts.append(part["text"])
            d["content"] = "".join(parts)
        return d


class ChatRequest(_Common):
    messages: list[ChatMessage]
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.tools:
            raise RequestError("tools (function calling) are not supported")
        if self.response_format and self.response_format.get("type") != "text":
            raise RequestError("response_format other than text is not supported")

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens
