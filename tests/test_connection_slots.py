"""ConnectionSlots: limits per address and per network, and eviction from the network holding the most slots."""

from __future__ import annotations

from lightning_moe.server.slots import ConnectionSlots


class Conn:
    """A connection that the slots may evict: it releases its slot, as the host's do."""

    def __init__(self, slots: ConnectionSlots, address: str):
        self.slots, self.address, self.evicted = slots, address, False

    def evict(self) -> None:
        self.evicted = True
        self.slots.release(self.address, self)


def connect(slots: ConnectionSlots, address: str) -> Conn | None:
    conn = Conn(slots, address)
    return conn if slots.admit(address, conn) else None


def test_per_address_and_per_network_limits():
    slots = ConnectionSlots(100, max_per_address=3, max_per_network=5)
    assert all(connect(slots, "10.0.0.1") for _ in range(3)) and connect(slots, "10.0.0.1") is None
    assert connect(slots, "10.0.0.2") and connect(slots, "10.0.0.3")
    assert connect(slots, "10.0.0.4") is None  # the /24 holds its 5
    assert connect(slots, "10.0.1.4")  # the next /24 does not
    assert slots.open == 6 and slots.refused == 2 and slots.networks() == 2 and slots.addresses() == 4


def test_a_full_host_evicts_from_the_largest_network_for_a_newcomer_from_a_smaller_one():
    slots = ConnectionSlots(64, max_per_address=4, max_per_network=64)
    attack = [connect(slots, f"10.{n}.0.{a}") for n in range(8) for a in range(2)]  # 8 networks x 2 addresses
    attack += [connect(slots, f"10.{n}.0.{a}") for n in range(8) for a in range(2)]
    attack += [connect(slots, f"10.{n}.0.{a}") for n in range(8) for a in range(2)]
    attack += [connect(slots, f"10.{n}.0.{a}") for n in range(8) for a in range(2)]
    assert all(attack) and slots.open == 64
    assert connect(slots, "10.3.0.9") is None  # an attacking network holding as many as the rest: refused
    mine = connect(slots, "192.0.2.7")
    assert mine is not None and slots.open == 64 and slots.evicted == 1
    evicted = [conn for conn in attack if conn.evicted]
    network = evicted[0].address.split(".")[1] if len(evicted) == 1 else None
    assert evicted[0] is next(c for c in attack if c.address.split(".")[1] == network)  # the oldest of its network
    assert connect(slots, "10.0.0.9") is None  # its network now holds 7 of 8: not enough fewer to evict
    second = connect(slots, "198.51.100.1")
    assert second is not None and slots.evicted == 2 and slots.open == 64
    for conn in [c for c in attack if not c.evicted] + [mine, second]:
        slots.release(conn.address, conn)
        slots.release(conn.address, conn)  # idempotent
    assert slots.open == 0 and slots.networks() == 0 and slots.addresses() == 0


def test_a_transferred_slot_is_the_youngest_of_its_network():
    slots = ConnectionSlots(3, max_per_address=3, max_per_network=3)
    first, second = connect(slots, "10.0.0.1"), connect(slots, "10.0.0.1")
    promoted = Conn(slots, "10.0.0.1")
    slots.transfer("10.0.0.1", first, promoted)  # its first request arrived: no longer the first to go
    assert connect(slots, "10.0.0.1") and connect(slots, "192.0.2.1")
    assert second.evicted and not promoted.evicted
