"""Era policies: the points where kernels differ in handling guest single-step.

Each era is a handful of mechanical choices taken from the kernel source of
the releases it stands for (docs/eras.md has the evidence).  The run loop in
`kernel.py` is shared; nothing here knows about particular cases.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..vocabulary import SmcAbi

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


Version = tuple[int, int, int]


@dataclass(frozen=True)
class PolicyPoint:
    """A choice where releases differ, and the kernel code that makes it."""
    field: str                    # the Era field
    function: str                 # the kernel function(s) it models
    decides: str                  # what it decides, in a KVM developer's words


POLICY_POINTS: dict[str, PolicyPoint] = {p.field: p for p in (
    PolicyPoint("entry_ss", "kvm_arm_setup_debug()", "what each guest entry does to PSTATE.SS"),
    PolicyPoint("skip", "kvm_skip_instr() / kvm_incr_pc() + __adjust_pc()",
                "where and when an emulated instruction's PC += 4 happens, and whether it clears SS"),
    PolicyPoint("mmio_skip_at_decode", "decode_hsr() / kvm_handle_mmio_return()",
                "whether an MMIO instruction is skipped before KVM_EXIT_MMIO or at its completion"),
    PolicyPoint("mmio_guard", "kvm_handle_mmio_return()",
                "whether MMIO completion checks mmio_needed (completes once)"),
    PolicyPoint("fake_step", "kvm_arm_handle_step_debug()",
                "whether a trap handled in the kernel is reported to userspace as a step"),
    PolicyPoint("commit_pc_at_out", "kvm_arch_vcpu_ioctl_run() (out:)",
                "whether a pending PC increment is committed before KVM_RUN returns to userspace"),
    PolicyPoint("ss_at_load_put", "kvm_vcpu_load_debug() / kvm_vcpu_put_debug()",
                "whether the step state is saved at vcpu_put and restored at vcpu_load"),
    PolicyPoint("step_exit_rearms", "kvm_handle_guest_debug()",
                "whether handling a software-step exit sets SS = 1 for the next step"),
    PolicyPoint("armed_at_enable", "kvm_arch_vcpu_ioctl_set_guest_debug()",
                "whether enabling single-step arms the first step (SS = 1)"),
    PolicyPoint("smc_abi", "handle_smc()",
                "what a trapped SMC does: x0 = ~0 and a skip, or the PC skip first and an SMCCC call like HVC"),
    PolicyPoint("mmio_sign_extend", "kvm_handle_mmio_return()",
                "whether a sign-extending MMIO load keeps its sign bits (vcpu_data_host_to_guest() cut them off after)"),
)}

# KVM API features a case may need, and the upstream release each appeared in.
# A case that needs one is not reproducible on an era (or the releases of an
# era) without it; it is never run another way.
FEATURES: dict[str, tuple[Version, str]] = {
    "smccc-filter": ((6, 4, 0), "KVM_ARM_VM_SMCCC_FILTER with KVM_EXIT_HYPERCALL (821d935c87bc, d824dff1919b)"),
    # a behaviour rather than an API: user_mem_abort() makes a stage-2
    # mapping executable only on an instruction fault (exec_fault), unless
    # the CPU has CTR_EL0.DIC (QEMU's `max` has not), so a page touched by
    # data first faults again on its first fetch
    "stage2-xn": ((4, 16, 0), "stage-2 mappings made executable on the first instruction fetch"),
}


@dataclass(frozen=True, kw_only=True)
class Era:
    id: str
    kernels: str                  # the releases it stands for, for people
    # ... and as data: upstream versions since <= v < until (None: open); an
    # era of no release (an RFC, the architecture) has neither
    since: Version | None = None
    until: Version | None = None
    released: bool = True
    after: str | None = None      # the era it follows in the kernel's history
    # the commits behind each policy field that differs from `after`'s, as
    # ids joined by '+' (a name where the ids are not known); tests check that
    # exactly those fields are named
    changes: tuple[tuple[str, str], ...] = ()
    commits: str                  # the commits that define it
    summary: str
    entry_ss: str                 # FORCE / KEEP_PENDING / UNTOUCHED
    skip: str                     # SKIP_EL1 / SKIP_EL1_CLEAR / SKIP_DEFERRED
    mmio_skip_at_decode: bool = False   # MMIO PC skip in decode_hsr, before KVM_EXIT_MMIO (<= 4.20)
    mmio_guard: bool = False      # kvm_handle_mmio_return() checks mmio_needed (2113c5f62b74)
    fake_step: str = FAKE_NONE    # FAKE_NONE / FAKE_ALWAYS / FAKE_IF_PC_MOVED
    commit_pc_at_out: bool = False   # pending PC committed before returning to userspace (26778aaa134a, e3e880bb1518)
    ss_at_load_put: bool = False  # SS saved at vcpu_put, restored at vcpu_load (2ca3f03bf524)
    step_exit_rearms: bool = False   # handling a step exit sets SS = 1 (the debugger re-arms the step)
    armed_at_enable: bool = False # KVM_SET_GUEST_DEBUG arms the step itself (SS = 1)
    smc_abi: str = SmcAbi.ALL_ONES   # handle_smc(): SmcAbi.ALL_ONES (f5115e8869e1) / SmcAbi.SMCCC (c2d2e9b3d8ce)
    mmio_sign_extend: bool = False   # kvm_handle_mmio_return(): sign bits kept (85f56708a443, v7.2)

    def covers(self, version: Version) -> bool:
        """Does this era stand for upstream kernel `version`?"""
        return self.released and (self.since is None or self.since <= version) and (
            self.until is None or version < self.until)

    def has(self, feature: str) -> bool:
        """Do some of this era's releases have `feature` (the era's model
        follows them: the 4.15 era stands mostly for 4.16-4.20)?"""
        if not self.released:
            return not self.after or ERAS[self.after].has(feature)
        return self.until is None or self.until > FEATURES[feature][0]

    def lacks(self, feature: str) -> str:
        """Why a case that needs `feature` is not reproducible on this era
        ("" if every release of it has the feature)."""
        since, what = FEATURES[feature]
        if not self.released:
            # an unreleased era has the features of the release it builds on;
            # the architecture (no such release) has them all
            return f"{what} is not in {self.kernels}" if self.after and ERAS[self.after].lacks(feature) else ""
        if self.since is not None and self.since >= since:
            return ""
        v = ".".join(map(str, since[:2]))
        if self.until is not None and self.until <= since:
            return f"{what} is in v{v} and later, not in {self.kernels}"
        return f"{what} is in v{v} and later: only some releases of {self.kernels} have it"


ERAS: dict[str, Era] = {e.id: e for e in (
    Era(id="4.14", kernels="v4.14 and earlier (4.14.y included)", until=(4, 15, 0),
        commits="before Alex Bennée's 2017 single-step series",
        summary="forces SS on every entry; the PC skip never touches SS; MMIO skipped before the exit; no step checks",
        entry_ss=FORCE, skip=SKIP_EL1, mmio_skip_at_decode=True),
    Era(id="4.15", kernels="v4.15 - v4.20 (4.19.y included)", since=(4, 15, 0), until=(5, 0, 0),
        after="4.14", changes=(("fake_step", "kvm_arm_handle_step_debug"),),
        commits="kvm_arm_handle_step_debug(), removed by bd7d95cafb49 in v5.0",
        summary="as 4.14, plus a faked KVM_EXIT_DEBUG after every trap handled in the kernel and after MMIO completion",
        entry_ss=FORCE, skip=SKIP_EL1, mmio_skip_at_decode=True, fake_step=FAKE_ALWAYS),
    Era(id="rfc-2018", kernels="never merged", released=False,
        after="4.15", changes=(("fake_step", "rfc-2018"),),
        commits="Alex Bennée's 2018 RFC on top of 4.15",
        summary="as 4.15, but fakes the step only when the PC changed",
        entry_ss=FORCE, skip=SKIP_EL1, mmio_skip_at_decode=True, fake_step=FAKE_IF_PC_MOVED),
    Era(id="5.0", kernels="v5.0 - v5.2 (and stable releases before the 2113c5f62b74 backport)",
        since=(5, 0, 0), until=(5, 3, 0),
        after="4.15", changes=(("skip", "bd7d95cafb49"), ("fake_step", "bd7d95cafb49"), ("mmio_skip_at_decode", "0d640732dbeb")),
        commits="bd7d95cafb49, 0d640732dbeb",
        summary="no fake steps; the skip clears SS at EL1 but the next entry forces it again; "
                "MMIO skipped at completion, without a guard",
        entry_ss=FORCE, skip=SKIP_EL1_CLEAR),
    Era(id="5.10", kernels="v5.3 - v5.10", since=(5, 3, 0), until=(5, 11, 0),
        after="5.0", changes=(("mmio_guard", "2113c5f62b74"),),
        commits="2113c5f62b74 (MMIO completion guarded by mmio_needed)",
        summary="as 5.0, MMIO completed once",
        entry_ss=FORCE, skip=SKIP_EL1_CLEAR, mmio_guard=True),
    # 26778aaa134a reached 5.12.10 through stable
    Era(id="5.11", kernels="v5.11 - v5.12.9", since=(5, 11, 0), until=(5, 12, 10),
        after="5.10", changes=(("skip", "cdb5e02ed133"),),
        commits="cdb5e02ed133 'Make kvm_skip_instr() and co private to HYP' (PC increments applied in hyp)",
        summary="the skip is applied in hyp after setup_debug; still forces SS on every entry; "
                "pending PC kept across returns to userspace",
        entry_ss=FORCE, skip=SKIP_DEFERRED, mmio_guard=True),
    Era(id="5.13", kernels="v5.13 - v6.0 (and 5.12.10+)", since=(5, 12, 10), until=(6, 1, 0),
        after="5.11", changes=(("commit_pc_at_out", "26778aaa134a+e3e880bb1518"),),
        commits="26778aaa134a, e3e880bb1518 (pending PC committed before returning to userspace)",
        summary="as 5.11, but a pending PC increment is committed at EL1 when KVM_RUN returns",
        entry_ss=FORCE, skip=SKIP_DEFERRED, mmio_guard=True, commit_pc_at_out=True),
    Era(id="6.1", kernels="v6.1 - v6.3", since=(6, 1, 0), until=(6, 4, 0),
        after="5.13", changes=(("entry_ss", "34fbdee086cf+370531d1e95b"),),
        commits="34fbdee086cf, 370531d1e95b",
        summary="as 5.13, but an exit in active-pending is remembered and the next entry keeps SS = 0",
        entry_ss=KEEP_PENDING, skip=SKIP_DEFERRED, mmio_guard=True, commit_pc_at_out=True),
    Era(id="6.4", kernels="v6.4 - v6.13", since=(6, 4, 0), until=(6, 14, 0),
        after="6.1", changes=(("smc_abi", "c2d2e9b3d8ce"),),
        commits="c2d2e9b3d8ce (SMCs from EL1 handled as SMCCC calls; the PC skipped first), "
                "821d935c87bc + d824dff1919b (the SMCCC filter, forwarding to userspace)",
        summary="as 6.1; an SMC is skipped before it is handled as an SMCCC call, which the VMM may take",
        entry_ss=KEEP_PENDING, skip=SKIP_DEFERRED, mmio_guard=True, commit_pc_at_out=True,
        smc_abi=SmcAbi.SMCCC),
    Era(id="6.14", kernels="v6.14 - v7.1", since=(6, 14, 0), until=(7, 2, 0),
        after="6.4", changes=(("entry_ss", "2ca3f03bf524"), ("ss_at_load_put", "2ca3f03bf524"), ("step_exit_rearms", "2ca3f03bf524")),
        commits="2ca3f03bf524 (software step state managed at vcpu load/put)",
        summary="SS saved at vcpu_put and restored at vcpu_load; a step exit re-arms SS",
        entry_ss=UNTOUCHED, skip=SKIP_DEFERRED, mmio_guard=True, commit_pc_at_out=True,
        ss_at_load_put=True, step_exit_rearms=True, smc_abi=SmcAbi.SMCCC),
    Era(id="7.2", kernels="v7.2 and later", since=(7, 2, 0),
        after="6.14", changes=(("mmio_sign_extend", "85f56708a443"),),
        commits="85f56708a443 'Fix sign-extension of MMIO loads'",
        summary="as 6.14; a sign-extending MMIO load keeps its sign bits",
        entry_ss=UNTOUCHED, skip=SKIP_DEFERRED, mmio_guard=True, commit_pc_at_out=True,
        ss_at_load_put=True, step_exit_rearms=True, smc_abi=SmcAbi.SMCCC, mmio_sign_extend=True),
    Era(id="arch", kernels="Mark Rutland's 2018 proposal", released=False,
        commits="the Arm ARM D2.11 state machine",
        summary="follow the architectural state machine: emulation advances it, nothing forces it",
        entry_ss=UNTOUCHED, skip=SKIP_EL1_CLEAR, mmio_guard=True, step_exit_rearms=True, armed_at_enable=True,
        smc_abi=SmcAbi.SMCCC, mmio_sign_extend=True),
)}

ERA_IDS = tuple(ERAS)


class UnknownEra(ValueError):
    pass


def era_for_version(version: Version) -> Era:
    """The era model that stands for upstream kernel `version` (exactly one)."""
    (era,) = [e for e in ERAS.values() if e.covers(version)]
    return era


def select(spec: str) -> list[Era]:
    """`all`, one era id, or a comma-separated list."""
    if spec == "all":
        return list(ERAS.values())
    out = []
    for part in spec.split(","):
        part = part.strip()
        if part not in ERAS:
            raise UnknownEra(f"unknown era {part!r} (known: {', '.join(ERA_IDS)}, all)")
        if ERAS[part] not in out:           # each era once, in the order named
            out.append(ERAS[part])
    return out
