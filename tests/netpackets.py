"""Just enough Ethernet, ARP, IPv4, UDP and DHCP to talk to passt and a TAP from a test
(the host side of what guests/runtime/virtio_net.c does in the guest)."""
import struct

BROADCAST = b"\xff" * 6
ETH_IP, ETH_ARP = 0x0800, 0x0806


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def eth(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def ipv4_udp(src_ip: bytes, dst_ip: bytes, sport: int, dport: int, data: bytes) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0, src_ip, dst_ip)
    hdr = hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:]
    return hdr + udp


def parse_udp(frame: bytes):
    """(src MAC, src IP, dst IP, sport, dport, data) of an IPv4/UDP frame, or None."""
    if len(frame) < 42 or struct.unpack("!H", frame[12:14])[0] != ETH_IP or frame[23] != 17:
        return None
    ihl = (frame[14] & 15) * 4
    sport, dport, ulen = struct.unpack("!HHH", frame[14 + ihl:20 + ihl])
    return frame[6:12], frame[26:30], frame[30:34], sport, dport, frame[22 + ihl:14 + ihl + ulen]


def arp_request(mac: bytes, ip: bytes, target_ip: bytes) -> bytes:
    return eth(BROADCAST, mac, ETH_ARP, struct.pack("!HHBBH", 1, ETH_IP, 6, 4, 1) + mac + ip + bytes(6) + target_ip)


def dhcp_discover(mac: bytes, xid: int = 0x6B766D70) -> bytes:
    bootp = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, xid, 0, 0x8000, bytes(4), bytes(4),
                        bytes(4), bytes(4), mac.ljust(16, b"\0"), b"", b"")
    options = b"\x63\x82\x53\x63" + b"\x35\x01\x01" + b"\x37\x02\x01\x03" + b"\xff"
    return eth(BROADCAST, mac, ETH_IP, ipv4_udp(bytes(4), b"\xff" * 4, 68, 67, bootp + options))


def dhcp_offer(frame: bytes):
    """(your address, router address, server MAC) from a DHCP reply frame, or None."""
    u = parse_udp(frame)
    if u is None or u[3] != 67 or u[4] != 68 or len(u[5]) < 240:
        return None
    bootp = u[5]
    yiaddr, router, i = bootp[16:20], None, 240
    while i < len(bootp) and bootp[i] != 255:
        if bootp[i] == 0:
            i += 1
            continue
        code, n = bootp[i], bootp[i + 1]
        if code == 3 and n >= 4:
            router = bootp[i + 2:i + 6]
        i += 2 + n
    return yiaddr, router, u[0]


def has_default_route() -> bool:
    """True if the host has an IPv4 default route (what passt copies its addresses from)."""
    try:
        lines = open("/proc/net/route").read().splitlines()[1:]
    except OSError:
        return False
    return any(line.split()[1] == "00000000" for line in lines if len(line.split()) > 2)
