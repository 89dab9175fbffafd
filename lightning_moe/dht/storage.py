"""Local storage of a DHT node: sub-key records with per-entry expiry, bounded in bytes, with
fair eviction between the addresses that wrote them.

Every entry remembers its *source*: the ``"ip:port"`` that sent it to this node (``""`` for this
node's own writes). Three bounds apply, each evicting entries rather than refusing new ones:

* **Per record** (``MAX_RECORD_BYTES``, under the 8 KB datagram): when a merge makes a record
  larger, entries are dropped from the IP address holding the most bytes in that record, within
  it from its source holding the most, and of that source the entry expiring soonest. So a
  flood from one address pushes out only its own entries: an honest host's few entries under a
  prefix survive any number of a stranger's, whatever expirations the stranger claims.
* **Per source** (``max_bytes_per_source``): a source over its quota loses its own
  soonest-expiring entries, across all keys.
* **Per node** (``max_bytes``): over the total, the source holding the most bytes loses its
  soonest-expiring entries.

Sizes are accounted as the msgpack size of each entry plus a fixed overhead per entry and per key
(``ENTRY_OVERHEAD``, ``KEY_OVERHEAD``: roughly what CPython spends on the dicts and tuples), so
``bytes_used`` tracks the memory the storage holds. A source is charged for its entries and for
the keys it created (until they are gone). Expiration times beyond ``max_ttl`` are
invalid (``records.decode_record``), so nothing lingers longer than that unless re-declared.

With a ``secret`` (a private swarm), only entries whose tag verifies are stored; the rest are
counted as ``unauthenticated_entries`` and a store left with none is refused.

With a ``verifier`` (``verify.EndpointVerifier``), a stranger's expert declaration (a ``"coord@endpoint"`` sub-key)
is served only once its endpoint answered that it serves an expert there: until then it is stored but not served,
and a store asks for at most one check. Entries whose endpoint failed its check are refused and dropped
(``unverified_entries_refused``, ``unverified_entries_dropped``). Evictions take entries not verified first, and
group writers by network (``net.addresses.netgroup``: /24, /48) before address, so many addresses of one network
weigh as one; of verified entries, those of endpoints that have answered well for ``LONG_LIVED`` go last. This
node's own writes are trusted.
"""
from __future__ import annotations

import functools
import heapq
import time
from collections import Counter, OrderedDict
from typing import Any, Iterator, Optional

from ..net.addresses import netgroup
from .records import MAX_RECORD_BYTES, MAX_TTL, Record, decode_record, encode_record, entry_size, parse_child_subkey
from .verify import FAILED, VERIFIED, EndpointVerifier

MAX_STORAGE_BYTES = 64 * 1024 * 1024
MAX_BYTES_PER_SOURCE = 2 * 1024 * 1024
ENTRY_OVERHEAD = 400  # CPython objects per entry beyond its msgpack bytes (dict slot, tuples, str, float, meta)
KEY_OVERHEAD = 800  # per key: its dicts and bookkeeping
BLOB_CACHE_KEYS = 256
LOCAL = ""  # the source of this node's own writes
LONG_LIVED = 600.0  # seconds an endpoint has answered well before its entries are the last a full record evicts


class _Meta:
    __slots__ = ("source", "size")

    def __init__(self, source: str, size: int):
        self.source, self.size = source, size


@functools.lru_cache(maxsize=4096)
def _network(source: str) -> str:
    return netgroup(source.rpartition(":")[0])


def _header(n: int) -> int:
    return 1 if n < 16 else 3 if n < 65536 else 5


