"""netgroup: the network an address belongs to (/24 for IPv4, /48 for IPv6), for limits fair per network."""

from lightning_moe.net.addresses import netgroup


def test_ipv4_addresses_group_by_their_24():
    assert netgroup("127.0.0.1") == netgroup("127.0.0.255") == "127.0.0.0/24"
    assert netgroup("127.77.0.2") == netgroup("127.77.0.65") != netgroup("127.0.0.1")
    assert netgroup("127.1.0.1") != netgroup("127.2.0.1")
    assert netgroup("203.0.113.7") == "203.0.113.0/24"


def test_ipv6_addresses_group_by_their_48_and_mapped_ipv4_by_its_24():
    assert netgroup("2001:db8:1:2::1") == netgroup("2001:db8:1:ffff::9") == "2001:db8:1::/48"
    assert netgroup("2001:db8:2::1") != netgroup("2001:db8:1::1")
    assert netgroup("[2001:db8:1::1]") == "2001:db8:1::/48"
    assert netgroup("fe80::1%eth0") == "fe80::/48"
    assert netgroup("::ffff:192.0.2.9") == "192.0.2.0/24"


def test_what_is_not_an_address_is_its_own_group():
    assert netgroup("?") == "?"
    assert netgroup("localhost") == "localhost"
    assert netgroup("") == ""
