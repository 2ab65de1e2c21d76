"""Request bodies of `/predict` and `/v1/completions`, and the JSON they are answered with.

Types are strict (a number in quotes is an error, not a number) so that bad input is named, not
guessed at. Service limits are checked here too, from the validation context, so an over-limit
value is reported like any other invalid field.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from model import SamplingParams
from service.errors import LIMIT_EXCEEDED
from service.messages import ModelInfo

# The largest useful top_k is the vocabulary; anything above means "all of it" (and would not fit
# the engine's int64 tensors if passed through).
VOCAB_SIZE = 50257
# What torch.Generator.manual_seed accepts.
Seed = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]
StopString = Annotated[str, Field(min_length=1)]
MAX_STOP = 4


def _cap_new_tokens(value: int | None, info: ValidationInfo) -> int | None:
    cap = (info.context or {}).get("max_new_tokens")
    if value is not None and cap is not None and value > cap:
        raise PydanticCustomError(LIMIT_EXCEEDED, "must be at most {cap}, the service's limit", {"cap": cap})
    return value


class PredictRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    prompt: str = Field(min_length=1)
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, ge=0, allow_inf_nan=False)
    top_k: int = Field(50, ge=1)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    seed: Seed | None = None
    stop: list[StopString] = Field(default_factory=list, max_length=MAX_STOP)
    stream: bool = False
    # Whether to check drafts (speculative decoding; the same tokens either way). None: the service's --speculation.
    speculate: bool | None = None

    _cap = field_validator("max_new_tokens")(_cap_new_tokens)

    def sampling(self, speculate: bool) -> SamplingParams:
        """The engine's parameters; `speculate` is the service's default for a request that does not say."""
        return SamplingParams(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_k=min(self.top_k, VOCAB_SIZE),
            top_p=self.top_p,
            seed=self.seed,
            stop=tuple(self.stop),
            speculate=speculate if self.speculate is None else self.speculate,
        )


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    include_usage: bool = False


# OpenAI parameters this service does not implement, with the value that means "not used".
UNSUPPORTED = {
    "n": 1,
    "best_of": 1,
    "echo": False,
    "logprobs": None,
    "suffix": None,
    "logit_bias": None,
    "presence_penalty": 0,
    "frequency_penalty": 0,
}


class CompletionRequest(BaseModel):
    """OpenAI's legacy completions request, plus top_k (vLLM's extension). Unknown fields are ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    # OpenAI accepts an empty prompt: the model then writes a new document, from end-of-text.
    prompt: str
    max_tokens: int | None = Field(16, ge=1)
    temperature: float | None = Field(1.0, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=1)
    # vLLM's extension: generate max_tokens tokens even past an end-of-text (benchmarks want fixed lengths).
    ignore_eos: bool = False
    # OpenAI takes one stop string or a list of up to four (the bound is the list's, not the string's length).
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    seed: Seed | None = None
    # This service's extension, as in /predict.
    speculate: bool | None = None
    user: str | None = None
    n: int | None = 1
    best_of: int | None = None
    echo: bool | None = False
    logprobs: int | None = None
    suffix: str | None = None
    logit_bias: dict[str, int] | None = None
    presence_penalty: float | None = 0
    frequency_penalty: float | None = 0

    _cap = field_validator("max_tokens")(_cap_new_tokens)

    @field_validator(*UNSUPPORTED)
    @classmethod
    def _unsupported(cls, value, info: ValidationInfo):
        neutral = UNSUPPORTED[info.field_name]
        if value is not None and value != neutral:
            raise PydanticCustomError(
                "unsupported_parameter",
                "not supported by this service; leave it out or use {neutral}",
                {"neutral": "null" if neutral is None else str(neutral).lower()},
            )
        return value

    @property
    def streaming(self) -> bool:
        return bool(self.stream)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling(self, speculate: bool) -> SamplingParams:
        """The engine's parameters; `speculate` is the service's default for a request that does not say."""
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return SamplingParams(
            max_new_tokens=16 if self.max_tokens is None else self.max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_k=None if self.top_k is None else min(self.top_k, VOCAB_SIZE),
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed,
            stop=tuple(stop),
            stop_at_eot=not self.ignore_eos,
            speculate=speculate if self.speculate is None else self.speculate,
        )


def usage(prompt_tokens: int, completion_tokens: int, drafted_tokens: int) -> dict:
    """/predict's usage. drafted_tokens: completion tokens that came from kept drafts (speculative decoding)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "drafted_tokens": drafted_tokens}


def predict_body(text: str, finish_reason: str, usage: dict, model: ModelInfo) -> dict:
    return {"text": text, "finish_reason": finish_reason, "usage": usage, "model": model.as_dict()}


def completion_body(
    completion_id: str,
    created: int,
    model_name: str,
    model: ModelInfo,
    text: str,
    finish_reason: str | None,
    usage: dict | None = None,
) -> dict:
    """A completion, or one streamed chunk of it (object type as OpenAI sends both)."""
    body = {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model_name,
        "system_fingerprint": fingerprint(model),
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
    }
    if usage is not None:
        # OpenAI's shape; the drafted tokens go where it details the completion tokens.
        body["usage"] = {
            "prompt_tokens": usage["prompt_tokens"],
            "completion_tokens": usage["completion_tokens"],
            "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"],
            "completion_tokens_details": {"drafted_tokens": usage["drafted_tokens"]},
        }
    return body


def fingerprint(model: ModelInfo) -> str:
    """OpenAI's name for "the backend configuration that answered": here, the checkpoint."""
    return f"{model.checkpoint}@step-{model.step}" if model.step is not None else model.checkpoint
