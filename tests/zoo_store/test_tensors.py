"""Safetensors decoded into views of the follower's buffer (zoo_store/tensors.py): the same tensors as
``safetensors.torch.load``, no copy, and whatever is not certainly valid is the library's to decide
(the same tensors, or the same error)."""

from __future__ import annotations

import ctypes
import json
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors import SafetensorError
from safetensors.torch import load as st_load, save as st_save

from zoo_store.tensors import DTYPES, decode

DTYPE_LIST = sorted(set(DTYPES.values()), key=str)


def _address(buffer: bytearray) -> int:
    return ctypes.addressof((ctypes.c_char * len(buffer)).from_buffer(buffer))


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """The same names, dtypes, shapes and bytes (NaN payloads included)."""
    return set(a) == set(b) and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
                                    and _bytes(a[k]) == _bytes(b[k]) for k in a)


def _file(header: dict, data: bytes = b"", pad: int = 0) -> bytearray:
    text = json.dumps(header).encode() + b" " * pad
    return bytearray(struct.pack("<Q", len(text)) + text + data)


def _outcome(fn, *args):
    try:
        return fn(*args)
    except SafetensorError as exc:
        return SafetensorError, str(exc)


def test_tensors_are_views_of_the_buffer_and_equal_the_librarys():
    state = {"w": torch.randn(3, 4), "b": torch.arange(3, dtype=torch.int64), "m": torch.tensor([True, False]),
             "h": torch.randn(5, dtype=torch.bfloat16), "s": torch.tensor(2.5), "e": torch.zeros(0, 7)}
    raw = st_save(state, metadata={"format": "pt"})
    buffer = bytearray(raw)
    decoded = decode(buffer)
    assert _same(decoded, st_load(raw)) and _same(decoded, state)
    start, end = _address(buffer), _address(buffer) + len(buffer)
    assert all(start <= t.data_ptr() < end for t in decoded.values() if t.numel())
    decoded["w"][1, 2] = 1234.5   # a view: what the tensor holds is what the buffer holds
    assert struct.pack("<f", 1234.5) in buffer and struct.pack("<f", 1234.5) not in raw
    # the tensors outlive the name of the buffer, and save again (no two share a storage)
    decoded = decode(bytearray(raw))
    assert _same(st_load(st_save(decoded)), state)


def test_a_numpy_buffer_is_viewed_and_read_only_input_is_copied_by_the_library():
    raw = st_save({"w": torch.randn(4, 4)})
    array = np.frombuffer(bytearray(raw), dtype=np.uint8)
    decoded = decode(memoryview(array))
    assert decoded["w"].data_ptr() == array.ctypes.data + len(raw) - 64
    assert _same(decode(raw), st_load(raw)) and _same(decode(memoryview(raw)), st_load(raw))


def test_what_the_fast_path_does_not_take_goes_to_the_library():
    # a dtype it does not map, and a tensor misaligned for its dtype, still decode (copied, by the library)
    other = {"c": torch.randn(3, dtype=torch.complex64), "w": torch.randn(2)}
    assert _same(decode(bytearray(st_save(other))), other)
    header = {"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
              "w": {"dtype": "F32", "shape": [2], "data_offsets": [1, 9]}}
    misaligned = _file(header, bytes([7]) + struct.pack("<2f", 1.5, -2.0), pad=-len(json.dumps(header)) % 8)
    decoded = decode(misaligned)
    assert _same(decoded, st_load(bytes(misaligned))) and decoded["w"].tolist() == [1.5, -2.0]
    start = _address(misaligned)
    assert not start <= decoded["w"].data_ptr() < start + len(misaligned)   # a copy, not a view


@pytest.mark.parametrize("case", ["short", "huge_header", "header_past_end", "not_json", "not_utf8", "a_list",
                                  "unknown_dtype", "negative_dim", "float_dim", "gap", "overlap", "wrong_size",
                                  "extra_data", "missing_data", "bad_metadata", "nan_dim", "leading_space"])
def test_malformed_files_fail_as_the_library_fails(case):
    good = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}
    data = bytes(12)
    if case == "short":
        buffer = bytearray(b"\x01\x00\x00")
    elif case == "huge_header":
        buffer = bytearray(struct.pack("<Q", 200_000_000) + b"{}")
    elif case == "header_past_end":
        buffer = bytearray(struct.pack("<Q", 64) + b"{}")
    elif case == "not_json":
        buffer = bytearray(struct.pack("<Q", 8) + b"{nojson}")
    elif case == "not_utf8":
        buffer = bytearray(struct.pack("<Q", 4) + b'{"\xff"')
    elif case == "a_list":
        buffer = bytearray(struct.pack("<Q", 2) + b"[]")
    elif case == "leading_space":
        text = b" " + json.dumps(good).encode()
        buffer = bytearray(struct.pack("<Q", len(text)) + text + data)
    elif case == "nan_dim":
        text = json.dumps(good).replace("[1]", "[NaN]").encode()
        buffer = bytearray(struct.pack("<Q", len(text)) + text + data)
    else:
        header = json.loads(json.dumps(good))
        if case == "unknown_dtype":
            header["a"]["dtype"] = "F33"
        elif case == "negative_dim":
            header["b"]["shape"] = [-1]
        elif case == "float_dim":
            header["b"]["shape"] = [1.0]
        elif case == "gap":
            header["b"]["data_offsets"] = [9, 13]
            data = bytes(13)
        elif case == "overlap":
            header["b"]["data_offsets"] = [4, 8]
            data = bytes(8)
        elif case == "wrong_size":
            header["b"]["shape"] = [2]
        elif case == "extra_data":
            data = bytes(16)
        elif case == "missing_data":
            data = bytes(10)
        elif case == "bad_metadata":
            header["__metadata__"] = {"k": 1}
        buffer = _file(header, data)
    expected, got = _outcome(st_load, bytes(buffer)), _outcome(decode, buffer)
    if isinstance(expected, tuple):
        assert got == expected
    else:
        assert _same(got, expected)


_shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.text("abcdefgh._", min_size=1, max_size=6), st.tuples(st.sampled_from(DTYPE_LIST), _shapes),
                       max_size=6),
       st.integers(0, 2 ** 32 - 1))
def test_any_state_decodes_as_the_library_decodes_it(spec, seed):
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, (dtype, shape) in spec.items():
        raw = torch.randint(0, 256, (int(np.prod(shape)) * dtype.itemsize,), dtype=torch.uint8, generator=gen)
        if dtype == torch.bool:
            raw = raw % 2
        tensor = raw.view(dtype).reshape(shape)
        state[name] = tensor
    raw = st_save(state)
    buffer = bytearray(raw)
    decoded = decode(buffer)
    assert _same(decoded, st_load(raw))
    start = _address(buffer)   # every tensor a view: what safetensors writes always takes the fast path
    assert all(start <= t.data_ptr() < start + len(buffer) for t in decoded.values() if t.numel())


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 300), st.integers(0, 255))
def test_a_corrupted_byte_decodes_or_fails_as_the_library_does(position, value):
    raw = bytearray(st_save({"w": torch.arange(6.0).view(2, 3), "i": torch.arange(4, dtype=torch.int16)}))
    raw[position % len(raw)] = value
    expected, got = _outcome(st_load, bytes(raw)), _outcome(decode, raw)
    if isinstance(expected, tuple):
        assert got == expected
    else:
        assert _same(got, expected)
