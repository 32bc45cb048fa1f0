"""The payload's JSON text: the encoder built once gives json.dumps's text byte for byte,
and whatever it cannot encode still gets the checks' own message."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.services import queue
from app.services.queue import InvalidTaskError, TaskSpec, encode_payload

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(st.dictionaries(st.text() | st.integers() | st.booleans(), VALUES, max_size=6))
def test_the_text_is_json_dumps_byte_for_byte(payload: dict[Any, Any]) -> None:
    assert encode_payload(payload) == json.dumps(payload, allow_nan=False)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"x": math.nan}, "Out of range float values"),
        ({"x": math.inf}, "Out of range float values"),
        ({"x": object()}, "is not JSON serializable"),
        ({"x": {1, 2}}, "is not JSON serializable"),
    ],
)
def test_what_cannot_be_encoded_is_refused_with_the_reason(
    payload: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidTaskError, match=message):
        TaskSpec(kind="k", payload=payload)


def test_a_cycle_is_refused_as_a_cycle_and_the_encoder_stays_usable() -> None:
    cycle: dict[str, Any] = {}
    cycle["self"] = cycle
    with pytest.raises(InvalidTaskError, match="Circular reference detected"):
        TaskSpec(kind="k", payload={"a": [cycle]})
    shared = {"n": 1}  # the same object twice is not a cycle
    assert TaskSpec(kind="k", payload={"a": shared, "b": shared}).payload_json == (
        '{"a": {"n": 1}, "b": {"n": 1}}'
    )
    assert queue.encode_payload({"after": "errors"}) == '{"after": "errors"}'


def _nested(levels: int) -> dict[str, Any]:
    value: Any = 1
    for i in range(levels - 1):
        value = {"a": value} if i % 2 else [value]
    return {"top": value}


def test_payloads_nest_at_most_max_json_depth_levels() -> None:
    assert TaskSpec(kind="k", payload=_nested(queue.MAX_JSON_DEPTH)).payload_json
    with pytest.raises(InvalidTaskError, match="more than 100 levels deep"):
        TaskSpec(kind="k", payload=_nested(queue.MAX_JSON_DEPTH + 1))
    # many brackets, little depth (and brackets inside strings) are fine
    flat = {"rows": [[i, [i]] for i in range(500)], "text": "{[" * 300}
    assert TaskSpec(kind="k", payload=flat).payload_json == json.dumps(flat)


@pytest.mark.parametrize("field", ["priority", "max_retries", "timeout_seconds"])
def test_a_boolean_is_not_an_integer_field(field: str) -> None:
    with pytest.raises(InvalidTaskError, match=field):
        TaskSpec(kind="k", **{field: True})


@pytest.mark.parametrize(
    "payload",
    [{1: "a"}, {True: "a", "true": "b"}, {None: 1}, {1.5: 1}, {"x": {2: 1}}, {"x": [{None: 1}]}],
)
def test_payload_keys_must_be_strings(payload: dict[Any, Any]) -> None:
    """json.dumps turned such keys into strings, silently ({True: 'a', 'true': 'b'} was
    stored as one key, a value lost): the payload stored was not the one given."""
    with pytest.raises(InvalidTaskError, match="payload keys must be strings"):
        TaskSpec(kind="k", payload=payload)


def test_string_keys_pass_however_the_text_looks() -> None:
    for payload in ({"a": {"b": {"c": 1}}}, {"t": "{{{"}, {"l": [{"k": 1}, 2]}, {}):
        assert TaskSpec(kind="k", payload=payload).payload == payload
