"""The guest CPU: what each instruction meets, and what emulation leaves behind."""
import pytest

from conftest import CODE, DATA, MMIO, make
from stepfuzz.oracle.case import parse_case
from stepfuzz.oracle.guest import CODE_SLOTS, NOT_SUPPORTED, execute, hvc_result
from stepfuzz.oracle.vocabulary import Outcome

GICD = {"base": "0x8000000", "size": "0x10000", "kind": "mmio-kernel"}


def run(asm, regs=None, memory=(CODE,), **extra):
    return execute(parse_case(make(asm, regs, memory, **extra)))


def test_plain_program_completes_every_instruction():
    log = run("mov x0, #3\nloop:\nsub x0, x0, #1\ncbnz x0, loop\nnop")
    assert log.outcome == Outcome.END and log.n == 8
    assert log.pcs[-1] == 0x10010 and not log.specials
    assert log.final_regs()["x0"] == 0


@pytest.mark.parametrize("insn, mmio_read, expected", [
    ("ldr x1, [x2]", 0x8877665544332211, 0x8877665544332211),
    ("ldr w1, [x2]", 0x8877665544332211, 0x44332211),
    ("ldrb w1, [x2]", 0x81, 0x81),
    ("ldrsb x1, [x2]", 0x81, 0xFFFFFFFFFFFFFF81),
    ("ldrsb w1, [x2]", 0x81, 0xFFFFFF81),
    ("ldrsh x1, [x2, #2]", 0x8001, 0xFFFFFFFFFFFF8001),
    ("ldrsw x1, [x2]", 0x80000000, 0xFFFFFFFF80000000),
    ("ldur x1, [x2, #-8]", 0x42, 0x42),
    ("ldar x1, [x2]", 0x42, 0x42),
    ("ldr x1, [x2, x3]", 0x7, 0x7),
])
def test_mmio_loads_complete_like_kvm(insn, mmio_read, expected):
    log = run(f"{insn}\nnop", {"x2": "0x20000008", "x3": "0x10"}, (CODE, MMIO), mmio_read=hex(mmio_read))
    s = log.specials[0]
    assert s.kind == "mmio" and not s.access.kernel and not s.access.write
    assert log.final_regs()["x1"] == expected


def test_mmio_store_reports_the_value_and_xzr():
    log = run("str x1, [x2]\nstrh w1, [x2, #2]\nstr xzr, [x2]", {"x1": "0x1122334455667788", "x2": "0x20000000"}, (CODE, MMIO))
    values = [(log.specials[i].access.size, log.specials[i].access.value) for i in range(3)]
    assert values == [(8, 0x1122334455667788), (2, 0x7788), (8, 0)]
    assert all(log.specials[i].access.write for i in range(3))


def test_addresses_outside_every_region_are_userspace_mmio():
    log = run("ldr x1, [x2]", {"x2": "0x300000"})
    assert log.specials[0].kind == "mmio" and log.specials[0].access.addr == 0x300000


def test_in_kernel_device_reads_as_zero():
    log = run("ldr w1, [x2]\nstr w1, [x2]", {"x1": "5", "x2": "0x800c000"}, (CODE, GICD), mmio_read="0x99")
    assert [log.specials[i].access.kernel for i in (0, 1)] == [True, True]
    assert log.final_regs()["x1"] == 0


def test_stage2_faults_once_per_page_both_sides():
    log = run("ldr x1, [x9]\nstr x1, [x9, #8]\nldr x1, [x9, #0x1000]\nnop", {"x9": "0x40000"}, (CODE, DATA))
    assert log.specials[0].faults == ("data",)
    assert 1 not in log.specials            # same page
    assert log.specials[2].faults == ("data",)
    code = {"base": "0x10000", "size": "0x10000", "kind": "ram"}
    data = make("nop\nnop", memory=[code])
    data["code"]["base"] = "0x10ffc"
    log = execute(parse_case(data))
    assert log.specials[0].faults == ("fetch",) and log.specials[1].faults == ("fetch",)


def test_debug_registers_are_a_shadow():
    log = run("mrs x1, dbgbvr0_el1\nmsr dbgbvr0_el1, x5\nmrs x2, dbgbvr0_el1\nmrs x3, dbgbvr1_el1\nmsr mdscr_el1, x5\nmrs x4, mdscr_el1",
              {"x1": "9", "x5": "0xabcd"})
    regs = log.final_regs()
    assert (regs["x1"], regs["x2"], regs["x3"], regs["x4"]) == (0, 0xABCD, 0, 0xABCD)
    assert all(log.specials[i].kind == "dbgreg" for i in range(6))