class SubkeyStorage:
    """Per 20-byte key digest, ``subkey -> (value, expiration[, tag])``, merged on every write
    (per sub-key the later expiration wins, so concurrent writers of one key lose nothing).
    Reads only ever see live entries, so a republish cannot resurrect an expired one."""

    def __init__(self, stats: Optional[Counter] = None, max_keys: int = 100_000, secret: Optional[bytes] = None,
                 max_bytes: int = MAX_STORAGE_BYTES, max_bytes_per_source: int = MAX_BYTES_PER_SOURCE,
                 max_ttl: float = MAX_TTL, verifier: Optional[EndpointVerifier] = None):
        self.stats = stats if stats is not None else Counter()
        self.max_keys, self.secret = max_keys, secret
        self.max_bytes, self.max_bytes_per_source, self.max_ttl = max_bytes, max_bytes_per_source, max_ttl
        self._data: dict[bytes, Record] = {}
        self._meta: dict[bytes, dict[str, _Meta]] = {}
        self._written: dict[bytes, float] = {}  # monotonic time of the last write, for republish
        self._blobs: "OrderedDict[bytes, tuple]" = OrderedDict()  # LRU of (encoding, expiry, verifier generation)
        self._source_bytes: Counter = Counter()
        self._key_owner: dict[bytes, str] = {}
        self._by_source: dict[str, list] = {}  # source -> heap of (expiration, key, subkey), lazily pruned
        self.bytes_used = 0
        self.verifier = verifier
        self._by_endpoint: dict[str, set[tuple[bytes, str]]] = {}  # strangers' declarations, per endpoint
        if verifier is not None:
            verifier.listeners.append(self.revisit)

    # ------------------------------------------------------------------ accounting
    def _add(self, key: bytes, subkey: str, entry: tuple, source: str) -> None:
        record, meta = self._data.get(key), self._meta.get(key)
        if record is None:
            record, meta = self._data[key], self._meta[key] = {}, {}
            self.bytes_used += KEY_OVERHEAD
            self._key_owner[key] = source  # charged the key's own overhead until the key goes
            self._source_bytes[source] += KEY_OVERHEAD
        elif subkey in record:
            self._remove(key, subkey, drop_empty=False)
        size = entry_size(subkey, entry[0], entry[1], entry[2] if len(entry) > 2 else None)
        record[subkey] = entry
        self._blobs.pop(key, None)  # the cached encoding lacks the new entry
        meta[subkey] = _Meta(source, size)
        child = self._child(subkey, source)
        if child is not None:
            self._by_endpoint.setdefault(child[1], set()).add((key, subkey))
        self.bytes_used += size + ENTRY_OVERHEAD
        self._source_bytes[source] += size + ENTRY_OVERHEAD
        heap = self._by_source.setdefault(source, [])
        heapq.heappush(heap, (entry[1], key, subkey))
        if len(heap) > 64 and len(heap) > 3 * self._source_bytes[source] // ENTRY_OVERHEAD:
            self._by_source[source] = [item for item in heap if self._owns(source, *item)]
            heapq.heapify(self._by_source[source])

    def _child(self, subkey: str, source: str) -> Optional[tuple[int, str]]:
        """(coordinate, endpoint) of a stranger's expert declaration that must be checked; None for anything else."""
        if self.verifier is None or source == LOCAL:
            return None
        return parse_child_subkey(subkey)

    def _verdict(self, key: bytes, subkey: str, source: str) -> str:
        child = self._child(subkey, source)
        return VERIFIED if child is None else self.verifier.verdict(key, child[0], child[1])

    def _serves(self, key: bytes, subkey: str) -> bool:
        return self._verdict(key, subkey, self._meta[key][subkey].source) == VERIFIED

    def _rank(self, key: bytes, subkey: str) -> int:
        """Which entries a full record keeps last: 0 not verified, 1 verified lately, 2 verified for
        ``LONG_LIVED`` seconds or more (and this node's own writes, and anything not an expert declaration)."""
        child = self._child(subkey, self._meta[key][subkey].source)
        if child is None:
            return 2
        if self.verifier.verdict(key, child[0], child[1]) != VERIFIED:
            return 0
        return 2 if self.verifier.verified_for(child[1]) >= LONG_LIVED else 1

    def revisit(self, endpoint: str) -> None:
        """``endpoint`` was checked: drop its entries that failed (the listener of the verifier)."""
        for key, subkey in list(self._by_endpoint.get(endpoint, ())):
            if key in self._data and subkey in self._data[key] and \
                    self._verdict(key, subkey, self._meta[key][subkey].source) == FAILED:
                self._remove(key, subkey)
                self.stats["unverified_entries_dropped"] += 1

    def _owns(self, source: str, expiration: float, key: bytes, subkey: str) -> bool:
        record = self._data.get(key)
        entry = record.get(subkey) if record is not None else None
        return entry is not None and entry[1] == expiration and self._meta[key][subkey].source == source

    def _remove(self, key: bytes, subkey: str, drop_empty: bool = True) -> None:
        record, meta = self._data[key], self._meta[key]
        del record[subkey]
        m = meta.pop(subkey)
        child = self._child(subkey, m.source)
        if child is not None:
            entries = self._by_endpoint.get(child[1])
            if entries is not None:
                entries.discard((key, subkey))
                if not entries:
                    del self._by_endpoint[child[1]]
        self.bytes_used -= m.size + ENTRY_OVERHEAD
        self._source_bytes[m.source] -= m.size + ENTRY_OVERHEAD
        if self._source_bytes[m.source] <= 0:
            del self._source_bytes[m.source]
            self._by_source.pop(m.source, None)
        self._blobs.pop(key, None)
        if drop_empty and not record:
            self._forget(key)

    def _forget(self, key: bytes) -> None:
        for subkey in list(self._data.get(key, ())):
            self._remove(key, subkey, drop_empty=False)
        if self._data.pop(key, None) is not None:
            self.bytes_used -= KEY_OVERHEAD
            owner = self._key_owner.pop(key)
            self._source_bytes[owner] -= KEY_OVERHEAD
            if self._source_bytes[owner] <= 0:
                del self._source_bytes[owner]
                self._by_source.pop(owner, None)
        self._meta.pop(key, None)
        self._written.pop(key, None)
        self._blobs.pop(key, None)

    def _evict_from(self, source: str) -> bool:
        """Drop ``source``'s entry that expires soonest; False if it holds none."""
        heap = self._by_source.get(source)
        while heap:
            expiration, key, subkey = heapq.heappop(heap)
            if self._owns(source, expiration, key, subkey):
                self._remove(key, subkey)
                return True
        return False

    def _enforce_quotas(self, source: str) -> None:
        if source != LOCAL:
            while self._source_bytes.get(source, 0) > self.max_bytes_per_source and self._evict_from(source):
                self.stats["entries_evicted_by_source_quota"] += 1
        exhausted: set[str] = set()  # sources charged only for keys that now hold others' entries
        while self.bytes_used > self.max_bytes or len(self._data) > self.max_keys:
            candidates = [s for s in self._source_bytes if s not in exhausted]
            if not candidates:
                break
            networks: Counter = Counter()
            for s in candidates:
                networks[_network(s)] += self._source_bytes[s]
            net = max(networks, key=networks.__getitem__)
            biggest = max((s for s in candidates if _network(s) == net), key=self._source_bytes.__getitem__)
            if self._evict_from(biggest):
                self.stats["entries_evicted_by_storage_cap"] += 1
            else:
                exhausted.add(biggest)

    def _fair_cap(self, key: bytes) -> None:
        """Fit the record under ``key`` in MAX_RECORD_BYTES: evict entries not verified first, then those verified
        lately, then long-lived ones (``_rank``); within a rank, from the network holding the most bytes of it, its
        largest source, that source's soonest-expiring entry (ties: larger sub-key)."""
        record, meta = self._data[key], self._meta[key]
        total = _header(len(record)) + sum(m.size for m in meta.values())
        if total <= MAX_RECORD_BYTES:
            return
        ranks: dict[int, tuple[Counter, Counter, dict[str, list]]] = {}
        for subkey, m in meta.items():
            net_bytes, src_bytes, queues = ranks.setdefault(self._rank(key, subkey), (Counter(), Counter(), {}))
            net_bytes[_network(m.source)] += m.size
            src_bytes[m.source] += m.size
            queues.setdefault(m.source, []).append((record[subkey][1], [-ord(c) for c in subkey], subkey))
        for rank in sorted(ranks):
            net_bytes, src_bytes, queues = ranks[rank]
            for queue in queues.values():
                queue.sort(reverse=True)  # soonest expiring last
            while total > MAX_RECORD_BYTES and net_bytes:
                net = max(net_bytes, key=lambda n: (net_bytes[n], n))
                source = max((s for s in src_bytes if _network(s) == net), key=lambda s: (src_bytes[s], s))
                subkey = queues[source].pop()[2]
                size = meta[subkey].size
                self._remove(key, subkey, drop_empty=False)
                total += _header(len(record)) - _header(len(record) + 1) - size
                net_bytes[net] -= size
                src_bytes[source] -= size
                if not net_bytes[net]:
                    del net_bytes[net]
                if not src_bytes[source]:
                    del src_bytes[source]
                self.stats["entries_dropped_by_size_cap"] += 1

    # ------------------------------------------------------------------ writes
    def merge(self, key: bytes, record: Record, now: Optional[float] = None, source: str = LOCAL) -> bool:
        """Merge validated entries from ``source`` into the record under ``key``. False if
        ``record`` held no live entry (True also when a newer entry here supersedes it)."""
        now = time.time() if now is None else now
        if not any(entry[1] > now for entry in record.values()):
            return False
        self._live(key, now)
        current = self._data.get(key, {})
        changed, asked = False, False
        for subkey, entry in record.items():
            if entry[1] > now and (subkey not in current or entry[1] > current[subkey][1]):
                child = self._child(subkey, source)
                if child is not None:
                    verdict = self.verifier.verdict(key, *child)
                    if verdict == FAILED:
                        self.stats["unverified_entries_refused"] += 1
                        continue
                    if not asked and self.verifier.due(child[1]):  # one check per store (per datagram) at most
                        asked = True
                        self.verifier.request(child[1])
                self._add(key, subkey, tuple(entry), source)
                current = self._data[key]
                changed = True
        if changed:
            self._fair_cap(key)
            self._enforce_quotas(source)
        if key in self._data:
            self._written[key] = time.monotonic()
        return True

    def store_blob(self, key: bytes, blob: Any, source: str = LOCAL) -> bool:
        """Decode, validate (and with a secret, authenticate) ``blob`` and merge it under ``key``.
        False (counted as ``rejected_stores``) when nothing in it was stored."""
        if not (isinstance(key, bytes) and len(key) == 20):
            self.stats["rejected_stores"] += 1
            return False
        record = decode_record(blob, self.stats, secret=self.secret, dkey=key, max_ttl=self.max_ttl)
        if record is None or not self.merge(key, record, source=source):
            self.stats["rejected_stores"] += 1
            return False
        return True

    # ------------------------------------------------------------------ reads
    def _live(self, key: bytes, now: float) -> Optional[Record]:
        record = self._data.get(key)
        if record is None:
            return None
        expired = [sk for sk, entry in record.items() if entry[1] <= now]
        for subkey in expired:
            self._remove(key, subkey)
        return dict(record) if key in self._data else None

    def get_record(self, key: bytes, now: Optional[float] = None) -> Optional[Record]:
        """Live entries under ``key`` that this node serves (strangers' declarations: once verified) as a dict, or None."""
        record = self._live(key, time.time() if now is None else now)
        if record is None or self.verifier is None:
            return record
        served = {subkey: entry for subkey, entry in record.items() if self._serves(key, subkey)}
        return served or None

    def get(self, key: bytes, default: Any = None) -> Any:
        """The encoded live record (what is sent to peers), or ``default``."""
        now = time.time()
        generation = None if self.verifier is None else self.verifier.generation
        cached = self._blobs.get(key)
        if cached is not None and cached[1] > now and cached[2] == generation:
            self._blobs.move_to_end(key)
            return cached[0]
        record = self.get_record(key, now)
        if not record:
            return default
        blob = encode_record(record)
        self._blobs[key] = (blob, min(entry[1] for entry in record.values()), generation)
        while len(self._blobs) > BLOB_CACHE_KEYS:
            self._blobs.popitem(last=False)
        return blob

    def cull(self) -> int:
        """Drop every expired entry; return the number of keys left."""
        now = time.time()
        for key in list(self._data):
            self._live(key, now)
        return len(self._data)

    def iter_older_than(self, seconds_old: float) -> list[tuple[bytes, bytes]]:
        """(key, encoded live record) for keys last written more than ``seconds_old`` ago."""
        threshold = time.monotonic() - seconds_old
        out = []
        for key in [k for k, t in self._written.items() if t <= threshold]:
            blob = self.get(key)
            if blob is not None:
                out.append((key, blob))
        return out

    def keys(self) -> list[bytes]:
        return list(self._data)

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        out = []
        for key in list(self._data):
            blob = self.get(key)
            if blob is not None:
                out.append((key, blob))
        return iter(out)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: bytes) -> bool:
        return self.get(key) is not None
