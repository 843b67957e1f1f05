"""The wire codec: valid batches round-trip; every malformed message is classified, never raised."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.torch import save as st_save

from consumers.wire import REASONS, DecodeError, Expected, WireLimits, decode_batch, encode_batch

LIMITS = WireLimits()
GOOD_HEADERS = [("slice", b"s1"), ("data_type", b"image"), ("schema", b"1")]


def _images(n=4):
    return torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8), torch.arange(n) % 10


def test_round_trip_keeps_tensors_and_headers():
    x, y = _images()
    value, headers = encode_batch(x, y, "rot90", "image", batch_id="run-1")
    batch = decode_batch(value, headers, LIMITS)
    assert torch.equal(batch.x, x) and torch.equal(batch.y, y)
    assert (batch.slice, batch.data_type, batch.batch_id) == ("rot90", "image", "run-1")


def _reason(value, headers=GOOD_HEADERS, **kw):
    with pytest.raises(DecodeError) as info:
        decode_batch(value, headers, kw.pop("limits", LIMITS), **kw)
    return info.value.reason


def test_each_rejection_names_its_reason():
    x, y = _images()
    assert _reason(b"garbage") == "bad_bytes"
    assert _reason(b"") == "bad_bytes"
    assert _reason(st_save({"x": x})) == "missing_tensor"
    assert _reason(st_save({"x": x, "y": y, "z": y.clone()})) == "unexpected_tensor"
    assert _reason(st_save({"x": x.double(), "y": y})) == "bad_dtype"
    assert _reason(st_save({"x": x, "y": y.int()})) == "bad_dtype"
    assert _reason(st_save({"x": x, "y": y[:2]})) == "bad_shape"
    assert _reason(st_save({"x": x[0], "y": y})) == "bad_shape"
    nan = x.float()
    nan[0, 0, 0] = float("nan")
    assert _reason(st_save({"x": nan, "y": y})) == "non_finite"
    inf = x.float()
    inf[1, 2, 3] = float("inf")
    assert _reason(st_save({"x": inf, "y": y})) == "non_finite"
    assert _reason(st_save({"x": x, "y": y + 10})) == "label_out_of_range"
    assert _reason(st_save({"x": x, "y": y - 1})) == "label_out_of_range"
    ok = st_save({"x": x, "y": y})
    assert _reason(ok, GOOD_HEADERS[:2]) == "missing_header"
    assert _reason(ok, [("slice", b"s"), ("data_type", b"video"), ("schema", b"1")]) == "unknown_data_type"
    assert _reason(ok, [("slice", b"s"), ("data_type", b"image"), ("schema", b"9")]) == "unknown_schema"
    assert _reason(ok, [("slice", b"bad slice!"), ("data_type", b"image"), ("schema", b"1")]) == "bad_header"
    assert _reason(ok, GOOD_HEADERS + [("slice", b"again")]) == "bad_header"
    assert _reason(ok, GOOD_HEADERS + [("note", b"\xff\xfe")]) == "bad_header"
    assert _reason(ok, GOOD_HEADERS + [("note", b"x" * 1000)]) == "too_large"
    assert _reason(ok, limits=WireLimits(max_message_bytes=100)) == "too_large"
    assert _reason(ok, limits=WireLimits(max_batch_rows=2)) == "too_large"



def test_a_batch_the_served_model_cannot_take_is_incompatible():
    x, y = _images()
    ok = st_save({"x": x, "y": y})
    assert _reason(ok, expected=Expected("image", (32, 32))) == "incompatible"
    tabular = st_save({"x": torch.rand(4, 20), "y": y})
    tab_headers = [("slice", b"s1"), ("data_type", b"tabular"), ("schema", b"1")]
    assert _reason(tabular, tab_headers, expected=Expected("image", (28, 28))) == "incompatible"
    assert _reason(tabular, tab_headers, expected=Expected("tabular", (21,))) == "incompatible"
    # only what is known is checked: before the first batch nothing is, then the first batch's form
    assert decode_batch(tabular, tab_headers, LIMITS, expected=Expected()).x.shape == (4, 20)
    assert decode_batch(tabular, tab_headers, LIMITS, expected=Expected("tabular", None)).x.shape == (4, 20)
    assert decode_batch(ok, GOOD_HEADERS, LIMITS, expected=Expected("image", (28, 28))).x.shape == (4, 28, 28)


def test_sequence_and_tabular_rules():
    tokens = torch.randint(0, 50, (3, 12), dtype=torch.int64)
    y = torch.tensor([0, 1, 2])
    headers = [("slice", b"s"), ("data_type", b"sequence"), ("schema", b"1")]
    assert decode_batch(st_save({"x": tokens, "y": y}), headers, LIMITS).x.shape == (3, 12)
    assert _reason(st_save({"x": tokens.float(), "y": y}), headers) == "bad_dtype"
    assert _reason(st_save({"x": tokens - 100, "y": y}), headers) == "bad_shape"
    tab = [("slice", b"s"), ("data_type", b"tabular"), ("schema", b"1")]
    assert _reason(st_save({"x": torch.zeros(3, 4, 5), "y": y}), tab) == "bad_shape"


header_values = st.one_of(st.binary(max_size=300), st.sampled_from([b"image", b"sequence", b"tabular", b"1", b"s"]))
header_keys = st.sampled_from(["slice", "data_type", "schema", "batch_id", "other", ""])
headers_strategy = st.lists(st.tuples(header_keys, header_values), max_size=6)


def _tensor_payload(draw):
    dtype = draw(st.sampled_from([torch.uint8, torch.float32, torch.float16, torch.int64, torch.int32,
                                  torch.float64, torch.bool]))
    shape = draw(st.lists(st.integers(0, 6), min_size=0, max_size=5))
    t = torch.zeros(shape, dtype=dtype)
    if t.is_floating_point() and t.numel():
        t.view(-1)[0] = draw(st.sampled_from([0.0, float("nan"), float("inf"), -1e30]))
    elif dtype in (torch.int64, torch.int32) and t.numel():
        t.view(-1)[0] = draw(st.integers(-5, 20))
    return t


@st.composite
def malformed_messages(draw):
    kind = draw(st.sampled_from(["bytes", "tensors", "truncated"]))
    if kind == "bytes":
        value = draw(st.binary(max_size=512))
    else:
        names = draw(st.lists(st.sampled_from(["x", "y", "z"]), min_size=0, max_size=3, unique=True))
        value = st_save({n: _tensor_payload(draw) for n in names}) if names else st_save({})
        if kind == "truncated":
            value = value[: draw(st.integers(0, len(value)))]
    return value, draw(headers_strategy)


@settings(max_examples=10_000, deadline=None, suppress_health_check=list(HealthCheck))
@given(malformed_messages())
def test_fuzz_no_exception_escapes_and_every_rejection_is_classified(message):
    value, headers = message
    try:
        batch = decode_batch(value, headers, LIMITS)
    except DecodeError as exc:
        assert exc.reason in REASONS
    else:  # whatever was accepted must satisfy the documented contract
        assert batch.data_type in ("image", "sequence", "tabular")
        assert len(batch.x) == len(batch.y) > 0
        assert batch.y.dtype == torch.int64