def test_psci_and_smccc_results_zero_x1_to_x3():
    log = run("movz x0, #0x8400, lsl #16\nhvc #0\nmov x9, x0\nmovz x0, #0x8200, lsl #16\nhvc #0",
              {"x1": "1", "x2": "2", "x3": "3"})
    regs = log.final_regs()
    assert regs["x9"] == 0x10000 and regs["x0"] == NOT_SUPPORTED
    assert (regs["x1"], regs["x2"], regs["x3"]) == (0, 0, 0)
    assert hvc_result(0x80000000) == 0x10001
    assert hvc_result(0x84000008) is None      # SYSTEM_OFF: implemented by KVM, not modelled


def test_store_exclusive_always_fails_under_single_step():
    log = run("ldxr x1, [x9]\nstxr w2, x1, [x9]", {"x9": "0x40000"}, (CODE, {**DATA, "prefault": True}))
    assert log.outcome == Outcome.END and log.final_regs()["x2"] == 1


@pytest.mark.parametrize("asm, entered, status", [
    ("ldxr x1, [x9]\nadd x1, x1, #1\nstxr w2, x1, [x9]\nldr x4, [x9]", 0, 0),     # free since the load
    ("ldxr x1, [x9]\nadd x1, x1, #1\nstxr w2, x1, [x9]\nldr x4, [x9]", 1, 1),     # an entry after it
    ("ldxr x1, [x9]\nadd x9, x9, #8\nstxr w2, x1, [x9]\nldr x4, [x9]", 0, 1),     # another address
    ("ldxr w1, [x9]\nadd x1, x1, #1\nstxr w2, x1, [x9]\nldr x4, [x9]", 0, 1),     # another size
    ("ldxp x1, x5, [x9]\nadd x1, x1, #1\nstxp w2, x1, x5, [x9]\nldr x4, [x9]", 0, 0),
])
def test_store_exclusive_running_free_sees_the_monitor_of_the_last_entry(asm, entered, status):
    """A model that runs the guest free tells it where the last exception
    return from EL2 was (with_monitor): the store succeeds, and stores, only
    if its load-exclusive came after it, at the same address and size."""
    log = run(asm, {"x9": "0x40000"}, (CODE, {**DATA, "prefault": True}))
    free = log.with_monitor(2, entered)
    regs = free.final_regs()
    assert free.outcome == Outcome.END and regs["x2"] == status
    loaded = 0 if status else 1
    assert regs["x4"] == (loaded if "add x9" not in asm else 0)
    assert log.with_monitor(1, 0) is log and free.with_monitor(2, entered) is free   # not a store; no change


@pytest.mark.parametrize("asm, regs, memory, outcome", [
    ("nop\nldp x1, x3, [x2]", {"x2": "0x20000000"}, (CODE, MMIO), Outcome.NO_SYNDROME),
    ("nop\nldr x1, [x2], #8", {"x2": "0x20000000"}, (CODE, MMIO), Outcome.NO_SYNDROME),
    ("nop\nwfi", None, (CODE,), Outcome.UNSUPPORTED),
    ("nop\nsvc #0", None, (CODE,), Outcome.GUEST_EXCEPTION),      # (no vectors)
    ("nop\nmrs x0, cntvct_el0", None, (CODE,), Outcome.UNSUPPORTED),
    ("nop\nmovz x0, #0x8400, lsl #16\nmovk x0, #8\nhvc #0", None, (CODE,), Outcome.UNSUPPORTED),
    ("nop\nhvc #1", None, (CODE,), Outcome.UNSUPPORTED),
    ("nop\n.inst 0x00000000", None, (CODE,), Outcome.GUEST_EXCEPTION),
    ("nop\nfmov d0, #1.0", None, (CODE,), Outcome.GUEST_EXCEPTION),   # CPACR_EL1.FPEN = 0
    ("nop\nldar x1, [x9]", {"x9": "0x40004"}, (CODE, DATA), Outcome.GUEST_EXCEPTION),   # misaligned: alignment
    ("nop\nldaxr w1, [x9]", {"x9": "0x40002"}, (CODE, DATA), Outcome.GUEST_EXCEPTION),
    ("nop\nstlrh w1, [x9]", {"x9": "0x20000001"}, (CODE, MMIO), Outcome.GUEST_EXCEPTION),  # before any MMIO exit
    ("nop\nbr x5", {"x5": "0x40000"}, (CODE, DATA), Outcome.LEFT_CODE),
    ("nop\nbr x5", {"x5": "0x10100"}, (CODE,), Outcome.LEFT_CODE),
    ("nop\nstr x1, [x5]", {"x5": "0x10004"}, (CODE,), Outcome.UNSUPPORTED),
])
def test_run_endings_stop_at_the_instruction(asm, regs, memory, outcome):
    log = run(asm, regs, memory)
    assert log.outcome == outcome, log.detail
    assert log.n == len(asm.split("\n")) - 1 or outcome == Outcome.LEFT_CODE
    assert log.specials[log.n].kind == outcome and log.detail


