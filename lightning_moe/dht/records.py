"""Generic sub-key records and expert / prefix records, with validation.

Two layers live here:

* **Generic records** (what goes over the wire and into storage): a record is a map
  ``subkey -> (value, expiration_time)``. It travels through kademlia as one msgpack blob
  (``encode_record`` / ``decode_record``), never pickle. ``decode_record`` validates every
  entry (types, sizes, expiry bounds) and skips what does not parse, counting it.

* **Expert records** built on top of them. For a grid uid ``ffn.3.14`` served at ``endpoint``:

  ===================  ==========  ==========
  key                  sub-key     value
  ===================  ==========  ==========
  ``expert:ffn.3.14``  endpoint    endpoint
  ``prefix:ffn.3``     ``"14"``    endpoint
  ``prefix:ffn``       ``"3"``     endpoint
  ===================  ==========  ==========

  A prefix record lists the live children of that prefix (one coordinate of the next grid
  dimension each), so beam search walks the grid one dimension at a time. The value of a
  child is the endpoint of one live expert below it; for the last dimension it is exactly
  the endpoint of that expert. Keying the uid record by endpoint keeps every host that
  serves the uid until its own entry expires; readers take the latest-expiring one.
"""
from __future__ import annotations

import ipaddress
import math
import re
import time
from collections import Counter
from typing import Any, Iterable, Mapping, Optional, Sequence

import umsgpack

Record = dict  # subkey (str) -> (value, expiration_time: float)

MAX_KEY_LENGTH = 256
MAX_SUBKEY_LENGTH = 128
MAX_VALUE_BYTES = 2048  # msgpack size of one value
MAX_RECORD_BYTES = 6000  # msgpack size of one stored or transmitted record; UDP request limit is 8192
MAX_ENTRIES = 1024
MAX_VALUE_DEPTH = 8
MAX_TTL = 7 * 24 * 3600.0  # an expiration time further ahead than this is invalid
MAX_COORDINATE = 1 << 20

EXPERT_KEY_PREFIX = "expert:"
PREFIX_KEY_PREFIX = "prefix:"

_PREFIX_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*\Z")
_COORD_RE = re.compile(r"(0|[1-9][0-9]{0,6})\Z")
_HOSTNAME_RE = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z")
_PORT_RE = re.compile(r"[1-9][0-9]{0,4}\Z")


# ----------------------------------------------------------------------------- uids, endpoints
def parse_uid(uid: str) -> tuple[str, tuple[int, ...]]:
    """Split ``"ffn.3.14"`` into ``("ffn", (3, 14))``; raise ValueError if it is not a grid uid.

    The prefix matches ``[A-Za-z_][A-Za-z0-9_-]*``, coordinates are non-negative decimal
    integers below ``MAX_COORDINATE`` written without leading zeros, and there is at least one.
    """
    if not isinstance(uid, str) or len(uid) > MAX_KEY_LENGTH - len(EXPERT_KEY_PREFIX):
        raise ValueError(f"invalid expert uid {uid!r}")
    prefix, *coords = uid.split(".")
    if not _PREFIX_RE.match(prefix) or not coords or not all(_COORD_RE.match(c) for c in coords):
        raise ValueError(f"invalid expert uid {uid!r}: expected prefix.i.j with integer coordinates")
    parsed = tuple(int(c) for c in coords)
    if max(parsed) >= MAX_COORDINATE:
        raise ValueError(f"invalid expert uid {uid!r}: coordinate too large")
    return prefix, parsed


def is_valid_uid(uid: Any) -> bool:
    try:
        parse_uid(uid)
        return True
    except ValueError:
        return False


