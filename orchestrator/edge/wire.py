"""Decoding request bytes without letting a malformed message become an INTERNAL error.

gRPC's generated handlers parse a request before our code runs; a string field with
invalid UTF-8 makes protobuf raise there, and grpc answers INTERNAL with no field named.
`lenient_parser` parses instead into either the message or a `MalformedRequest` that
names the offending field, found by walking the wire format with the message's
descriptor (pure; no gRPC import).
"""
from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError


@dataclass(frozen=True)
class MalformedRequest:
    field: str           # dotted path, e.g. "chat.messages[1].content"; "" = not locatable
    message: str


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def find_bad_utf8(data: bytes, descriptor: Descriptor, prefix: str = "") -> str | None:
    """The dotted path of the first string field whose bytes are not UTF-8, or None."""
    counts: dict[int, int] = {}
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, pos = _varint(data, pos)
            continue
        if wire_type == 1 or wire_type == 5:
            pos += 8 if wire_type == 1 else 4
            continue
        if wire_type != 2:
            raise ValueError(f"unsupported wire type {wire_type}")
        size, pos = _varint(data, pos)
        chunk, pos = data[pos:pos + size], pos + size
        field = descriptor.fields_by_number.get(number)
        if field is None:
            continue
        index = counts.get(number, 0)
        counts[number] = index + 1
        name = prefix + field.name + (f"[{index}]" if field.is_repeated else "")
        if field.type == FieldDescriptor.TYPE_STRING:
            try:
                chunk.decode("utf-8")
            except UnicodeDecodeError:
                return name
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            inner = find_bad_utf8(chunk, field.message_type, name + ".")
            if inner is not None:
                return inner
    return None


def lenient_parser(message_cls):
    """A request deserializer that never raises: the message, or a MalformedRequest."""
    def parse(data: bytes):
        try:
            return message_cls.FromString(data)
        except DecodeError as exc:
            try:
                field = find_bad_utf8(data, message_cls.DESCRIPTOR)
            except (ValueError, IndexError):
                field = None
            if field is not None:
                return MalformedRequest(field, "is not valid UTF-8")
            return MalformedRequest("", f"request is not a valid {message_cls.DESCRIPTOR.full_name}: {exc}")
    return parse
