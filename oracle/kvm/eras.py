"""Era policies: the points where kernels differ in handling guest single-step.

Each era is a handful of mechanical choices taken from the kernel source of
the releases it stands for (docs/eras.md has the evidence).  The run loop in
`kernel.py` is shared; nothing here knows about particular cases.
"""
from __future__ import annotations

from dataclasses import dataclass

# What kvm_arm_setup_debug() does to the guest's PSTATE.SS on each entry
FORCE = "force"                   # SS = 1 always
KEEP_PENDING = "keep-pending"     # SS = 0 if the last exit was active-pending, else 1
UNTOUCHED = "untouched"           # entry leaves SS alone (state kept across entries)

# How an emulated instruction's PC is skipped
SKIP_EL1 = "el1"                  # PC += 4 at EL1; SS untouched
SKIP_EL1_CLEAR = "el1-clear"      # PC += 4 and SS = 0 at EL1, before the next setup_debug
SKIP_DEFERRED = "deferred"        # flag; hyp applies PC += 4, SS = 0 at entry, after setup_debug

# Whether a trap handled in the kernel is reported to userspace as a step
FAKE_NONE = "none"
FAKE_ALWAYS = "always"            # kvm_arm_handle_step_debug() after every handled trap
FAKE_IF_PC_MOVED = "if-pc-moved"  # the 2018 RFC heuristic


@dataclass(frozen=True)
class Era:
    id: str
    kernels: str                  # releases it stands for
    commits: str                  # the commits that define it
    summary: str
    entry_ss: str                 # FORCE / KEEP_PENDING / UNTOUCHED
    skip: str                     # SKIP_EL1 / SKIP_EL1_CLEAR / SKIP_DEFERRED
    mmio_skip_at_decode: bool     # MMIO PC skip in decode_hsr, before KVM_EXIT_MMIO (<= 4.20)
    mmio_guard: bool              # kvm_handle_mmio_return() checks mmio_needed (2113c5f62b74)
    fake_step: str                # FAKE_NONE / FAKE_ALWAYS / FAKE_IF_PC_MOVED
    commit_pc_at_out: bool        # pending PC committed before returning to userspace (26778aaa134a, e3e880bb1518)
    ss_at_load_put: bool          # SS saved at vcpu_put, restored at vcpu_load (2ca3f03bf524)
    step_exit_rearms: bool        # handling a step exit sets SS = 1 (the debugger re-arms the step)
    armed_at_enable: bool = False # KVM_SET_GUEST_DEBUG arms the step itself (SS = 1)


ERAS: dict[str, Era] = {e.id: e for e in (
    Era("4.14", "v4.14 and earlier (4.14.y included)",
        "before Alex Bennée's 2017 single-step series",
        "forces SS on every entry; the PC skip never touches SS; MMIO skipped before the exit; no step checks",
        FORCE, SKIP_EL1, True, False, FAKE_NONE, False, False, False),
    Era("4.15", "v4.15 - v4.20 (4.19.y included)",
        "kvm_arm_handle_step_debug(), removed by bd7d95cafb49 in v5.0",
        "as 4.14, plus a faked KVM_EXIT_DEBUG after every trap handled in the kernel and after MMIO completion",
        FORCE, SKIP_EL1, True, False, FAKE_ALWAYS, False, False, False),
    Era("rfc-2018", "never merged",
        "Alex Bennée's 2018 RFC on top of 4.15",
        "as 4.15, but fakes the step only when the PC changed",
        FORCE, SKIP_EL1, True, False, FAKE_IF_PC_MOVED, False, False, False),
    Era("5.0", "v5.0 - v5.2 (and stable releases before the 2113c5f62b74 backport)",
        "bd7d95cafb49, 0d640732dbeb",
        "no fake steps; the skip clears SS at EL1 but the next entry forces it again; MMIO skipped at completion, without a guard",
        FORCE, SKIP_EL1_CLEAR, False, False, FAKE_NONE, False, False, False),
    Era("5.10", "v5.3 - v5.10",
        "2113c5f62b74 (MMIO completion guarded by mmio_needed)",
        "as 5.0, MMIO completed once",
        FORCE, SKIP_EL1_CLEAR, False, True, FAKE_NONE, False, False, False),
    Era("5.11", "v5.11 - v5.12.9",
        "'Make kvm_skip_instr() and co private to HYP' (PC increments applied in hyp)",
        "the skip is applied in hyp after setup_debug; still forces SS on every entry; pending PC kept across returns to userspace",
        FORCE, SKIP_DEFERRED, False, True, FAKE_NONE, False, False, False),
    Era("5.13", "v5.13 - v6.0 (and 5.12.10+)",
        "26778aaa134a, e3e880bb1518 (pending PC committed before returning to userspace)",
        "as 5.11, but a pending PC increment is committed at EL1 when KVM_RUN returns",
        FORCE, SKIP_DEFERRED, False, True, FAKE_NONE, True, False, False),
    Era("6.1", "v6.1 - v6.13",
        "34fbdee086cf, 370531d1e95b",
        "as 5.13, but an exit in active-pending is remembered and the next entry keeps SS = 0",
        KEEP_PENDING, SKIP_DEFERRED, False, True, FAKE_NONE, True, False, False),
    Era("6.14", "v6.14 and later",
        "2ca3f03bf524 (software step state managed at vcpu load/put)",
        "SS saved at vcpu_put and restored at vcpu_load; a step exit re-arms SS",
        UNTOUCHED, SKIP_DEFERRED, False, True, FAKE_NONE, True, True, True),
    Era("arch", "Mark Rutland's 2018 proposal",
        "the Arm ARM D2.11 state machine",
        "follow the architectural state machine: emulation advances it, nothing forces it",
        UNTOUCHED, SKIP_EL1_CLEAR, False, True, FAKE_NONE, False, False, True, armed_at_enable=True),
)}

ERA_IDS = tuple(ERAS)


class UnknownEra(ValueError):
    pass


def select(spec: str) -> list[Era]:
    """`all`, one era id, or a comma-separated list."""
    if spec == "all":
        return list(ERAS.values())
    out = []
    for part in spec.split(","):
        part = part.strip()
        if part not in ERAS:
            raise UnknownEra(f"unknown era {part!r} (known: {', '.join(ERA_IDS)}, all)")
        out.append(ERAS[part])
    return out