def parse_uid_prefix(prefix: str) -> tuple[str, tuple[int, ...]]:
    """Like ``parse_uid`` but accepts zero coordinates: ``"ffn"`` -> ``("ffn", ())``."""
    if isinstance(prefix, str) and _PREFIX_RE.match(prefix):
        return prefix, ()
    return parse_uid(prefix)


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """Split ``"host:port"``; raise ValueError unless host is an IPv4 address or a hostname
    (letters, digits, ``-`` and ``.``) and port is in 1..65535."""
    if not isinstance(endpoint, str) or len(endpoint) > 260 or endpoint.count(":") != 1:
        raise ValueError(f"invalid endpoint {endpoint!r}: expected host:port")
    host, port_str = endpoint.split(":")
    if not _PORT_RE.match(port_str) or not 1 <= int(port_str) <= 65535:
        raise ValueError(f"invalid endpoint {endpoint!r}: port must be 1..65535")
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"invalid endpoint {endpoint!r}: bad IPv4 address") from None
    elif not _HOSTNAME_RE.match(host):
        raise ValueError(f"invalid endpoint {endpoint!r}: bad host name")
    return host, int(port_str)


def is_valid_endpoint(endpoint: Any) -> bool:
    try:
        parse_endpoint(endpoint)
        return True
    except ValueError:
        return False


def expert_key(uid: str) -> str:
    return EXPERT_KEY_PREFIX + uid


def prefix_key(prefix: str) -> str:
    return PREFIX_KEY_PREFIX + prefix


# ----------------------------------------------------------------------------- generic records
def _check_value(value: Any, depth: int = 0) -> bool:
    if depth > MAX_VALUE_DEPTH:
        return False
    if value is None or isinstance(value, (bool, str, bytes)):
        return True
    if isinstance(value, int):
        return -(1 << 63) <= value < (1 << 64)
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_check_value(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _check_value(v, depth + 1) for k, v in value.items())
    return False


def check_entry(subkey: Any, value: Any, expiration_time: Any, now: Optional[float] = None,
                check_size: bool = True) -> Optional[str]:
    """Return None when the entry is well-formed, else a short reason. Expired entries are
    well-formed (callers drop them separately). ``check_size=False`` skips the per-value
    size limit (for values decoded from a record already bounded by MAX_RECORD_BYTES)."""
    now = time.time() if now is None else now
    if not isinstance(subkey, str) or not 0 < len(subkey) <= MAX_SUBKEY_LENGTH:
        return "bad subkey"
    if isinstance(expiration_time, bool) or not isinstance(expiration_time, (int, float)):
        return "bad expiration type"
    if not math.isfinite(expiration_time) or expiration_time <= 0 or expiration_time > now + MAX_TTL:
        return "expiration out of bounds"
    try:
        if not _check_value(value) or (check_size and len(umsgpack.packb(value)) > MAX_VALUE_BYTES):
            return "bad or oversized value"
    except Exception:  # noqa: BLE001 - anything unpackable is invalid
        return "unencodable value"
    return None


def entry_size(subkey: str, value: Any, expiration_time: float) -> int:
    """Bytes this entry adds to an encoded record (msgpack maps are concatenations)."""
    return len(umsgpack.packb(subkey)) + len(umsgpack.packb([value, float(expiration_time)]))


def _map_header_size(n: int) -> int:
    return 1 if n < 16 else 3 if n < 65536 else 5


def cap_record(record: Record, max_bytes: int = MAX_RECORD_BYTES) -> Record:
    """Drop entries until the encoded record fits in ``max_bytes``.

    Rule: the entries that expire soonest are dropped first (ties: larger sub-key first), so
    the entries that hosts refreshed most recently survive. Returns a new dict.
    """
    sizes = {sk: entry_size(sk, v, e) for sk, (v, e) in record.items()}
    total = _map_header_size(len(record)) + sum(sizes.values())
    if total <= max_bytes:
        return dict(record)
    order = sorted(record, key=lambda sk: (record[sk][1], _neg_str(sk)))
    kept = dict(record)
    for sk in order:
        if total <= max_bytes:
            break
        del kept[sk]
        total -= sizes[sk]
        total += _map_header_size(len(kept)) - _map_header_size(len(kept) + 1)
    return kept


def _neg_str(s: str) -> tuple:
    return tuple(-ord(c) for c in s)


def encode_record(record: Mapping[str, tuple[Any, float]]) -> bytes:
    """msgpack ``{subkey: [value, expiration]}``; the caller keeps it under MAX_RECORD_BYTES."""
    return umsgpack.packb({sk: [v, float(e)] for sk, (v, e) in record.items()})


