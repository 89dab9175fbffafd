"""Local storage of a DHT node: sub-key records with per-entry expiry, merged on every write."""
from __future__ import annotations

import time
from collections import Counter, OrderedDict
from typing import Any, Iterator, Optional

from kademlia.storage import IStorage

from .records import MAX_RECORD_BYTES, Record, cap_record, decode_record, encode_record


class SubkeyStorage(IStorage):
    """kademlia storage that keeps, per 20-byte key digest, ``subkey -> (value, expiration)``.

    * A write *merges* into the record: per sub-key the entry with the later expiration wins,
      so concurrent writers of one key (many hosts declaring children of one prefix) lose nothing.
    * Expired entries are dropped on every read and write; ``get`` / ``__iter__`` /
      ``iter_older_than`` (what kademlia answers and republishes) only ever see live entries,
      so a republish cannot resurrect an expired entry.
    * Size rule: a record never encodes to more than ``MAX_RECORD_BYTES`` (6000 B, under the
      8 KB datagram limit). When a merge makes it larger, the entries that expire soonest are
      dropped first (see ``records.cap_record``).
    * At most ``max_keys`` keys; beyond that the least recently written key is evicted.

    * With a ``secret`` (a private swarm), only entries whose tag verifies are stored; the rest
      are counted as ``unauthenticated_entries``, and a store left with none is refused. Without
      one, tags are kept and passed on unchecked.

    Values handed to ``__setitem__`` / ``store_blob`` are encoded blobs from the network: they are
    decoded and validated (``records.decode_record``); an invalid blob is refused and counted.
    """

    def __init__(self, stats: Optional[Counter] = None, max_keys: int = 100_000, secret: Optional[bytes] = None):
        self.stats = stats if stats is not None else Counter()
        self.max_keys = max_keys
        self.secret = secret
        self._data: "OrderedDict[bytes, Record]" = OrderedDict()
        self._written: dict[bytes, float] = {}  # monotonic time of the last write, for republish
        self._blobs: dict[bytes, tuple[bytes, float]] = {}  # cached encoding, valid until min expiry

    # ------------------------------------------------------------------ writes
    def merge(self, key: bytes, record: Record, now: Optional[float] = None) -> bool:
        """Merge validated entries into the record under ``key``. False if ``record`` held no
        live entry (True also when a newer entry already here supersedes it)."""
        now = time.time() if now is None else now
        if not any(entry[1] > now for entry in record.values()):
            return False
        current = self._live(key, now) or {}
        changed = False
        for subkey, entry in record.items():
            if entry[1] > now and (subkey not in current or entry[1] > current[subkey][1]):
                current[subkey] = entry
                changed = True
        if changed:
            blob = encode_record(current)
            if len(blob) > MAX_RECORD_BYTES:
                capped = cap_record(current, MAX_RECORD_BYTES)
                self.stats["entries_dropped_by_size_cap"] += len(current) - len(capped)
                current, blob = capped, encode_record(capped)
            self._data[key] = current
            self._blobs[key] = (blob, min(entry[1] for entry in current.values()))
        self._data.move_to_end(key)
        self._written[key] = time.monotonic()
        while len(self._data) > self.max_keys:
            old, _ = self._data.popitem(last=False)
            self._written.pop(old, None)
            self._blobs.pop(old, None)
        return True

    def store_blob(self, key: bytes, blob: Any) -> bool:
        """Decode, validate (and with a secret, authenticate) ``blob`` and merge it under ``key``.
        False (counted as ``rejected_stores``) when nothing in it was stored."""
        if not (isinstance(key, bytes) and len(key) == 20):
            self.stats["rejected_stores"] += 1
            return False
        record = decode_record(blob, self.stats, secret=self.secret, dkey=key)
        if record is None or not self.merge(key, record):
            self.stats["rejected_stores"] += 1
            return False
        return True

    def __setitem__(self, key: bytes, value: Any) -> None:
        if not self.store_blob(key, value):
            raise ValueError("invalid record")

    # ------------------------------------------------------------------ reads
    def _live(self, key: bytes, now: float) -> Optional[Record]:
        record = self._data.get(key)
        if record is None:
            return None
        if any(entry[1] <= now for entry in record.values()):
            record = {sk: ve for sk, ve in record.items() if ve[1] > now}
            self._blobs.pop(key, None)
            if record:
                self._data[key] = record
            else:
                self._forget(key)
                return None
        return dict(record)

    def _forget(self, key: bytes) -> None:
        self._data.pop(key, None)
        self._written.pop(key, None)
        self._blobs.pop(key, None)

    def get_record(self, key: bytes, now: Optional[float] = None) -> Optional[Record]:
        """Live entries under ``key`` as a dict, or None."""
        return self._live(key, time.time() if now is None else now)

    def get(self, key: bytes, default: Any = None) -> Any:
        """The encoded live record (what kademlia sends to peers), or ``default``."""
        now = time.time()
        cached = self._blobs.get(key)
        if cached is not None and cached[1] > now:
            return cached[0]
        record = self._live(key, now)
        if not record:
            return default
        blob = encode_record(record)
        self._blobs[key] = (blob, min(entry[1] for entry in record.values()))
        return blob

    def __getitem__(self, key: bytes) -> bytes:
        blob = self.get(key)
        if blob is None:
            raise KeyError(key)
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