def test_only_ordered_and_exclusive_accesses_must_be_aligned():
    log = run("nop\nldar w1, [x9]\nldr x1, [x9, #1]\nstr x1, [x9, #3]", {"x9": "0x40004"}, (CODE, DATA))
    assert log.outcome == Outcome.END and log.n == 4


def test_max_steps_bounds_a_guest_that_never_ends():
    log = run("self:\nb self", max_steps=25)
    assert log.outcome == Outcome.MAX_STEPS and log.n >= 25


def test_same_case_same_log_whatever_ran_before():
    case = parse_case(make("ldr x1, [x9]\nldr x3, [x2]\nmrs x4, dbgbvr0_el1\nadd x0, x0, #1",
                           {"x9": "0x40000", "x2": "0x20000000"}, (CODE, DATA, MMIO)))
    first = execute(case)
    run("str x5, [x9]\nmsr dbgbvr0_el1, x5", {"x9": "0x40000", "x5": "77"}, (CODE, DATA))   # leave state behind
    again = execute(case)
    assert (again.pcs, again.specials) == (first.pcs, first.specials)
    assert again.final_regs() == first.final_regs()
    assert again.final_regs()["x1"] == 0 and again.final_regs()["x4"] == 0


def test_new_code_at_the_same_address_never_runs_old_translations():
    # Three programs of different lengths take turns at one address through
    # more than two rounds of code slots.  The branch ends a translation
    # block that Unicorn keeps (one holding an exit address is dropped after
    # every run), so a stale translation of another program would show in x0
    # or in the instructions run.
    programs = [parse_case(make(f"mov x0, #{10 * k}\nb next\nnext:\n" + "add x0, x0, #1\n" * (k + 1)))
                for k in range(3)]
    for i in range(2 * CODE_SLOTS + 3):
        k = i % 3
        log = execute(programs[k])
        assert (log.outcome, log.n, log.final_regs()["x0"]) == (Outcome.END, k + 3, 11 * k + 1), i


def test_redirect_continues_on_another_path():
    case = parse_case(make("ldr x1, [x2]\nadd x0, x0, #1\nadd x4, x4, #1\nnop", {"x2": "0x20000000"}, (CODE, MMIO)))
    log = execute(case, ((1, "pc", 0x10008),))
    assert log.pcs == [0x10000, 0x10008, 0x1000c, 0x10010]
    assert log.final_regs()["x0"] == 0 and log.final_regs()["x4"] == 1


def test_writes_land_between_two_plain_instructions():
    """A write from outside applies exactly once k instructions completed,
    even in the middle of a block Unicorn would run in one go."""
    case = parse_case(make("add x0, x0, #1\nadd x0, x0, #1\nadd x0, x0, #1\nmov x5, x0\nnop", {}, (CODE,)))
    assert execute(case).final_regs()["x5"] == 3      # (its blocks are translated before the counted runs)
    log = execute(case, ((2, "x0", 100), (2, "daif", 0)))
    assert log.pcs == execute(case).pcs and log.final_regs()["x5"] == 101
    jumped = execute(case, ((1, "pc", 0x1000c),))
    assert jumped.pcs == [0x10000, 0x1000c, 0x10010, 0x10014] and jumped.final_regs()["x5"] == 1


def test_an_exit_word_first_in_the_code_can_be_written_past():
    """An exit word on the first word of a page is not a Unicorn exit (Unicorn
    would probe a fetch below the page); found by the 1,000-case real-kernel check."""
    case = parse_case(make("brk #1\nnop\nnop\nnop", {}, (CODE,)))
    log = execute(case, ((0, "pc", case.base + 4),))
    assert log.outcome == Outcome.END and log.pcs == [case.base + 4 * i for i in range(1, 5)]
    looped = parse_case(make("stxr w2, x1, [x20]\nnop\nb .-8", {"x20": "0x40000"}, (CODE, {"base": "0x40000", "size": "0x1000", "kind": "ram"}), max_steps=20))
    log = execute(looped)
    assert log.outcome == Outcome.MAX_STEPS and log.pcs[:4] == [0x10000, 0x10004, 0x10008, 0x10000]
