"""Protocol stage: OpenAI/vLLM request JSON in, validated pydantic request models out (unknown fields accepted)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ROLES = ("system", "developer", "user", "assistant", "tool", "latest_reminder")
MAX_TOP_LOGPROBS = 20


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ContentPart(_Open):
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_needs_text(self) -> ContentPart:
        if self.type == "text" and self.text is None:
            raise ValueError("a content part of type 'text' needs a string `text`")
        return self


class FunctionCall(_Open):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCall(_Open):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Open):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None

    @field_validator("role")
    @classmethod
    def _known_role(cls, role: str) -> str:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
        return role

    @model_validator(mode="after")
    def _content_rules(self) -> ChatMessage:
        if self.role in ("user", "system", "developer", "tool") and self.content is None:
            raise ValueError(f"a {self.role!r} message needs `content`")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages may carry `tool_calls`")
        return self


class FunctionDef(_Open):
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _schema_object(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and "type" in v and v["type"] != "object":
            raise ValueError(f"function parameters must be a JSON schema of type 'object', got {v['type']!r}")
        if v is not None and "properties" in v and not isinstance(v["properties"], dict):
            raise ValueError("function parameters `properties` must be an object")
        return v


class Tool(_Open):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(_Open):
    name: str


class NamedToolChoice(_Open):
    type: Literal["function"] = "function"
    function: NamedFunction


class StreamOptions(_Open):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class _Sampling(_Open):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    presence_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: int = Field(default=1, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    min_tokens: int = Field(default=0, ge=0)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    return_token_ids: bool | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _common(self) -> _Sampling:
        if self.stream_options is not None and not self.stream:
            raise ValueError("Stream options can only be defined when `stream=True`.")
        if self.n != 1:
            raise ValueError(f"n={self.n}: only n=1 is supported (ds4f returns one choice per prompt)")
        if isinstance(self.stop, list) and len(self.stop) > 64:
            raise ValueError("`stop` may hold at most 64 strings")
        return self


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = True
    response_format: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    include_reasoning: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    skip_special_tokens: bool = True

    @model_validator(mode="after")
    def _chat_rules(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("when using `top_logprobs`, `logprobs` must be set to true")
        if self.tools is not None and len(self.tools) == 0:
            raise ValueError("`tools` is an empty list; leave it out or give at least one tool")
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError(f"tool names must be unique, got {names}")
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) or choice == "required":
            if not self.tools:
                raise ValueError("When using `tool_choice`, `tools` must be set.")
            if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
                raise ValueError(f"tool_choice names the tool {choice.function.name!r}, which is not in `tools` "
                                 f"(tools: {names})")
        if self.response_format is not None:
            kind = self.response_format.get("type")
            if kind not in ("text", "json_object", "json_schema"):
                raise ValueError(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}")
        return self

    def output_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def effective_tool_choice(self) -> str | NamedToolChoice:
        """vLLM's default: 'auto' when tools are given, else 'none'."""
        if self.tool_choice is None:
            return "auto" if self.tools else "none"
        return self.tool_choice


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    suffix: str | None = None
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: int | None = None
    skip_special_tokens: bool = True

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v: Any) -> Any:
        if isinstance(v, list) and len(v) == 0:
            raise ValueError("`prompt` is an empty list")
        if isinstance(v, list) and any(isinstance(x, list) and len(x) == 0 for x in v):
            raise ValueError("`prompt` holds an empty token list")
        return v

    @model_validator(mode="after")
    def _completion_rules(self) -> CompletionRequest:
        if self.best_of not in (None, 1):
            raise ValueError("best_of > 1 is not supported")
        if self.suffix is not None and not isinstance(self.prompt, str):
            raise ValueError("`suffix` (fill-in-the-middle) needs a single string `prompt`")
        return self

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    def output_limit(self) -> int | None:
        return 16 if self.max_tokens is None else self.max_tokens


class TokenizeCompletionRequest(_Open):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(ChatCompletionRequest):
    return_token_strs: bool | None = False


class DetokenizeRequest(_Open):
    model: str | None = None
    tokens: list[int]
