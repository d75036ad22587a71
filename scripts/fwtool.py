#!/usr/bin/env python3
"""Firmware image tools with no dependencies beyond Python 3.

  fwtool.py size ELF [--flash-kib N] [--ram-kib N]   flash and RAM used by a linked image
  fwtool.py uf2 ELF OUT [--family ID]                UF2 file for drag-and-drop flashing
  fwtool.py check-uf2 FILE [--family ID] [--start A] every block well-formed, in order, from A

Flash is what the loadable segments store (code, read-only data, initialised data's image); RAM is
what they occupy at run time in RAM (.data plus .bss; the stack comes on top). UF2 follows
https://github.com/microsoft/uf2: 512-byte blocks of 256 payload bytes, with the family id
(RP2040: 0xe48bff56) so the boot ROM rejects images for another chip.
"""

import argparse
import struct
import sys

PT_LOAD = 1
FLASH = (0x1000_0000, 0x2000_0000)
RAM = (0x2000_0000, 0x3000_0000)


def segments(path):
    """(paddr, vaddr, filesz, memsz, bytes) of each loadable segment of a 32-bit little-endian ELF."""
    data = open(path, "rb").read()
    if data[:4] != b"\x7fELF" or data[4] != 1 or data[5] != 1:
        sys.exit(f"{path}: not a 32-bit little-endian ELF")
    phoff, = struct.unpack_from("<I", data, 0x1C)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x2A)
    out = []
    for i in range(phnum):
        p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz = struct.unpack_from("<6I", data, phoff + i * phentsize)
        if p_type == PT_LOAD and p_memsz:
            out.append((p_paddr, p_vaddr, p_filesz, p_memsz, data[p_offset : p_offset + p_filesz]))
    return out


def within(addr, region):
    return region[0] <= addr < region[1]


def size(args):
    segs = segments(args.elf)
    flash = sum(f for p, v, f, m, _ in segs if f and within(p, FLASH))
    ram = sum(m for p, v, f, m, _ in segs if within(v, RAM))
    print(f"flash: {flash} bytes ({100 * flash / (args.flash_kib * 1024):.2f} % of {args.flash_kib} KiB)")
    print(f"RAM:   {ram} bytes static ({100 * ram / (args.ram_kib * 1024):.2f} % of {args.ram_kib} KiB), stack on top")


def uf2(args):
    image = {}
    for p, v, f, m, body in segments(args.elf):
        if f and within(p, FLASH):
            for i, b in enumerate(body):
                image[p + i] = b
    if not image:
        sys.exit(f"{args.elf}: nothing to place in flash")
    pages = sorted({a & ~0xFF for a in image})
    blocks = []
    for n, page in enumerate(pages):
        payload = bytes(image.get(page + i, 0) for i in range(256))
        header = struct.pack("<8I", 0x0A324655, 0x9E5D5157, 0x0000_2000, page, 256, n, len(pages), args.family)
        blocks.append(header + payload + bytes(476 - 256) + struct.pack("<I", 0x0AB16F30))
    with open(args.out, "wb") as f:
        f.write(b"".join(blocks))
    print(f"{args.out}: {len(blocks)} blocks, {len(blocks) * 512} bytes, family 0x{args.family:08x}")


def check_uf2(args):
    data = open(args.file, "rb").read()
    if not data or len(data) % 512:
        sys.exit(f"{args.file}: not a whole number of 512-byte blocks")
    n = len(data) // 512
    prev = None
    for i in range(n):
        b = data[i * 512 : (i + 1) * 512]
        m0, m1, flags, addr, size, no, total, family = struct.unpack_from("<8I", b)
        (m_end,) = struct.unpack_from("<I", b, 508)
        problems = []
        if (m0, m1, m_end) != (0x0A324655, 0x9E5D5157, 0x0AB16F30):
            problems.append("bad magic")
        if not flags & 0x2000 or family != args.family:
            problems.append(f"family 0x{family:08x}")
        if size != 256 or addr % 256 or no != i or total != n:
            problems.append(f"block {no}/{total} at 0x{addr:08x}, {size} bytes")
        if prev is not None and addr <= prev:
            problems.append("addresses not increasing")
        if i == 0 and addr != args.start:
            problems.append(f"starts at 0x{addr:08x}, not 0x{args.start:08x}")
        if problems:
            sys.exit(f"{args.file}: block {i}: " + "; ".join(problems))
        prev = addr
    print(f"{args.file}: {n} valid blocks from 0x{args.start:08x}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("size")
    s.add_argument("elf")
    s.add_argument("--flash-kib", type=int, default=2048)
    s.add_argument("--ram-kib", type=int, default=264)
    u = sub.add_parser("uf2")
    u.add_argument("elf")
    u.add_argument("out")
    u.add_argument("--family", type=lambda x: int(x, 0), default=0xE48BFF56)
    c = sub.add_parser("check-uf2")
    c.add_argument("file")
    c.add_argument("--family", type=lambda x: int(x, 0), default=0xE48BFF56)
    c.add_argument("--start", type=lambda x: int(x, 0), default=0x10000000)
    args = ap.parse_args()
    {"size": size, "uf2": uf2, "check-uf2": check_uf2}[args.cmd.replace("_", "-")](args)


if __name__ == "__main__":
    main()
