"""Hypothesis strategies for request bodies, as raw bytes: valid ones drawn from the service's own
OpenAPI schema, the same with one field spoiled, and the input a hostile client sends on purpose
(unicode edge cases, huge numbers, deep JSON, very long prompts, bytes that are not JSON at all)."""

from __future__ import annotations

import json
import math

from hypothesis import strategies as st

# Characters that break naive text handling: NUL and control characters, a byte-order mark, combining
# marks, right-to-left overrides, noncharacters, the last code point, and emoji built from several code
# points (which GPT-2's byte-level BPE splits over several tokens, each not a character on its own).
AWKWARD_TEXT = [
    "\x00", "\x07", "\x1b[31m", "\r\n", "\ufeff", "e\u0301\u0301\u0301", "\u202e", "\ufffe", "\uffff", "\U0010ffff",
    "\U0001f468\u200d\U0001f469\u200d\U0001f467", "\U0001f1eb\U0001f1f7", "\U0001f44d\U0001f3fd", "\u4e2d\u6587",
    "<|endoftext|>", "\\u0000", "%s%n", "../../etc/passwd", "' OR 1=1 --",
]  # fmt: skip
LONE_SURROGATES = ["\ud800", "\udbff", "\udc00", "\udfff"]
# Number literals that Python's json module never writes, spliced into the JSON text as they are.
HUGE_NUMBERS = ["1e400", "-1e400", "1" + "0" * 4400, "-" + "9" * 400, "1E+999999999", "4.9e-325", "-0", "NaN",
                "Infinity", "-Infinity", "18446744073709551616", "-9223372036854775809", "1.0"]  # fmt: skip


def from_schema(schema: dict) -> st.SearchStrategy:
    """Values valid for the JSON Schema subset pydantic writes for the request bodies."""
    if "anyOf" in schema:
        return st.one_of([from_schema(option) for option in schema["anyOf"]])
    kind = schema.get("type")
    if kind == "object":
        properties = {name: from_schema(sub) for name, sub in schema.get("properties", {}).items()}
        required = set(schema.get("required", ()))
        return st.fixed_dictionaries(
            {name: value for name, value in properties.items() if name in required},
            optional={name: value for name, value in properties.items() if name not in required},
        )
    if kind == "string":
        return st.text(min_size=schema.get("minLength", 0), max_size=schema.get("maxLength"))
    if kind == "integer":
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        high = schema.get("maximum", schema.get("exclusiveMaximum"))
        return st.integers(
            None if low is None else math.ceil(low) + ("exclusiveMinimum" in schema),
            None if high is None else math.floor(high) - ("exclusiveMaximum" in schema),
        )
    if kind == "number":
        return st.floats(
            schema.get("minimum", schema.get("exclusiveMinimum")),
            schema.get("maximum", schema.get("exclusiveMaximum")),
            exclude_min="exclusiveMinimum" in schema,
            exclude_max="exclusiveMaximum" in schema,
            allow_nan=False,
            allow_infinity=False,
        )
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        items = from_schema(schema["items"])
        return st.lists(items, min_size=schema.get("minItems", 0), max_size=schema.get("maxItems"))
    # A keyword the fuzzer does not know would silently narrow what it tries: teach it instead.
    raise ValueError(f"from_schema cannot generate {schema}")


# Any JSON value, nested a little: what a confused or hostile client puts in a field.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def awkward_text(min_size: int = 0) -> st.SearchStrategy[str]:
    return st.lists(st.sampled_from(AWKWARD_TEXT + LONE_SURROGATES) | st.text(max_size=4), min_size=min_size).map(
        "".join
    )


def encode(body) -> bytes:
    # ensure_ascii escapes lone surrogates as \udXXX: valid JSON syntax, but no valid text.
    return json.dumps(body).encode()


def bodies(schema: dict, overrides: dict[str, st.SearchStrategy] | None = None) -> st.SearchStrategy[bytes]:
    """Request bodies for the route whose body `schema` describes; `overrides` draw chosen fields."""
    fields = list(schema["properties"])
    valid = from_schema(schema)
    if overrides:
        valid = st.tuples(valid, st.fixed_dictionaries(overrides)).map(lambda pair: {**pair[0], **pair[1]})

    def with_field(value_strategy):
        return st.tuples(valid, st.sampled_from(fields), value_strategy).map(lambda t: {**t[0], t[1]: t[2]})

    def spliced(literal_and_body):
        literal, (body, name) = literal_and_body
        marker = "\x00SPLICE\x00"
        return encode({**body, name: marker}).replace(encode(marker), literal.encode())

    long_prompt = st.tuples(valid, st.text(min_size=1, max_size=6), st.integers(1, 20_000)).map(
        lambda t: {**t[0], "prompt": t[1] * t[2]}
    )
    depth = st.integers(1, 100_000)
    return st.one_of(
        valid.map(encode),
        with_field(json_values).map(encode),  # a field of the wrong type or shape
        with_field(awkward_text()).map(encode),
        valid.map(lambda body: {**body, "prompt": body["prompt"] + "\ud83d"}).map(encode),  # half an emoji
        st.tuples(valid, st.sampled_from(fields)).map(lambda t: {k: v for k, v in t[0].items() if k != t[1]}).map(
            encode
        ),
        st.tuples(valid, st.text(min_size=1), json_values).map(lambda t: {**t[0], t[1]: t[2]}).map(encode),
        st.tuples(st.sampled_from(HUGE_NUMBERS), st.tuples(valid, st.sampled_from(fields))).map(spliced),
        long_prompt.map(encode),
        st.tuples(depth, valid).map(lambda t: spliced(("[" * t[0] + "]" * t[0], (t[1], "prompt")))),
        depth.map(lambda n: ('{"a":' * n + "1" + "}" * n).encode()),
        json_values.map(encode),  # not an object at all
        st.binary(max_size=256),
        valid.map(encode).flatmap(lambda raw: st.integers(0, len(raw) - 1).map(lambda cut: raw[:cut])),
    )
