"""Pod addresses from the node's pod range (local in the pod network namespace, so any can be bound)."""

from __future__ import annotations

import ipaddress


class PodAddresses:
    def __init__(self, cidr: str) -> None:
        self.net = ipaddress.ip_network(cidr)
        if self.net.version != 4 or self.net.num_addresses < 4:
            raise ValueError(f"pod range {cidr} must be an IPv4 network of at least 4 addresses")
        self.used: set[str] = set()
        self._hosts = self.net.hosts()

    def contains(self, ip: str) -> bool:
        try:
            return ipaddress.ip_address(ip) in self.net
        except ValueError:
            return False

    def claim(self, ip: str) -> bool:
        if not self.contains(ip) or ip in self.used:
            return False
        self.used.add(ip)
        return True

    def allocate(self) -> str:
        for _ in range(2):
            for addr in self._hosts:
                ip = str(addr)
                if ip.endswith((".0", ".255")) or ip in self.used:
                    continue
                self.used.add(ip)
                return ip
            self._hosts = self.net.hosts()  # wrap around, reusing released addresses
        raise RuntimeError(f"pod range {self.net} exhausted")

    def release(self, ip: str | None) -> None:
        if ip:
            self.used.discard(ip)
