"""Counting a protobuf message's top-level records before parsing it.

Parsing is the one cost of a request that no check after it can bound: 2 MB of bare
ChatMessages (two bytes each, a million of them) take the parser ~30-70 ms of the
front's thread, though the count check right after refuses them. The wire format lets
us count first:

    record = tag (varint: field number << 3 | wire type) + payload
    wire type 0: varint; 1: 8 bytes; 2: varint length + that many bytes; 5: 4 bytes

Walking the top level skips each payload in O(1), so counting `messages` costs one
step per record and stops at the first record over the limit: at most limit + 1 steps
(~1 us each), whatever the request's size. Anything the walk cannot read (groups, a
truncated varint) is left to the parser, which refuses it.
"""

from __future__ import annotations

from collections.abc import Mapping


def _varint(data: bytes, i: int) -> tuple[int, int]:
    """(value, next offset); offset -1 when the varint is truncated or too long."""
    result = shift = 0
    n = len(data)
    while i < n:
        b = data[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i
        shift += 7
        if shift > 63:
            return 0, -1
    return 0, -1


def first_over_limit(data: bytes, limits: Mapping[int, int]) -> tuple[int, int] | None:
    """The first field number (of those in `limits`: field number -> most records) that
    has more top-level records in `data` than its limit, with the count reached (limit
    + 1); None when none does or the bytes cannot be walked."""
    counts = dict.fromkeys(limits, 0)
    i, n = 0, len(data)
    while i < n:
        tag, i = _varint(data, i)
        if i < 0:
            return None
        field, wire = tag >> 3, tag & 7
        if wire == 2:
            length, i = _varint(data, i)
            if i < 0:
                return None
            i += length
        elif wire == 0:
            _, i = _varint(data, i)
            if i < 0:
                return None
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        else:
            return None  # groups (3, 4) or no wire type at all: the parser's to refuse
        if field in counts:
            counts[field] += 1
            if counts[field] > limits[field]:
                return field, counts[field]
    return None
