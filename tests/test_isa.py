"""The fast decoder against capstone, on random words of the load/store space."""
import random

from capstone import CS_ARCH_ARM64, CS_MODE_ARM, Cs

from stepfuzz.oracle.isa import InsnClass, decode

CS = Cs(CS_ARCH_ARM64, CS_MODE_ARM)
SINGLE = {"ldr", "ldrb", "ldrh", "ldrsb", "ldrsh", "ldrsw", "ldur", "ldurb", "ldurh", "ldursb", "ldursh",
          "ldursw", "ldtr", "ldtrb", "ldtrh", "ldtrsb", "ldtrsh", "ldtrsw", "str", "strb", "strh", "stur",
          "sturb", "sturh", "sttr", "sttrb", "sttrh", "ldar", "ldarb", "ldarh", "stlr", "stlrb", "stlrh",
          "ldlar", "ldlarb", "ldlarh", "stllr", "stllrb", "stllrh"}


def text(w):
    for i in CS.disasm(w.to_bytes(4, "little"), 0x10000):
        return i.mnemonic, i.op_str
    return None, None


def test_valid_syndrome_only_for_single_register_forms_without_writeback():
    rnd = random.Random(7)
    checked = 0
    for _ in range(30000):
        w = (rnd.getrandbits(32) & ~0x0A000000) | 0x08000000      # load/store encoding space
        insn, (mn, ops) = decode(w), text(w)
        if mn is None or insn.kind != InsnClass.MEM:
            continue
        checked += 1
        if insn.iss:
            assert mn in SINGLE, (hex(w), mn, ops)
            after_address = ops.split("]")[-1].strip(", ") if "[" in ops else ""
            assert "!" not in ops and not after_address, (hex(w), mn, ops)     # no writeback
            reg = ops.split(",")[0].strip()
            assert reg in (f"x{insn.rt}", f"w{insn.rt}", "xzr", "wzr"), (hex(w), ops)
            assert (reg.startswith("x") or reg == "xzr") == insn.sf or insn.write, (hex(w), mn, ops)
        else:
            assert mn not in SINGLE or "!" in ops or ops.split("]")[-1].strip(", "), (hex(w), mn, ops)
    assert checked > 5000


def test_classes_named_by_capstone():
    cases = {0xD4000002: (InsnClass.HVC, "hvc"), 0xD5300080 | 3: (InsnClass.DBGREG, "mrs"), 0xD503201F: (InsnClass.PLAIN, "nop"),
             0xD503207F: (InsnClass.UNSUPPORTED, "wfi"), 0xC8027C20: (InsnClass.STORE_EXCLUSIVE, "stxr"),
             0xD69F03E0: (InsnClass.ERET, "eret"), 0xD4000001: (InsnClass.GUEST_EXCEPTION, "svc"),
             0x00000003: (InsnClass.GUEST_EXCEPTION, "udf"), 0xD4400000: (InsnClass.GUEST_EXCEPTION, "hlt")}
    for w, (kind, mnemonic) in cases.items():
        assert decode(w).kind == kind and text(w)[0] == mnemonic, hex(w)
    assert decode(0xD5300080 | 3).reg == "dbgbvr0_el1" and "dbgbvr0_el1" in text(0xD5300080 | 3)[1]


def test_exception_generation_with_op2_set_is_undefined():
    """BRK, HVC, SVC... all have op2 (bits 4:2) = 0; the rest of the class is
    unallocated (a campaign on 5.10 met 0xd4200004 decoded as a BRK)."""
    from stepfuzz.oracle.isa import UNDEF
    for w in (0xD4200004, 0xD42F7544, 0xD4000002 | 0x1C, 0xD4400010):
        assert decode(w) == UNDEF, hex(w)
    assert decode(0xD4200000).kind == InsnClass.BRK
