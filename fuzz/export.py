"""Export cases as C: standalone reproducers and KVM selftests.

Both check the same thing: single-stepping the guest with
KVM_GUESTDBG_SINGLESTEP stops after exactly one instruction each time, at
the PCs of the ideal stepper (the reference), and the run ends as it
should.

- `standalone(cases)`: one self-contained C file, libc and <linux/kvm.h>
  only.  It embeds the VMM core of the real-KVM runner (oracle/realkvm/vmm.c),
  so the reproducer drives KVM exactly as `stepfuzz kvm` does.  Exit 0: every
  stop as expected; 1: a divergence; 2: setup failure.
- `selftest(cases)`: a test for tools/testing/selftests/kvm/arm64/, in the
  style of debug-exceptions.c, using the selftest library.

No text from a case reaches the C source unescaped: names and disassembly
go through `c_comment`/`c_string`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from oracle.asm import disasm
from oracle.case import INSN_EVENTS, Case
from oracle.guest import END, LEFT_CODE, MAX_STEPS, NO_SYNDROME, execute
from oracle.reference import reference

VMM_SOURCE = Path(__file__).resolve().parent.parent / "oracle" / "realkvm" / "vmm.c"
EXPORTABLE_ENDINGS = {END: "end", MAX_STEPS: "max-steps", LEFT_CODE: "left-code", NO_SYNDROME: "error"}
ENOSYS = 38
TIMED = INSN_EVENTS         # a VMM cannot time them


class NotExportable(ValueError):
    pass


def c_comment(text: str) -> str:
    """Printable ASCII only, no way to close the comment early, no trigraphs."""
    clean = "".join(ch if 32 <= ord(ch) < 127 else "." for ch in text)
    return clean.replace("*/", "* /").replace("/*", "/ *").replace("??", "? ?")


def c_string(text: str) -> str:
    out = []
    for ch in text:
        if ch in '\\"':
            out.append("\\" + ch)
        elif 32 <= ord(ch) < 127 and ch != "?":       # '?' would allow trigraphs
            out.append(ch)
        else:
            out.append(f"\\{ord(ch) & 0xFF:03o}")
    return '"' + "".join(out) + '"'


@dataclass
class Expectation:
    case: Case
    pcs: list[int]
    ending: str
    detail: str
    dropped: list[str]          # events a VMM cannot reproduce


def as_reproduced(case: Case) -> Case:
    """The case a reproducer runs: without the events a VMM cannot time."""
    return replace(case, events=tuple(e for e in case.events if e.when not in TIMED))


def expectation(case: Case) -> Expectation:
    log = execute(case)
    ref = reference(log)
    if ref.outcome not in EXPORTABLE_ENDINGS:
        raise NotExportable(f"the guest's run ends with '{ref.outcome}' ({ref.detail}): a reproducer cannot check that")
    dropped = [f"{e.when} insn {e.at}: {e.what}" for e in case.events if e.when in TIMED]
    return Expectation(case, ref.pcs, EXPORTABLE_ENDINGS[ref.outcome],
                       str(ENOSYS) if ref.outcome == NO_SYNDROME else "", dropped)


def _title(case: Case, index: int) -> str:
    return case.name or case.source or f"case {index}"


def _words_c(case: Case, indent: str) -> str:
    return "\n".join(f"{indent}0x{w:08x}, /* {case.base + 4 * i:#x}: {c_comment(disasm(w, case.base + 4 * i))} */"
                     for i, w in enumerate(case.words))


def _events(case: Case) -> list[tuple[str, int, str]]:
    kinds = {"immediate-exit": "DO_IMMEDIATE", "signal": "DO_SIGNAL", "preempt": "DO_PREEMPT"}
    return [("EV_MMIO" if e.when == "mmio-exit" else "EV_STOP", e.at, kinds[e.what])
            for e in as_reproduced(case).events]


def _case_table(exps: list[Expectation]) -> str:
    kinds = {"ram": "R_RAM", "mmio": "R_MMIO", "mmio-kernel": "R_KERNEL"}
    blocks = []
    for i, x in enumerate(exps):
        c = x.case
        regs = dict(c.regs)
        reg_init = ", ".join(f"[{31 if k == 'sp' else int(k[1:])}] = {v:#x}" for k, v in regs.items())
        regions = ", ".join(f"{{ {r.base:#x}, {r.size:#x}, {kinds[r.kind]}, {int(r.prefault)} }}" for r in c.memory)
        evs = _events(c)
        events = ", ".join(f"{{ {w}, {n}, {what} }}" for w, n, what in evs)
        notes = "".join(f"\t\t/* not reproducible from userspace, left out: {c_comment(d)} */\n" for d in x.dropped)
        blocks.append(
            f"\t{{\t/* {c_comment(_title(c, i))} */\n{notes}"
            f"\t\t.name = {c_string(_title(c, i))},\n"
            f"\t\t.base = {c.base:#x}, .max_steps = {c.max_steps}, .mmio_read = {c.mmio_read:#x},\n"
            f"\t\t.regs = {{ {reg_init} }},\n"
            f"\t\t.regions = {{ {regions} }}, .nregions = {len(c.memory)},\n"
            f"\t\t.events = {{ {events} }}, .nevents = {len(evs)},\n"
            f"\t\t.words = (const uint32_t[]){{\n{_words_c(c, chr(9) * 3)}\n\t\t}},\n"
            f"\t\t.nwords = {len(c.words)},\n"
            f"\t\t.expected = (const uint64_t[]){{ {', '.join(f'{pc:#x}' for pc in x.pcs) or '0'} }},\n"
            f"\t\t.nexpected = {len(x.pcs)},\n"
            f"\t\t.ending = {c_string(x.ending)}, .ending_detail = {c_string(x.detail)},\n"
            f"\t}},")
    return "\n".join(blocks)


def _check_list(exps: list[Expectation]) -> str:
    return "\n".join(f" *   {i}: {c_comment(_title(x.case, i))}" for i, x in enumerate(exps))


# The case table, the same in both exports (@CASES@: the entries).
CASE_TABLE = r'''struct sf_region { uint64_t base, size; int kind, prefault; };
struct sf_event { int when; uint64_t n; int what; };
struct sf_case {
	const char *name;
	uint64_t base, max_steps, mmio_read, regs[32];
	struct sf_region regions[MAX_REGIONS];
	int nregions;
	struct sf_event events[MAX_EVENTS];
	int nevents;
	const uint32_t *words;
	int nwords;
	const uint64_t *expected;        /* the reference: one stop per instruction */
	size_t nexpected;
	const char *ending, *ending_detail;
};

static const struct sf_case cases[] = {
@CASES@
};
'''


def _with_cases(template: str, exps: list[Expectation]) -> str:
    return template.replace("@CASE_TABLE@", CASE_TABLE).replace("@CASES@", _case_table(exps))


STANDALONE_MAIN = r'''
/* ------------------------------------------------------------ the cases */

@CASE_TABLE@

/* ------------------------------------------------------------ checking */

static void load(struct casedef *c, const struct sf_case *s, long id)
{
	memset(c, 0, sizeof(*c));
	c->id = id;
	c->base = s->base;
	c->max_steps = s->max_steps;
	c->timeout_ms = 20000;
	c->mmio_read = s->mmio_read;
	memcpy(c->regs, s->regs, sizeof(c->regs));
	for (int i = 0; i < s->nregions; i++)
		c->reg[c->nreg++] = (struct region){ s->regions[i].base, s->regions[i].size,
						     s->regions[i].kind, s->regions[i].prefault, NULL };
	for (int i = 0; i < s->nevents; i++)
		c->ev[c->nev++] = (struct event){ s->events[i].when, s->events[i].n, s->events[i].what };
	memcpy(c->words, s->words, 4 * (size_t)s->nwords);
	c->nwords = s->nwords;
}

/* 0: every stop one instruction at the expected PC; 1: not; 2: could not run */
static int check(const struct sf_case *s)
{
	int bad = 0;

	if (!strcmp(ended, "setup") || !strcmp(ended, "unsupported") || !strcmp(ended, "timeout") ||
	    !strcmp(ended, "exit") || !strcmp(ended, "max-runs")) {
		printf("  could not run: %s %s\n", ended, ended_detail);
		return 2;
	}
	for (size_t i = 0; i < nrecorded || i < s->nexpected; i++) {
		int ok = i < nrecorded && i < s->nexpected && recorded[i].pc == s->expected[i];
		if (i < nrecorded)
			printf("  stop %3zu: pc %#llx hsr %#x", i + 1, (unsigned long long)recorded[i].pc, recorded[i].hsr);
		else
			printf("  stop %3zu: (none)", i + 1);
		if (i < s->nexpected)
			printf("  expected pc %#llx", (unsigned long long)s->expected[i]);
		else
			printf("  expected no more stops");
		printf("%s\n", ok ? "" : "  <-- differs");
		bad |= !ok;
	}
	if (strcmp(ended, s->ending) || strcmp(ended_detail, s->ending_detail)) {
		printf("  ended: %s %s, expected: %s %s\n", ended, ended_detail, s->ending, s->ending_detail);
		bad = 1;
	}
	return bad;
}

int main(void)
{
	static struct casedef c;
	int worst = 0;

	quiet = 1;
	setup_signals();
	if (open_kvm() < 0) {
		printf("cannot use /dev/kvm: %s\n", strerror(errno));
		return 2;
	}
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		printf("case %zu: %s\n", i, cases[i].name);
		load(&c, &cases[i], (long)i);
		run_case(&c);
		int verdict = check(&cases[i]);
		printf("case %zu: %s\n", i, verdict == 0 ? "ok: one instruction per stop" :
		       verdict == 1 ? "DIVERGES from one instruction per stop" : "setup failure");
		if (verdict > worst)
			worst = verdict;      /* setup failure (2) outranks a divergence (1) */
	}
	return worst;
}
'''


def standalone(cases: list[Case]) -> str:
    exps = [expectation(c) for c in cases]
    head = (
        "/*\n"
        " * stepfuzz reproducer: single-step each guest below with KVM_GUESTDBG_SINGLESTEP\n"
        " * and check that every KVM_EXIT_DEBUG comes after exactly one guest instruction,\n"
        " * at the PC an ideal single-stepper stops at, and that the run ends as it should.\n"
        " *\n"
        f"{_check_list(exps)}\n"
        " *\n"
        " * Build: aarch64-linux-gnu-gcc -static -O2 -Wall -o repro repro.c (or gcc on arm64)\n"
        " * Run on an arm64 host with /dev/kvm, or `stepfuzz kvm exec repro --kernel K`.\n"
        " * Exit status: 0 every stop as expected, 1 a divergence, 2 setup failure.\n"
        " * Generated by stepfuzz; the VMM below is oracle/realkvm/vmm.c.\n"
        " */\n")
    core = VMM_SOURCE.read_text()
    return head + core + _with_cases(STANDALONE_MAIN, exps)


SELFTEST = r'''// SPDX-License-Identifier: GPL-2.0-only
/*
 * Single-step guests from userspace and check every stop.
 *
 * Each guest below is run with KVM_GUESTDBG_SINGLESTEP; every KVM_EXIT_DEBUG
 * must come after exactly one guest instruction, so the PC at each stop must
 * be the one listed in `expected`.  Generated by stepfuzz from:
@LIST@
 *
 * Differences from the cases' own world (stepfuzz runs them with the MMU
 * off, at the guest physical addresses below): here the selftest library's
 * page tables map each region at the same virtual address onto guest
 * physical memory above 4 GiB, clear of the library's own memslot, so the
 * guest sees the same addresses and stops at the same PCs.  In-kernel MMIO
 * regions become userspace MMIO (the test creates no vGIC; a library that
 * gives every VM one puts it below 4 GiB).  Events that a VMM cannot time
 * (host interrupts, a signal during exit handling) are left out.
 *
 * Put it in tools/testing/selftests/kvm/arm64/ and add it to TEST_GEN_PROGS_arm64
 * (aarch64/ and TEST_GEN_PROGS_aarch64 before 6.14).  Build it in the tree of
 * the kernel it tests: the library of 6.8 and later needs
 * KVM_SET_USER_MEMORY_REGION2, so it cannot test older kernels.
 */
#include <signal.h>
#include <string.h>

#include "kvm_util.h"
#include "processor.h"
#include "test_util.h"

enum { R_RAM, R_MMIO, R_KERNEL };
enum { EV_MMIO, EV_STOP };
enum { DO_IMMEDIATE = 1, DO_SIGNAL = 2, DO_PREEMPT = 4 };
#define MAX_REGIONS 64
#define MAX_EVENTS 256
#define B_SELF 0x14000000u
#define HIGH_GPA (1ULL << 32)

@CASE_TABLE@

static void on_usr1(int sig)
{
}

/* __vcpu_get_reg() reads the same in every library; vcpu_get_reg() took an out-parameter up to 6.12. */
static uint64_t get_pc(struct kvm_vcpu *vcpu)
{
	uint64_t pc;

	TEST_ASSERT(!__vcpu_get_reg(vcpu, ARM64_CORE_REG(regs.pc), &pc), "KVM_GET_ONE_REG(pc) failed");
	return pc;
}

static int pending_for(const struct sf_case *c, int when, uint64_t n)
{
	int what = 0;

	for (int i = 0; i < c->nevents; i++)
		if (c->events[i].when == when && c->events[i].n == n)
			what |= c->events[i].what;
	return what;
}

static void run_case(const struct sf_case *c)
{
	struct kvm_guest_debug debug = { .control = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP };
	uint64_t end = c->base + 4 * c->nwords, stops = 0, mmios = 0;
	struct kvm_vcpu *vcpu;
	struct kvm_vm *vm;
	struct kvm_run *run;
	struct kvm_signal_mask *mask;
	int pending = 0;
	sigset_t usr1;

	uint64_t gpa = HIGH_GPA, code_gpa = 0;

	vm = vm_create_with_one_vcpu(&vcpu, NULL);
	for (int i = 0; i < c->nregions; i++) {
		const struct sf_region *r = &c->regions[i];

		/* RAM gets a memslot; MMIO has none, so its accesses exit to userspace. */
		if (r->kind == R_RAM)
			vm_userspace_mem_region_add(vm, VM_MEM_SRC_ANONYMOUS, gpa, 10 + i,
						    r->size / vm->page_size, 0);
		virt_map(vm, r->base, gpa, r->size / vm->page_size);
		if (r->kind == R_RAM && c->base >= r->base && end + 4 <= r->base + r->size)
			code_gpa = gpa + (c->base - r->base);
		gpa += r->size;
	}
	TEST_ASSERT(code_gpa, "%s: the code is not inside a RAM region", c->name);
	memcpy(addr_gpa2hva(vm, code_gpa), c->words, 4 * c->nwords);
	*(uint32_t *)addr_gpa2hva(vm, code_gpa + 4 * c->nwords) = B_SELF;
	for (int i = 0; i < 31; i++)
		vcpu_set_reg(vcpu, ARM64_CORE_REG(regs.regs[i]), c->regs[i]);
	vcpu_set_reg(vcpu, ARM64_CORE_REG(sp_el1), c->regs[31]);
	vcpu_set_reg(vcpu, ARM64_CORE_REG(regs.pc), c->base);
	vcpu_guest_debug_set(vcpu, &debug);
	run = vcpu->run;

	sigemptyset(&usr1);
	sigaddset(&usr1, SIGUSR1);
	signal(SIGUSR1, on_usr1);
	sigprocmask(SIG_BLOCK, &usr1, NULL);
	/* An empty mask for KVM_RUN (the kernel's sigset_t: 8 bytes): SIGUSR1 gets through there only. */
	mask = calloc(1, sizeof(*mask) + 8);
	TEST_ASSERT(mask, "out of memory");
	mask->len = 8;
	vcpu_ioctl(vcpu, KVM_SET_SIGNAL_MASK, mask);
	free(mask);

	for (;;) {
		struct timespec zero = { 0, 0 };
		int ret;

		if (pending & DO_SIGNAL)
			raise(SIGUSR1);
		run->immediate_exit = !!(pending & DO_IMMEDIATE);
		ret = __vcpu_run(vcpu);	/* one KVM_RUN: _vcpu_run() would retry EINTR itself */
		run->immediate_exit = 0;
		if (pending & DO_SIGNAL)
			sigtimedwait(&usr1, NULL, &zero);
		pending = 0;
		if (ret < 0 && errno == EINTR)
			continue;
		if (ret < 0) {
			TEST_ASSERT(!strcmp(c->ending, "error") && errno == atoi(c->ending_detail),
				    "%s: KVM_RUN failed: %s", c->name, strerror(errno));
			TEST_ASSERT(stops == c->nexpected, "%s: %lu stops before the error, expected %lu",
				    c->name, stops, c->nexpected);
			break;
		}
		if (run->exit_reason == KVM_EXIT_MMIO) {
			if (!run->mmio.is_write)
				memcpy(run->mmio.data, &c->mmio_read, run->mmio.len);
			pending = pending_for(c, EV_MMIO, ++mmios);
			continue;
		}
		if (run->exit_reason == KVM_EXIT_INTR)
			continue;
		TEST_ASSERT(run->exit_reason == KVM_EXIT_DEBUG, "%s: unexpected exit %u", c->name, run->exit_reason);

		uint64_t pc = get_pc(vcpu);

		TEST_ASSERT(stops < c->nexpected, "%s: extra stop at pc 0x%lx", c->name, pc);
		TEST_ASSERT(pc == c->expected[stops],
			    "%s: stop %lu at pc 0x%lx, expected 0x%lx (not one instruction per step)",
			    c->name, stops + 1, pc, c->expected[stops]);
		stops++;
		if (pc == end || pc < c->base || pc > end || stops >= c->max_steps)
			break;
		pending = pending_for(c, EV_STOP, stops);
	}
	TEST_ASSERT(stops == c->nexpected, "%s: %lu stops, expected %lu", c->name, stops, c->nexpected);
	kvm_vm_free(vm);
}

int main(void)
{
	ksft_print_header();
	ksft_set_plan(ARRAY_SIZE(cases));
	for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
		run_case(&cases[i]);
		ksft_test_result_pass("%s\n", cases[i].name);
	}
	ksft_finished();
}
'''


def selftest(cases: list[Case]) -> str:
    exps = [expectation(c) for c in cases]
    return _with_cases(SELFTEST.replace("@LIST@", _check_list(exps)), exps)
