"""Generic sub-key records and expert / prefix records, with validation.

Two layers live here:

* **Generic records** (what goes over the wire and into storage): a record is a map
  ``subkey -> (value, expiration_time[, tag])``. It travels through kademlia as one msgpack
  blob ``{subkey: [value, expiration]}`` or ``{subkey: [value, expiration, tag]}``
  (``encode_record`` / ``decode_record``), never pickle. ``decode_record`` validates every
  entry (types, sizes, expiry bounds) and skips what does not parse, counting it.

* **Private swarms**: a node with a secret (``lightning_moe.auth``) appends to each entry it
  writes a tag, the hex HMAC-SHA256 of (key digest, sub-key, msgpack of the value, expiration
  as a big-endian double) (``entry_tag``). Such a node stores and reads only entries whose tag
  verifies; the rest are skipped and counted as ``unauthenticated_entries``. Nodes without a
  secret keep and pass on tags without checking them: there is one format. The tag is part of
  each entry's encoded size, so the size caps below account for it (66 bytes per entry).

* **Expert records** built on top of them. For a grid uid ``ffn.3.14`` served at ``endpoint``:

  ===================  ====================  ==========
  key                  sub-key               value
  ===================  ====================  ==========
  ``prefix:ffn.3``     ``"14@"`` + endpoint  None
  ``prefix:ffn``       ``"3@"`` + endpoint   None
  ===================  ====================  ==========

  The entries of the last grid dimension say which host serves which uid, so ``get_experts``
  reads the parent prefix records: there are no per-uid records (a 4x4 grid declares 5 keys,
  not 21).

  A prefix record lists the live children of that prefix (one coordinate of the next grid
  dimension each), so beam search walks the grid one dimension at a time. Each host writes
  its own entry per child: ``"coord@endpoint"`` says that the host at ``endpoint`` serves a
  live expert below the child; for the last grid dimension, that it serves exactly that uid.

  Anyone can write any key, so readers take endpoints from *sub-keys* and ignore values: a
  writer can add (child, endpoint) pairs, or keep an existing pair alive longer, but cannot
  redirect or hide another host's pair, whatever value or expiration it claims (merging keeps
  one entry per sub-key: the latest-expiring, so with a value as the endpoint, a stranger's
  far-future entry would have replaced the host's). When several endpoints serve one child,
  readers order them latest-expiring first and can ask for all of them, so a trainer can fall
  back from one that fails to the next. The size cap of a stored record evicts from the address
  holding the most bytes of it (``storage.SubkeyStorage``), so a flood from one address cannot
  push the other hosts' entries out.
"""
from __future__ import annotations

import ipaddress
import math
import re
import time
import struct
from collections import Counter
from typing import Any, Iterable, Mapping, Optional, Sequence

import umsgpack

from .. import auth

Record = dict  # subkey (str) -> (value, expiration_time: float) or (value, expiration_time, tag: str)

MAX_KEY_LENGTH = 256
MAX_SUBKEY_LENGTH = 300  # room for "coord@" + a 260-character endpoint
TAG_LENGTH = 64  # hex HMAC-SHA256
MAX_VALUE_BYTES = 2048  # msgpack size of one value
MAX_RECORD_BYTES = 6000  # msgpack size of one stored or transmitted record; UDP request limit is 8192
MAX_ENTRIES = 1024
MAX_VALUE_DEPTH = 8
MAX_TTL = 300.0  # default cap: an expiration time further ahead than this is invalid (node setting ``max_ttl``)
# Hosts declare ``now + 2 * update_period`` (periods of 5-30 s by default); a stranger's entries
# live at most this long unless refreshed, so a flood ages out within minutes.
MAX_CLOCK_SKEW = 30.0  # records read or stored may expire this much later than max_ttl (peers' clocks differ)
MAX_COORDINATE = 1 << 20

EXPERT_KEY_PREFIX = "expert:"
PREFIX_KEY_PREFIX = "prefix:"