def split_record(record: Mapping[str, tuple[Any, float]], max_bytes: int = MAX_RECORD_BYTES) -> list[Record]:
    """Split a record into chunks that each encode to at most ``max_bytes`` (greedy)."""
    chunks: list[Record] = []
    current: Record = {}
    size = 5
    for sk, (v, e) in record.items():
        es = entry_size(sk, v, e)
        if current and size + es > max_bytes:
            chunks.append(current)
            current, size = {}, 5
        current[sk] = (v, float(e))
        size += es
    if current:
        chunks.append(current)
    return chunks


def decode_record(blob: Any, stats: Optional[Counter] = None, now: Optional[float] = None) -> Optional[Record]:
    """Decode and validate a record read from the network.

    Returns ``{subkey: (value, expiration)}`` with the live, valid entries (possibly empty),
    or None when the blob as a whole is unusable. Every skipped thing is counted in ``stats``:
    ``invalid_records`` (not bytes, too large, not msgpack, not a map) and ``invalid_entries``.
    """
    stats = stats if stats is not None else Counter()
    now = time.time() if now is None else now
    if not isinstance(blob, bytes) or len(blob) > MAX_RECORD_BYTES:
        stats["invalid_records"] += 1
        return None
    try:
        raw = umsgpack.unpackb(blob)
    except Exception:  # noqa: BLE001 - malformed input of any kind
        stats["invalid_records"] += 1
        return None
    if not isinstance(raw, dict) or len(raw) > MAX_ENTRIES:
        stats["invalid_records"] += 1
        return None
    record: Record = {}
    for subkey, entry in raw.items():
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            stats["invalid_entries"] += 1
            continue
        value, expiration = entry
        if check_entry(subkey, value, expiration, now, check_size=False) is not None:
            stats["invalid_entries"] += 1
            continue
        if expiration > now:
            record[subkey] = (value, float(expiration))
    return record


def merge_records(records: Iterable[Optional[Mapping[str, tuple[Any, float]]]], now: Optional[float] = None) -> Record:
    """Union of records: per sub-key the entry with the latest expiration; expired ones dropped."""
    now = time.time() if now is None else now
    merged: Record = {}
    for record in records:
        if not record:
            continue
        for sk, (v, e) in record.items():
            if e > now and (sk not in merged or e > merged[sk][1]):
                merged[sk] = (v, e)
    return merged


# ----------------------------------------------------------------------------- expert records
def expert_entries(uids: Sequence[str], endpoint: str, expiration_time: float) -> dict[str, Record]:
    """The records that declare ``uids`` at ``endpoint``: ``{key: {subkey: (value, expiration)}}``.

    Raises ValueError on a malformed uid or endpoint (a programming error on the caller's side).
    """
    parse_endpoint(endpoint)
    expiration_time = float(expiration_time)
    records: dict[str, Record] = {}
    for uid in uids:
        prefix, coords = parse_uid(uid)
        records.setdefault(expert_key(uid), {})[endpoint] = (endpoint, expiration_time)
        parent = prefix
        for coord in coords:
            records.setdefault(prefix_key(parent), {})[str(coord)] = (endpoint, expiration_time)
            parent = f"{parent}.{coord}"
    return records


def pick_endpoint(record: Mapping[str, tuple[Any, float]], stats: Optional[Counter] = None) -> Optional[str]:
    """The endpoint of the latest-expiring valid entry of an ``expert:`` record, or None."""
    best: Optional[tuple[float, str]] = None
    for _, (value, expiration) in record.items():
        if not is_valid_endpoint(value):
            if stats is not None:
                stats["invalid_expert_entries"] += 1
            continue
        if best is None or expiration > best[0]:
            best = (expiration, value)
    return None if best is None else best[1]


def parse_children(record: Mapping[str, tuple[Any, float]], stats: Optional[Counter] = None) -> dict[int, str]:
    """``{coordinate: endpoint}`` from a ``prefix:`` record, skipping (and counting) bad entries."""
    children: dict[int, str] = {}
    for subkey, (value, _) in record.items():
        if not isinstance(subkey, str) or not _COORD_RE.match(subkey) or int(subkey) >= MAX_COORDINATE \
                or not is_valid_endpoint(value):
            if stats is not None:
                stats["invalid_prefix_entries"] += 1
            continue
        children[int(subkey)] = value
    return children
