import pytest

from elasti_istio.kubelet.ipam import PodAddresses


def test_allocates_distinct_addresses_and_reuses_released() -> None:
    a = PodAddresses("10.42.0.0/30")
    first, second = a.allocate(), a.allocate()
    assert {first, second} == {"10.42.0.1", "10.42.0.2"}
    with pytest.raises(RuntimeError):
        a.allocate()
    a.release(first)
    assert a.allocate() == first


def test_claim_only_inside_the_range() -> None:
    a = PodAddresses("10.42.0.0/24")
    assert a.claim("10.42.0.9") and not a.claim("10.42.0.9") and not a.claim("10.43.0.1")


@pytest.mark.parametrize("cidr", ["fd00::/120", "10.0.0.0/31"])
def test_range_must_be_ipv4_with_room_for_pods(cidr: str) -> None:
    with pytest.raises(ValueError):
        PodAddresses(cidr)