_PREFIX_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*\Z")
_COORD_RE = re.compile(r"(0|[1-9][0-9]{0,6})\Z")
_HOSTNAME_RE = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z")
_PORT_RE = re.compile(r"[1-9][0-9]{0,4}\Z")
_TAG_RE = re.compile(r"[0-9a-f]{64}\Z")
_TAG_DOMAIN = b"lightning_moe.dht.entry.v1"


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
    """The key of the per-uid records of earlier versions (none are written now; kept for callers)."""
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
                check_size: bool = True, max_ttl: float = MAX_TTL) -> Optional[str]:
    """Return None when the entry is well-formed, else a short reason. Expired entries are
    well-formed (callers drop them separately). ``check_size=False`` skips the per-value
    size limit (for values decoded from a record already bounded by MAX_RECORD_BYTES)."""
    now = time.time() if now is None else now
    if not isinstance(subkey, str) or not 0 < len(subkey) <= MAX_SUBKEY_LENGTH:
        return "bad subkey"
    if isinstance(expiration_time, bool) or not isinstance(expiration_time, (int, float)):
        return "bad expiration type"
    if not math.isfinite(expiration_time) or expiration_time <= 0 or expiration_time > now + max_ttl:
        return "expiration out of bounds"
    try:
        if not _check_value(value) or (check_size and len(umsgpack.packb(value)) > MAX_VALUE_BYTES):
            return "bad or oversized value"
    except Exception:  # noqa: BLE001 - anything unpackable is invalid
        return "unencodable value"
    return None


def entry_size(subkey: str, value: Any, expiration_time: float, tag: Optional[str] = None) -> int:
    """Bytes this entry adds to an encoded record (msgpack maps are concatenations); a tag
    adds 66 bytes."""
    body = [value, float(expiration_time)] if tag is None else [value, float(expiration_time), tag]
    return len(umsgpack.packb(subkey)) + len(umsgpack.packb(body))


def _entry_size(subkey: str, entry: tuple) -> int:
    return entry_size(subkey, entry[0], entry[1], entry[2] if len(entry) > 2 else None)


def _wire_entry(entry: tuple) -> list:
    return [entry[0], float(entry[1])] if len(entry) < 3 or entry[2] is None else [entry[0], float(entry[1]), entry[2]]


def encode_record(record: Mapping[str, tuple]) -> bytes:
    """msgpack ``{subkey: [value, expiration(, tag)]}``; the caller keeps it under MAX_RECORD_BYTES."""
    return umsgpack.packb({sk: _wire_entry(entry) for sk, entry in record.items()})


def split_record(record: Mapping[str, tuple], max_bytes: int = MAX_RECORD_BYTES) -> list[Record]:
    """Split a record into chunks that each encode to at most ``max_bytes`` (greedy)."""
    chunks: list[Record] = []
    current: Record = {}
    size = 5
    for sk, entry in record.items():
        es = _entry_size(sk, entry)
        if current and size + es > max_bytes:
            chunks.append(current)
            current, size = {}, 5
        current[sk] = tuple(entry)
        size += es
    if current:
        chunks.append(current)
    return chunks


def entry_tag(secret: bytes, dkey: bytes, subkey: str, value: Any, expiration_time: float) -> str:
    """The authentication tag of one entry under the 20-byte key digest ``dkey`` (hex HMAC)."""
    return auth.sign(secret, _TAG_DOMAIN, dkey, subkey.encode("utf-8", "surrogatepass"), umsgpack.packb(value),
                     struct.pack(">d", float(expiration_time)))


def sign_record(secret: bytes, dkey: bytes, record: Mapping[str, tuple]) -> Record:
    """``record`` with every entry tagged (existing tags replaced)."""
    return {sk: (entry[0], float(entry[1]), entry_tag(secret, dkey, sk, entry[0], entry[1]))
            for sk, entry in record.items()}


def is_authentic(secret: bytes, dkey: bytes, subkey: str, entry: tuple) -> bool:
    return len(entry) > 2 and entry[2] is not None and auth.verify(
        secret, entry[2], _TAG_DOMAIN, dkey, subkey.encode("utf-8", "surrogatepass"), umsgpack.packb(entry[0]),
        struct.pack(">d", float(entry[1])))


def strip_tags(record: Mapping[str, tuple]) -> dict[str, tuple[Any, float]]:
    """``{subkey: (value, expiration)}``: what users of the DHT see."""
    return {sk: (entry[0], entry[1]) for sk, entry in record.items()}


