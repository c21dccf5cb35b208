#!/usr/bin/env python3
"""How many of a stock kernel's fenced sites a chain of `jmp rel8` hops could serve.

An upper bound, for deciding whether hop chains are worth an ABI change (README, "kept in place
by pvpatch's limits"). Takes the 2-4 byte sites that `pvpatch scan` found no detour for, and
over the raw bytes asks: is a 5-byte slot (int3s, or a multi-byte NOP) within a `jmp rel8` of
the site, or only within a `jmp rel8` of a 2-byte hop (int3s or a NOP) that is itself within
reach? It ignores what the planner also requires (ORC coverage, the entry text's mapping, that
NOP padding is dead), so the counts are bounds from above.

    pvpatch scan vmlinux --json > scan.json
    python3 docs/analysis/hop_reach.py vmlinux scan.json
"""
import json
import struct
import sys

vmlinux, scan_json = sys.argv[1], sys.argv[2]
data = open(vmlinux, "rb").read()
phoff, = struct.unpack_from("<Q", data, 0x20)
phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
segments = []
for i in range(phnum):
    p_type, _, off, vaddr, _, filesz, _, _ = struct.unpack_from("<IIQQQQQQ", data, phoff + i * phentsize)
    if p_type == 1:
        segments.append((vaddr, off, filesz))


def read(addr, n):
    for vaddr, off, filesz in segments:
        if vaddr <= addr and addr + n <= vaddr + filesz:
            return data[off + addr - vaddr:off + addr - vaddr + n]
    return b""


NOP5 = [bytes.fromhex(h) for h in ["0f1f440000", "660f1f440000", "0f1f8000000000",
                                    "0f1f840000000000", "660f1f840000000000",
                                    "662e0f1f840000000000"]]
NOP2 = [bytes.fromhex(h) for h in ["6690", "0f1f00", "0f1f4000", "9090"]] + NOP5


def slots(lo, hi, nops, int3s, with_nops):
    """Addresses in [lo, hi) where `int3s` int3s, or (with_nops) one of `nops`, start."""
    b = read(lo, hi - lo)
    out = set()
    for i in range(len(b)):
        if b[i:i + int3s] == b"\xcc" * int3s:
            out.add(lo + i)
        if with_nops and any(b[i:i + len(p)] == p for p in nops):
            out.add(lo + i)
    return out


def reach(frm, targets):
    return any(abs(t - frm) <= 127 for t in targets)


sites = [(int(s["address"], 16), s["length"]) for s in json.load(open(scan_json))["sites"]
         if "no detour" in (s["room"].get("reason") or "") and 2 <= s["length"] <= 4]
for with_nops in (False, True):
    direct = hop = neither = 0
    for addr, _ in sites:
        end = addr + 2  # after the `jmp rel8` written at the site
        if reach(end, slots(end - 130, end + 130, NOP5, 5, with_nops)):
            direct += 1
        elif any(reach(h + 2, slots(h - 128, h + 132, NOP5, 5, with_nops))
                 for h in slots(end - 130, end + 130, NOP2, 2, with_nops) if abs(h - end) <= 127):
            hop += 1
        else:
            neither += 1
    kind = "int3s or NOPs" if with_nops else "int3s only"
    print(f"{len(sites)} fenced 2-4 byte sites ({kind}): a slot in direct reach {direct}, "
          f"only through a hop {hop}, neither {neither}")