def decode_record(blob: Any, stats: Optional[Counter] = None, now: Optional[float] = None,
                  secret: Optional[bytes] = None, dkey: Optional[bytes] = None,
                  max_ttl: float = MAX_TTL) -> Optional[Record]:
    """Decode and validate a record read from the network.

    Returns ``{subkey: (value, expiration[, tag])}`` with the live, valid entries (possibly
    empty), or None when the blob as a whole is unusable. Every skipped thing is counted in
    ``stats``: ``invalid_records`` (not bytes, too large, not msgpack, not a map),
    ``invalid_entries``, and, when ``secret`` is given (then ``dkey``, the key digest, is
    needed too), ``unauthenticated_entries``: live entries without a valid tag, of which those
    that carry a well-formed tag (signed with another secret, or forged) are also counted as
    ``foreign_tag_entries``. Entries expiring more than ``max_ttl`` (plus ``MAX_CLOCK_SKEW``)
    seconds ahead are invalid.
    """
    stats = stats if stats is not None else Counter()
    now = time.time() if now is None else now
    if secret is not None and not (isinstance(dkey, bytes) and len(dkey) == 20):
        raise ValueError("checking tags needs the 20-byte key digest")
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
        if not isinstance(entry, (list, tuple)) or len(entry) not in (2, 3) \
                or (len(entry) == 3 and not (isinstance(entry[2], str) and _TAG_RE.match(entry[2]))):
            stats["invalid_entries"] += 1
            continue
        value, expiration = entry[0], entry[1]
        if check_entry(subkey, value, expiration, now, check_size=False, max_ttl=max_ttl + MAX_CLOCK_SKEW) is not None:
            stats["invalid_entries"] += 1
            continue
        if expiration <= now:
            continue
        entry = (value, float(expiration)) if len(entry) == 2 else (value, float(expiration), entry[2])
        if secret is not None and not is_authentic(secret, dkey, subkey, entry):
            stats["unauthenticated_entries"] += 1
            if len(entry) > 2:
                stats["foreign_tag_entries"] += 1
            continue
        record[subkey] = entry
    return record


def merge_records(records: Iterable[Optional[Mapping[str, tuple]]], now: Optional[float] = None) -> Record:
    """Union of records: per sub-key the entry with the latest expiration; expired ones dropped."""
    now = time.time() if now is None else now
    merged: Record = {}
    for record in records:
        if not record:
            continue
        for sk, entry in record.items():
            if entry[1] > now and (sk not in merged or entry[1] > merged[sk][1]):
                merged[sk] = entry
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
        parent = prefix
        for coord in coords:
            records.setdefault(prefix_key(parent), {})[f"{coord}@{endpoint}"] = (None, expiration_time)
            parent = f"{parent}.{coord}"
    return records


def parent_and_coordinate(uid: str) -> tuple[str, int]:
    """``"ffn.3.14"`` -> ``("ffn.3", 14)``: the prefix whose record lists ``uid``'s hosts."""
    prefix, coords = parse_uid(uid)
    return ".".join([prefix, *map(str, coords[:-1])]), coords[-1]


def parse_child_subkey(subkey: Any) -> Optional[tuple[int, str]]:
    """``"14@127.0.0.1:7000"`` -> ``(14, "127.0.0.1:7000")``: a prefix record's entry; None for any other sub-key."""
    if not isinstance(subkey, str):
        return None
    coord, _, endpoint = subkey.partition("@")
    if not _COORD_RE.match(coord) or int(coord) >= MAX_COORDINATE or not is_valid_endpoint(endpoint):
        return None
    return int(coord), endpoint


def parse_children_endpoints(record: Mapping[str, tuple], stats: Optional[Counter] = None) -> dict[int, list[str]]:
    """``{coordinate: [endpoint, ...]}`` from a ``prefix:`` record, latest-expiring first,
    skipping (and counting as ``invalid_prefix_entries``) entries whose sub-key is not
    ``"coord@endpoint"``. Values are ignored (see the module docstring)."""
    found: dict[int, list[tuple[float, str]]] = {}
    for subkey, entry in record.items():
        child = parse_child_subkey(subkey)
        if child is None:
            if stats is not None:
                stats["invalid_prefix_entries"] += 1
            continue
        found.setdefault(child[0], []).append((entry[1], child[1]))
    return {coord: [e for _, e in sorted(found[coord], key=lambda pair: (-pair[0], pair[1]))] for coord in sorted(found)}
