/*
 * stepfuzz's VMM core: single-step one case in a fresh VM on /dev/kvm and
 * report what KVM_RUN returned, as "@@sf" lines (docs/real-kvm.md).
 *
 * Shared by the batch runner (runner.c, which includes this file) and by the
 * standalone reproducers `stepfuzz export --standalone` writes (which embed
 * it, with stepfuzz_vmm.h inlined), so both drive KVM the same way.  Only
 * libc and <linux/kvm.h>.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/klog.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <linux/kvm.h>

#include "stepfuzz_vmm.h"

#define PAGE 0x1000ULL
#define IPA_LIMIT (1ULL << 40)
#define MAX_WORDS 4096
#define INSN_RET 0xd65f03c0u
#define PSTATE_EL1H_DAIF 0x3c5ULL
#define PSCI_1_0 0x10000ULL
#define VGIC_DIST_SIZE 0x10000ULL
#define VGIC_REDIST_SIZE 0x20000ULL  /* RD + SGI frame of one vCPU */
#define SCRATCH_TABLE 0x1000ULL      /* offset of the page table list in the scratch slot */
#define DBGBCR_EXEC_EL1_ALL 0x1fe3ULL /* enabled, EL1, all byte lanes (the selftest's value) */
#define EC_SOFTSTP_LOW 0x32
#define MAX_HANDLERS 4               /* sync, irq, fiq, serror (from EL1 with SP_EL1) */
#define MAX_HANDLER_WORDS 32         /* oracle/case.py VECTOR_MAX_INSNS */
#define REG_VBAR_EL1 ARM64_SYS_REG(3, 0, 12, 0, 0)
#define REG_ESR_EL1 ARM64_SYS_REG(3, 0, 5, 2, 0)
#define REG_FAR_EL1 ARM64_SYS_REG(3, 0, 6, 0, 0)

/* Newer than some UAPI headers here: the SMCCC filter (v6.4). */
#ifndef KVM_ARM_VM_SMCCC_CTRL
#define KVM_ARM_VM_SMCCC_CTRL 0
#define KVM_ARM_VM_SMCCC_FILTER 0
struct kvm_smccc_filter { uint32_t base, nr_functions; uint8_t action, pad[15]; };
#define KVM_SMCCC_FILTER_FWD_TO_USER 2
#endif
#ifndef KVM_HYPERCALL_EXIT_SMC
#define KVM_HYPERCALL_EXIT_SMC (1U << 0)
#endif

struct region { uint64_t base, size; int kind, prefault; void *host; };
struct event {
	int when; uint64_t n; int what;
	int reg; uint64_t value;                       /* DO_SET_REG */
	int control, nbps; uint64_t bps[MAX_HW_BPS];   /* DO_DEBUG */
	int line, level;                               /* DO_IRQ_LINE */
};
/* One exception handler: its words at VBAR_EL1 + offset. */
struct handler { uint64_t offset; int nwords; uint32_t words[MAX_HANDLER_WORDS]; };
/* EL1 exception registers a case may start with (bit i of casedef.el1_set). */
enum { EL1_ELR, EL1_SPSR, EL1_ESR, EL1_FAR, NUM_EL1 };

struct casedef {
	long id;
	uint64_t base, max_steps, timeout_ms, mmio_read;
	uint64_t regs[32];
	uint64_t daif, hypercall_result;
	int has_daif;                  /* else DAIF starts all masked, as a vCPU resets */
	uint64_t el1[NUM_EL1];
	unsigned el1_set;
	int has_vectors;               /* VBAR_EL1 = vbar, and the handlers below */
	uint64_t vbar;
	struct handler handler[MAX_HANDLERS];
	int nhandlers;
	uint64_t smccc[MAX_SMCCC][2];
	int nsmccc;
	struct region reg[MAX_REGIONS];
	int nreg;
	struct event ev[MAX_EVENTS];
	int nev;
	uint32_t words[MAX_WORDS];
	int nwords;
};

/* The prefault prologue, run by the guest with stepping off.  x3 points to a
 * list of entries (page | 2 | exec), 0-terminated; x4 is an address outside
 * every memslot.  For each page: call into it if it will hold code (the page
 * is filled with `ret`, so the fetch maps the instruction side), then load
 * and store (data side, writable).  The final store exits to userspace. */
__asm__(
	".pushsection .rodata\n"
	".balign 4\n"
	".globl sf_prologue_start\n"
	"sf_prologue_start:\n"
	"1:	ldr	x1, [x3], #8\n"
	"	cbz	x1, 3f\n"
	"	and	x2, x1, #0xfffffffffffff000\n"
	"	tbz	x1, #0, 2f\n"
	"	blr	x2\n"
	"2:	ldr	x5, [x2]\n"
	"	str	x5, [x2]\n"
	"	b	1b\n"
	"3:	str	xzr, [x4]\n"
	"	b	3b\n"
	".globl sf_prologue_end\n"
	"sf_prologue_end:\n"
	".popsection\n");
extern const uint32_t sf_prologue_start[], sf_prologue_end[];

/* What the last case showed, for a caller that checks it itself. */
#define MAX_RECORDED 65536
struct stop_record { uint64_t pc; uint32_t hsr; };
static struct stop_record recorded[MAX_RECORDED];
static size_t nrecorded;
static uint64_t written[MAX_RECORDED];   /* the data of each MMIO write to userspace (reproducers check it) */
static size_t nwritten;
static char ended[16], ended_detail[160];
static int quiet;                 /* no "@@sf" lines: the caller prints its own */

static int kvm_fd = -1;
static volatile sig_atomic_t timed_out;
static long kvm_run_size;

/* ------------------------------------------------------------ output */

static char outbuf[1 << 16];
static size_t outlen;

static void flush_out(void)
{
	size_t done = 0;
	while (done < outlen) {
		ssize_t n = write(1, outbuf + done, outlen - done);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		done += (size_t)n;
	}
	outlen = 0;
}

/* Time inside KVM_RUN, and in each stage of a case (the runner reports
 * them with each batch's `done`, so a benchmark can say what dominates). */
static uint64_t run_ns;
enum { STAGE_SETUP, STAGE_PREFAULT, STAGE_STEP, STAGE_TEARDOWN, NUM_STAGES };
static uint64_t stage_ns[NUM_STAGES];

static uint64_t now_ns(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000ULL + (uint64_t)t.tv_nsec;
}

static uint64_t stage_began;
static int stage = -1;

/* The current stage (if any) ends now and `next` (-1: none) begins. */
static void stage_to(int next)
{
	uint64_t t = now_ns();

	if (stage >= 0)
		stage_ns[stage] += t - stage_began;
	stage_began = t;
	stage = next;
}

static int kvm_run(int vcpu)
{
	uint64_t t0 = now_ns();
	int r = ioctl(vcpu, KVM_RUN, 0);
	int err = errno;

	run_ns += now_ns() - t0;
	errno = err;
	return r;
}

/* One protocol line; whole lines are buffered so they reach the console in one write. */
static void out(const char *fmt, ...)
{
	if (quiet)
		return;
	char line[512];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(line, sizeof(line) - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if (n > (int)sizeof(line) - 2)
		n = sizeof(line) - 2;
	line[n++] = '\n';
	if (outlen + (size_t)n + 5 > sizeof(outbuf))
		flush_out();
	memcpy(outbuf + outlen, "@@sf ", 5);
	memcpy(outbuf + outlen + 5, line, (size_t)n);
	outlen += (size_t)n + 5;
}

/* ------------------------------------------------------------ KVM helpers */

static uint64_t core_reg(size_t offset)
{
	return KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | (offset / sizeof(uint32_t));
}

static int set_reg(int vcpu, uint64_t id, uint64_t value)
{
	struct kvm_one_reg r = { .id = id, .addr = (uint64_t)(uintptr_t)&value };
	return ioctl(vcpu, KVM_SET_ONE_REG, &r);
}

static int get_reg(int vcpu, uint64_t id, uint64_t *value)
{
	struct kvm_one_reg r = { .id = id, .addr = (uint64_t)(uintptr_t)value };
	return ioctl(vcpu, KVM_GET_ONE_REG, &r);
}

#define REG_X(i) core_reg(offsetof(struct kvm_regs, regs.regs) + 8 * (i))
#define REG_SP_EL0 core_reg(offsetof(struct kvm_regs, regs.sp))
#define REG_PC core_reg(offsetof(struct kvm_regs, regs.pc))
#define REG_PSTATE core_reg(offsetof(struct kvm_regs, regs.pstate))
#define REG_SP_EL1 core_reg(offsetof(struct kvm_regs, sp_el1))
#define REG_ELR_EL1 core_reg(offsetof(struct kvm_regs, elr_el1))
#define REG_SPSR_EL1 core_reg(offsetof(struct kvm_regs, spsr[0]))

static int set_memslot(int vm, int slot, uint64_t ipa, uint64_t size, void *host)
{
	struct kvm_userspace_memory_region m = {
		.slot = (uint32_t)slot, .guest_phys_addr = ipa, .memory_size = size,
		.userspace_addr = (uint64_t)(uintptr_t)host,
	};
	return ioctl(vm, KVM_SET_USER_MEMORY_REGION, &m);
}

static void on_alarm(int sig)
{
	(void)sig;
	timed_out = 1;
}

/* SIGUSR1 is only ever consumed with sigtimedwait; should it be delivered
 * anyway, it must not kill the runner. */
static void on_usr1(int sig)
{
	(void)sig;
}

static void arm_timer(uint64_t ms)
{
	struct itimerval t = { { 0, 0 }, { (time_t)(ms / 1000), (suseconds_t)(ms % 1000) * 1000 } };
	timed_out = 0;
	setitimer(ITIMER_REAL, &t, NULL);
}

static void disarm_timer(void)
{
	struct itimerval t = { { 0, 0 }, { 0, 0 } };
	setitimer(ITIMER_REAL, &t, NULL);
}

/* Move this thread to another CPU: the closest thing to "preempted and
 * migrated before entry" a VMM can force (docs/real-kvm.md). */
static int migrate(void)
{
	cpu_set_t set;
	int cur = sched_getcpu(), n = (int)sysconf(_SC_NPROCESSORS_ONLN);

	if (n < 2)
		return -1;
	CPU_ZERO(&set);
	CPU_SET((cur + 1) % n, &set);
	return sched_setaffinity(0, sizeof(set), &set);
}

/* ------------------------------------------------------------ guest physical layout */

struct span { uint64_t lo, hi; };

/* The lowest `align`-aligned gap of `size` bytes below 2^40 that overlaps
 * neither a case region nor anything already taken; 0 if none. */
static uint64_t free_gap(const struct casedef *c, struct span *taken, int ntaken, uint64_t size, uint64_t align,
			 uint64_t at)
{

	for (int tries = 0; tries < 4 * (MAX_REGIONS + 8); tries++) {
		uint64_t hi = 0;
		at = (at + align - 1) & ~(align - 1);
		if (at + size > IPA_LIMIT)
			return 0;
		for (int i = 0; i < c->nreg; i++)
			if (at < c->reg[i].base + c->reg[i].size && c->reg[i].base < at + size && c->reg[i].base + c->reg[i].size > hi)
				hi = c->reg[i].base + c->reg[i].size;
		for (int i = 0; i < ntaken; i++)
			if (at < taken[i].hi && taken[i].lo < at + size && taken[i].hi > hi)
				hi = taken[i].hi;
		if (!hi)
			return at;
		at = hi;
	}
	return 0;
}

/* ------------------------------------------------------------ one case */

struct vm {
	int vm, vcpu, gic;
	struct kvm_run *run;
	uint8_t *scratch;          /* the prologue's memory, while it exists */
	uint64_t scratch_size;
	uint64_t runs;
	long nrec;
};

static void end_case(const struct casedef *c, struct vm *v, const char *reason, const char *detail)
{
	disarm_timer();
	snprintf(ended, sizeof(ended), "%s", reason);
	snprintf(ended_detail, sizeof(ended_detail), "%s", detail ? detail : "");
	out("%ld end %s %ld %s", c->id, reason, v->nrec, detail ? detail : "");
}

static int setup_fail(const struct casedef *c, struct vm *v, const char *what)
{
	char detail[160];
	snprintf(detail, sizeof(detail), "%s: %s", what, strerror(errno));
	end_case(c, v, ENDED_SETUP, detail);
	return -1;
}

/* Where handler i's words begin, and just past its last. */
static uint64_t handler_first(const struct casedef *c, int i)
{
	return c->vbar + c->handler[i].offset;
}

static uint64_t handler_end(const struct casedef *c, int i)
{
	return handler_first(c, i) + 4ULL * (uint64_t)c->handler[i].nwords;
}

/* Is `pc` one of a handler's words (its first to its last)? */
static int in_handler(const struct casedef *c, uint64_t pc)
{
	for (int i = 0; c->has_vectors && i < c->nhandlers; i++)
		if (pc >= handler_first(c, i) && pc < handler_end(c, i))
			return 1;
	return 0;
}

/* Will the page at `page` hold code (the case's, its `b .`, or a handler's)? */
static int exec_page(const struct casedef *c, uint64_t page, uint64_t end_code)
{
	if (page + PAGE > c->base && page < end_code + 4)
		return 1;
	for (int i = 0; c->has_vectors && i < c->nhandlers; i++)
		if (page + PAGE > handler_first(c, i) && page < handler_end(c, i))
			return 1;
	return 0;
}

/* Run the prefault prologue: map every prefaulted page at stage 2, from
 * inside the guest, before stepping is turned on.  Its exits are not reported. */
static int prefault(const struct casedef *c, struct vm *v, struct span *taken, int *ntaken, uint64_t end_code)
{
	uint64_t npages = 0, scratch_size, scratch, done, *table;
	uint8_t *mem;
	size_t code = (size_t)((const char *)sf_prologue_end - (const char *)sf_prologue_start);

	for (int i = 0; i < c->nreg; i++)
		if (c->reg[i].kind == R_RAM && c->reg[i].prefault)
			npages += c->reg[i].size / PAGE;
	if (!npages)
		return 0;
	scratch_size = (SCRATCH_TABLE + 8 * (npages + 1) + PAGE - 1) & ~(PAGE - 1);
	scratch = free_gap(c, taken, *ntaken, scratch_size, PAGE, 0x40000000ULL);   /* gone before the guest runs */
	if (!scratch)
		return end_case(c, v, ENDED_UNSUPPORTED, "no free guest-physical space for the prefault prologue"), -1;
	taken[(*ntaken)++] = (struct span){ scratch, scratch + scratch_size };
	done = free_gap(c, taken, *ntaken, PAGE, PAGE, 0x40000000ULL);
	if (!done)
		return end_case(c, v, ENDED_UNSUPPORTED, "no free guest-physical page for the prologue's exit"), -1;

	mem = mmap(NULL, scratch_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		return setup_fail(c, v, "mmap scratch");
	v->scratch = mem;
	v->scratch_size = scratch_size;
	memcpy(mem, sf_prologue_start, code);
	table = (uint64_t *)(mem + SCRATCH_TABLE);
	for (int i = 0; i < c->nreg; i++) {
		const struct region *r = &c->reg[i];
		if (r->kind != R_RAM || !r->prefault)
			continue;
		for (uint64_t off = 0; off < r->size; off += PAGE) {
			uint64_t page = r->base + off;
			int exec = exec_page(c, page, end_code);
			uint32_t *w = (uint32_t *)((uint8_t *)r->host + off);
			for (unsigned k = 0; k < PAGE / 4; k++)
				w[k] = INSN_RET;
			*table++ = page | 2 | (uint64_t)exec;
		}
		__builtin___clear_cache((char *)r->host, (char *)r->host + r->size);
	}
	*table = 0;
	__builtin___clear_cache((char *)mem, (char *)mem + code);

	if (set_memslot(v->vm, MAX_REGIONS, scratch, scratch_size, mem) < 0)
		return setup_fail(c, v, "KVM_SET_USER_MEMORY_REGION (scratch)");
	if (set_reg(v->vcpu, REG_PC, scratch) < 0 || set_reg(v->vcpu, REG_X(3), scratch + SCRATCH_TABLE) < 0 ||
	    set_reg(v->vcpu, REG_X(4), done) < 0 || set_reg(v->vcpu, REG_PSTATE, PSTATE_EL1H_DAIF) < 0)
		return setup_fail(c, v, "KVM_SET_ONE_REG (prologue)");
	for (uint64_t runs = 0;; runs++) {
		if (timed_out)
			return end_case(c, v, ENDED_TIMEOUT, "in the prefault prologue"), -1;
		if (runs > 64 + 4 * npages)
			return end_case(c, v, ENDED_SETUP, "prefault prologue did not finish"), -1;
		if (kvm_run(v->vcpu) < 0) {
			if (errno == EINTR)
				continue;
			return setup_fail(c, v, "KVM_RUN (prefault prologue)");
		}
		if (v->run->exit_reason == KVM_EXIT_MMIO && v->run->mmio.phys_addr == done)
			break;
		char detail[96];
		snprintf(detail, sizeof(detail), "prefault prologue: unexpected exit %u", v->run->exit_reason);
		return end_case(c, v, ENDED_SETUP, detail), -1;
	}
	/* Abandon the prologue's MMIO store instead of completing it: a
	 * completion would advance the PC, and on 5.11-5.12.9 that increment
	 * stays pending and would be applied to the case's first entry.  With
	 * exit_reason reset, no kernel looks at the old exit again (every new
	 * MMIO exit sets up its own completion). */
	v->run->exit_reason = KVM_EXIT_UNKNOWN;
	if (set_memslot(v->vm, MAX_REGIONS, scratch, 0, mem) < 0)
		return setup_fail(c, v, "KVM_SET_USER_MEMORY_REGION (delete scratch)");
	munmap(mem, scratch_size);
	v->scratch = NULL;
	/* Back to all zeros; the code goes in afterwards. */
	for (int i = 0; i < c->nreg; i++)
		if (c->reg[i].kind == R_RAM && c->reg[i].prefault)
			memset(c->reg[i].host, 0, c->reg[i].size);
	return 0;
}

static int create_vgic(const struct casedef *c, struct vm *v, const struct region *dist, struct span *taken, int *ntaken)
{
	struct kvm_create_device d = { .type = KVM_DEV_TYPE_ARM_VGIC_V3 };
	uint64_t dist_base = dist->base, redist;
	struct kvm_device_attr a = { .group = KVM_DEV_ARM_VGIC_GRP_ADDR };

	/* where a guest is least likely to reach, and the host knows (batch.py REDIST_BASE) */
	redist = free_gap(c, taken, *ntaken, VGIC_REDIST_SIZE, 0x10000, VGIC_REDIST_BASE);
	if (!redist)
		return end_case(c, v, ENDED_UNSUPPORTED, "no free 64 KiB-aligned 128 KiB gap for the vGIC redistributor"), -1;
	taken[(*ntaken)++] = (struct span){ redist, redist + VGIC_REDIST_SIZE };
	if (ioctl(v->vm, KVM_CREATE_DEVICE, &d) < 0)
		return setup_fail(c, v, "KVM_CREATE_DEVICE (vGICv3)");
	v->gic = (int)d.fd;
	a.attr = KVM_VGIC_V3_ADDR_TYPE_DIST;
	a.addr = (uint64_t)(uintptr_t)&dist_base;
	if (ioctl(v->gic, KVM_SET_DEVICE_ATTR, &a) < 0)
		return setup_fail(c, v, "vGIC distributor address");
	a.attr = KVM_VGIC_V3_ADDR_TYPE_REDIST;
	a.addr = (uint64_t)(uintptr_t)&redist;
	if (ioctl(v->gic, KVM_SET_DEVICE_ATTR, &a) < 0)
		return setup_fail(c, v, "vGIC redistributor address");
	struct kvm_device_attr init = { .group = KVM_DEV_ARM_VGIC_GRP_CTRL, .attr = KVM_DEV_ARM_VGIC_CTRL_INIT };
	if (ioctl(v->gic, KVM_SET_DEVICE_ATTR, &init) < 0)
		return setup_fail(c, v, "vGIC init");
	return 0;
}

/* Why the runner cannot take this case, or NULL. */
static const char *unsupported(const struct casedef *c, const struct region **dist)
{
	int nkernel = 0;

	*dist = NULL;
	for (int i = 0; i < c->nreg; i++) {
		if (c->reg[i].kind != R_KERNEL)
			continue;
		nkernel++;
		*dist = &c->reg[i];
	}
	if (nkernel > 1)
		return "more than one mmio-kernel region (the runner has one vGIC distributor)";
	if (*dist && ((*dist)->base % 0x10000 || (*dist)->size != VGIC_DIST_SIZE))
		return "an mmio-kernel region must be a 64 KiB-aligned, 64 KiB vGIC distributor";
	return NULL;
}

/* The events that come after the Nth exit of kind `when`, added to `pending`. */
static int add_events(const struct casedef *c, int when, uint64_t n, int *pending, int npending)
{
	for (int i = 0; i < c->nev && npending < MAX_EVENTS; i++)
		if (c->ev[i].when == when && c->ev[i].n == n)
			pending[npending++] = i;
	return npending;
}

static int set_guest_debug(int vcpu, const struct event *e, uint64_t end_code)
{
	struct kvm_guest_debug dbg;
	int n = 0;

	memset(&dbg, 0, sizeof(dbg));
	if (e->control != DEBUG_OFF)
		dbg.control = KVM_GUESTDBG_ENABLE | (e->control == DEBUG_STEP ? KVM_GUESTDBG_SINGLESTEP : 0);
	if (e->control != DEBUG_OFF) {
		for (int i = 0; i < e->nbps; i++, n++) {
			dbg.arch.dbg_bvr[n] = e->bps[i];
			dbg.arch.dbg_bcr[n] = DBGBCR_EXEC_EL1_ALL;
		}
		/* continuing, the VMM keeps a breakpoint at the end of the code */
		if (e->control == DEBUG_CONTINUE) {
			dbg.arch.dbg_bvr[n] = end_code;
			dbg.arch.dbg_bcr[n++] = DBGBCR_EXEC_EL1_ALL;
		}
		if (n)
			dbg.control |= KVM_GUESTDBG_USE_HW;
	}
	return ioctl(vcpu, KVM_SET_GUEST_DEBUG, &dbg);
}

/* The vCPU's own IRQ or FIQ input (no in-kernel irqchip: HCR_EL2.VI / VF). */
static int irq_line(int vm, int line, int level)
{
	struct kvm_irq_level irq = {
		.irq = (KVM_ARM_IRQ_TYPE_CPU << KVM_ARM_IRQ_TYPE_SHIFT) | (0 << KVM_ARM_IRQ_VCPU_SHIFT) |
		       (line == LINE_FIQ ? KVM_ARM_IRQ_CPU_FIQ : KVM_ARM_IRQ_CPU_IRQ),
		.level = (uint32_t)level,
	};
	return ioctl(vm, KVM_IRQ_LINE, &irq);
}

static int set_one(int vcpu, int reg, uint64_t value)
{
	if (reg < 31)
		return set_reg(vcpu, REG_X(reg), value);
	if (reg == 31)
		return set_reg(vcpu, REG_SP_EL1, value);
	if (reg == REG_INDEX_PC)
		return set_reg(vcpu, REG_PC, value);
	uint64_t pstate = 0;
	if (get_reg(vcpu, REG_PSTATE, &pstate) < 0)
		return -1;
	return set_reg(vcpu, REG_PSTATE, (pstate & ~0x3c0ULL) | (value & 0x3c0ULL));
}

static int step_loop(const struct casedef *c, struct vm *v, uint64_t end_code)
{
	uint64_t nstops = 0, nmmio = 0, nhyper = 0, neintr = 0, max_runs = 8 * c->max_steps + 64;
	int flags = 0, mmio_open = 0, pending[MAX_EVENTS], npending = 0;
	struct kvm_run *run = v->run;
	sigset_t usr1;
	struct timespec zero = { 0, 0 };

	sigemptyset(&usr1);
	sigaddset(&usr1, SIGUSR1);
	npending = add_events(c, EV_START, 0, pending, 0);
	for (;;) {
		if (timed_out)
			return end_case(c, v, ENDED_TIMEOUT, ""), 0;
		if (v->runs >= max_runs)
			return end_case(c, v, ENDED_MAX_RUNS, ""), 0;
		/* The VMM's actions, in the order the case lists them; events they
		 * trigger (an eintr) wait for the next round. */
		int actions[MAX_EVENTS], nactions = npending;
		memcpy(actions, pending, sizeof(int) * (size_t)npending);
		npending = 0;
		for (int k = 0; k < nactions; k++) {
			const struct event *e = &c->ev[actions[k]];
			flags |= e->what & (DO_IMMEDIATE | DO_SIGNAL | DO_PREEMPT);
			if (e->what == DO_DEBUG && set_guest_debug(v->vcpu, e, end_code) < 0)
				return setup_fail(c, v, "KVM_SET_GUEST_DEBUG");
			if (e->what == DO_IRQ_LINE && irq_line(v->vm, e->line, e->level) < 0)
				return setup_fail(c, v, e->line == LINE_FIQ ? "KVM_IRQ_LINE (fiq)" : "KVM_IRQ_LINE (irq)");
			if (e->what != DO_SET_REG)
				continue;
			if (mmio_open) {
				/* complete the MMIO exit before touching registers, as the API asks */
				mmio_open = 0;
				run->immediate_exit = 1;
				int r = kvm_run(v->vcpu);
				run->immediate_exit = 0;
				v->runs++;
				if (r < 0 && errno == EINTR) {
					out("%ld I", c->id);
					v->nrec++;
					npending = add_events(c, EV_EINTR, ++neintr, pending, npending);
				}
			}
			if (set_one(v->vcpu, e->reg, e->value) < 0)
				return setup_fail(c, v, "KVM_SET_ONE_REG (set-reg)");
			/* a written PC is where the guest goes on: outside its code, the run is over */
			if (e->reg == REG_INDEX_PC && (e->value < c->base || e->value > end_code) && !in_handler(c, e->value))
				return end_case(c, v, ENDED_LEFT_CODE, ""), 0;
		}
		if ((flags & DO_PREEMPT) && migrate() < 0)
			out("%ld note preempt: cannot move to another CPU (%s)", c->id, strerror(errno));
		if (flags & DO_SIGNAL)
			raise(SIGUSR1);           /* blocked here, unblocked inside KVM_RUN */
		run->immediate_exit = (flags & DO_IMMEDIATE) ? 1 : 0;
		int ret = kvm_run(v->vcpu);
		int err = errno;
		run->immediate_exit = 0;
		if (flags & DO_SIGNAL)
			sigtimedwait(&usr1, NULL, &zero);   /* never let it reach a later KVM_RUN */
		flags = 0;
		mmio_open = 0;
		v->runs++;
		if (ret < 0) {
			if (err == EINTR) {
				if (timed_out)
					return end_case(c, v, ENDED_TIMEOUT, ""), 0;
				out("%ld I", c->id);
				v->nrec++;
				npending = add_events(c, EV_EINTR, ++neintr, pending, npending);
				continue;
			}
			out("%ld E %d", c->id, err);
			v->nrec++;
			char detail[64];
			snprintf(detail, sizeof(detail), "%d", err);
			return end_case(c, v, ENDED_ERROR, detail), 0;
		}
		switch (run->exit_reason) {
		case KVM_EXIT_DEBUG: {
			uint64_t pc = 0;
			uint32_t hsr = run->debug.arch.hsr;
			if (get_reg(v->vcpu, REG_PC, &pc) < 0)
				return setup_fail(c, v, "KVM_GET_ONE_REG (pc)");
			out("%ld S %#llx %#x", c->id, (unsigned long long)pc, hsr);
			if (nrecorded < MAX_RECORDED)
				recorded[nrecorded++] = (struct stop_record){ pc, hsr };
			v->nrec++;
			nstops++;
			if (pc == end_code)
				return end_case(c, v, ENDED_END, ""), 0;
			if ((pc < c->base || pc > end_code) && !in_handler(c, pc))
				return end_case(c, v, ENDED_LEFT_CODE, ""), 0;
			if (nstops >= c->max_steps)
				return end_case(c, v, ENDED_MAX_STEPS, ""), 0;
			npending = add_events(c, EV_STOP, nstops, pending, npending);
			if ((hsr >> 26) != EC_SOFTSTP_LOW && !npending)
				return end_case(c, v, ENDED_BREAKPOINT, ""), 0;
			break;
		}
		case KVM_EXIT_MMIO: {
			uint64_t data = 0;
			unsigned len = run->mmio.len > 8 ? 8 : run->mmio.len;
			if (run->mmio.is_write) {
				memcpy(&data, run->mmio.data, len);
				if (nwritten < MAX_RECORDED)
					written[nwritten++] = data;
			} else {
				data = len < 8 ? c->mmio_read & ((1ULL << (8 * len)) - 1) : c->mmio_read;
				memcpy(run->mmio.data, &data, len);   /* little-endian host */
			}
			out("%ld M %c %#llx %u %#llx", c->id, run->mmio.is_write ? 'w' : 'r',
			    (unsigned long long)run->mmio.phys_addr, run->mmio.len, (unsigned long long)data);
			v->nrec++;
			mmio_open = 1;
			npending = add_events(c, EV_MMIO, ++nmmio, pending, npending);
			break;
		}
		case KVM_EXIT_HYPERCALL:
			/* the PC is past the call already; the answer goes in x0.  (`flags`
			 * shares its low half with `longmode`, all older headers have.) */
			out("%ld H %s %#llx", c->id, (run->hypercall.longmode & KVM_HYPERCALL_EXIT_SMC) ? "smc" : "hvc",
			    (unsigned long long)run->hypercall.nr);
			v->nrec++;
			if (set_reg(v->vcpu, REG_X(0), c->hypercall_result) < 0)
				return setup_fail(c, v, "KVM_SET_ONE_REG (hypercall result)");
			npending = add_events(c, EV_HYPERCALL, ++nhyper, pending, npending);
			break;
		case KVM_EXIT_INTR:
			out("%ld I", c->id);
			v->nrec++;
			break;
		default: {
			char detail[32];
			snprintf(detail, sizeof(detail), "%u", run->exit_reason);
			return end_case(c, v, ENDED_EXIT, detail), 0;
		}
		}
	}
}

/* Guest instructions into guest memory, one 32-bit store each.  Not memcpy:
 * under QEMU 7.2's TCG, glibc's memcpy (its SVE variant, on QEMU's `max` CPU)
 * did not drop the translations of the words a page held before, and a later
 * VM that got the page ran those instead (docs/real-kvm.md). */
static void put_words(uint32_t *to, const uint32_t *words, int n)
{
	volatile uint32_t *w = to;

	for (int i = 0; i < n; i++)
		w[i] = words[i];
}

/* The handlers' words, each in the ram region that holds it (after the
 * prefault prologue, like the code), with an I-cache sync. */
static int write_handlers(const struct casedef *c, struct vm *v)
{
	for (int i = 0; c->has_vectors && i < c->nhandlers; i++) {
		const struct handler *h = &c->handler[i];
		uint64_t first = handler_first(c, i), last = handler_end(c, i);
		const struct region *r = NULL;
		for (int k = 0; k < c->nreg && !r; k++)
			if (c->reg[k].kind == R_RAM && first >= c->reg[k].base && last <= c->reg[k].base + c->reg[k].size)
				r = &c->reg[k];
		if (!r || (first & 3)) {
			char detail[96];
			snprintf(detail, sizeof(detail), "the handler at %#llx is not inside one ram region",
				 (unsigned long long)first);
			return end_case(c, v, ENDED_UNSUPPORTED, detail), -1;
		}
		uint8_t *at = (uint8_t *)r->host + (first - r->base);
		put_words((uint32_t *)at, h->words, h->nwords);
		__builtin___clear_cache((char *)at, (char *)at + 4 * h->nwords);
	}
	return 0;
}

/* VBAR_EL1 and the EL1 exception registers the case starts with. */
static int set_el1_regs(const struct casedef *c, struct vm *v)
{
	static const char *const what[NUM_EL1] = {
		"KVM_SET_ONE_REG (elr_el1)", "KVM_SET_ONE_REG (spsr_el1)",
		"KVM_SET_ONE_REG (esr_el1)", "KVM_SET_ONE_REG (far_el1)" };
	const uint64_t id[NUM_EL1] = { REG_ELR_EL1, REG_SPSR_EL1, REG_ESR_EL1, REG_FAR_EL1 };

	if (c->has_vectors && set_reg(v->vcpu, REG_VBAR_EL1, c->vbar) < 0)
		return setup_fail(c, v, "KVM_SET_ONE_REG (vbar_el1)");
	for (int i = 0; i < NUM_EL1; i++)
		if ((c->el1_set >> i & 1) && set_reg(v->vcpu, id[i], c->el1[i]) < 0)
			return setup_fail(c, v, what[i]);
	return 0;
}

static void run_case(struct casedef *c)
{
	struct vm v = { .vm = -1, .vcpu = -1, .gic = -1 };
	struct span taken[8];
	int ntaken = 0;
	const struct region *dist;
	const char *why;
	uint64_t end_code = c->base + 4ULL * (uint64_t)c->nwords;
	struct region *home = NULL;

	nrecorded = nwritten = 0;
	ended[0] = ended_detail[0] = 0;
	out("%ld begin", c->id);
	stage_to(STAGE_SETUP);
	arm_timer(c->timeout_ms);
	why = unsupported(c, &dist);
	if (why) {
		end_case(c, &v, ENDED_UNSUPPORTED, why);
		goto out;
	}
	v.vm = ioctl(kvm_fd, KVM_CREATE_VM, 0);
	if (v.vm < 0) {
		setup_fail(c, &v, "KVM_CREATE_VM");
		goto out;
	}
	for (int i = 0; i < c->nreg; i++) {
		struct region *r = &c->reg[i];
		if (r->kind != R_RAM)
			continue;
		r->host = mmap(NULL, r->size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
		if (r->host == MAP_FAILED) {
			r->host = NULL;
			setup_fail(c, &v, "mmap guest ram");
			goto out;
		}
		/* 4 KiB stage-2 mappings, and every page present and writable in
		 * the host, so a first read fault maps it writable at once. */
		madvise(r->host, r->size, MADV_NOHUGEPAGE);
		memset(r->host, 0, r->size);
		if (set_memslot(v.vm, i, r->base, r->size, r->host) < 0) {
			setup_fail(c, &v, "KVM_SET_USER_MEMORY_REGION");
			goto out;
		}
		if (c->base >= r->base && end_code + 4 <= r->base + r->size)
			home = r;
	}
	if (!home) {
		end_case(c, &v, ENDED_UNSUPPORTED, "the code is not inside one ram region");
		goto out;
	}
	v.vcpu = ioctl(v.vm, KVM_CREATE_VCPU, 0);
	if (v.vcpu < 0) {
		setup_fail(c, &v, "KVM_CREATE_VCPU");
		goto out;
	}
	struct kvm_vcpu_init init;
	memset(&init, 0, sizeof(init));
	if (ioctl(v.vm, KVM_ARM_PREFERRED_TARGET, &init) < 0) {
		setup_fail(c, &v, "KVM_ARM_PREFERRED_TARGET");
		goto out;
	}
	init.features[0] |= 1u << KVM_ARM_VCPU_PSCI_0_2;
	if (ioctl(v.vcpu, KVM_ARM_VCPU_INIT, &init) < 0) {
		setup_fail(c, &v, "KVM_ARM_VCPU_INIT");
		goto out;
	}
	if (dist && create_vgic(c, &v, dist, taken, &ntaken) < 0)
		goto out;
	for (int i = 0; i < c->nsmccc; i++) {
		struct kvm_smccc_filter filter = { .base = (uint32_t)c->smccc[i][0], .nr_functions = (uint32_t)c->smccc[i][1],
						   .action = KVM_SMCCC_FILTER_FWD_TO_USER };
		struct kvm_device_attr a = { .group = KVM_ARM_VM_SMCCC_CTRL, .attr = KVM_ARM_VM_SMCCC_FILTER,
					     .addr = (uint64_t)(uintptr_t)&filter };
		if (ioctl(v.vm, KVM_SET_DEVICE_ATTR, &a) < 0) {
			setup_fail(c, &v, "KVM_SET_DEVICE_ATTR (SMCCC filter)");
			goto out;
		}
	}
	/* Every kernel answers PSCI_VERSION with 1.0, as the model does. */
	if (set_reg(v.vcpu, KVM_REG_ARM_PSCI_VERSION, PSCI_1_0) < 0)
		out("%ld note psci-version: the kernel refused PSCI 1.0 (%s)", c->id, strerror(errno));
	v.run = mmap(NULL, (size_t)kvm_run_size, PROT_READ | PROT_WRITE, MAP_SHARED, v.vcpu, 0);
	if (v.run == MAP_FAILED) {
		v.run = NULL;
		setup_fail(c, &v, "mmap kvm_run");
		goto out;
	}
	/* All signals open inside KVM_RUN: a raised SIGUSR1 (blocked outside)
	 * makes it return EINTR; SIGALRM ends a case that runs too long. */
	struct { struct kvm_signal_mask m; uint8_t set[8]; } mask;
	memset(&mask, 0, sizeof(mask));
	mask.m.len = 8;
	if (ioctl(v.vcpu, KVM_SET_SIGNAL_MASK, &mask) < 0) {
		setup_fail(c, &v, "KVM_SET_SIGNAL_MASK");
		goto out;
	}
	stage_to(STAGE_PREFAULT);
	if (prefault(c, &v, taken, &ntaken, end_code) < 0)
		goto out;
	stage_to(STAGE_SETUP);

	uint32_t *code = (uint32_t *)((uint8_t *)home->host + (c->base - home->base));
	put_words(code, c->words, c->nwords);
	code[c->nwords] = INSN_B_SELF;
	__builtin___clear_cache((char *)code, (char *)(code + c->nwords + 1));
	if (write_handlers(c, &v) < 0)
		goto out;

	for (int i = 0; i < 31; i++)
		if (set_reg(v.vcpu, REG_X(i), c->regs[i]) < 0) {
			setup_fail(c, &v, "KVM_SET_ONE_REG (x)");
			goto out;
		}
	if (set_reg(v.vcpu, REG_SP_EL0, 0) < 0 || set_reg(v.vcpu, REG_SP_EL1, c->regs[31]) < 0 ||
	    set_reg(v.vcpu, REG_PC, c->base) < 0 ||
	    set_reg(v.vcpu, REG_PSTATE, c->has_daif ? (PSTATE_EL1H_DAIF & ~0x3c0ULL) | c->daif : PSTATE_EL1H_DAIF) < 0) {
		setup_fail(c, &v, "KVM_SET_ONE_REG");
		goto out;
	}
	if (set_el1_regs(c, &v) < 0)
		goto out;
	struct kvm_guest_debug dbg;
	memset(&dbg, 0, sizeof(dbg));
	dbg.control = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP;
	if (ioctl(v.vcpu, KVM_SET_GUEST_DEBUG, &dbg) < 0) {
		setup_fail(c, &v, "KVM_SET_GUEST_DEBUG");
		goto out;
	}
	stage_to(STAGE_STEP);
	step_loop(c, &v, end_code);
out:
	stage_to(STAGE_TEARDOWN);
	disarm_timer();
	if (v.run)
		munmap(v.run, (size_t)kvm_run_size);
	if (v.gic >= 0)
		close(v.gic);
	if (v.vcpu >= 0)
		close(v.vcpu);
	if (v.vm >= 0)
		close(v.vm);
	if (v.scratch)
		munmap(v.scratch, v.scratch_size);    /* after the VM: a memslot may still point here */
	for (int i = 0; i < c->nreg; i++)
		if (c->reg[i].host) {
			munmap(c->reg[i].host, c->reg[i].size);
			c->reg[i].host = NULL;
		}
	stage_to(-1);
	flush_out();
}

/* SIGALRM ends a case that runs too long (no SA_RESTART: it interrupts
 * KVM_RUN); SIGUSR1, blocked outside KVM_RUN, is the `signal` event. */
static void setup_signals(void)
{
	struct sigaction sa;
	sigset_t usr1;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_alarm;
	sigaction(SIGALRM, &sa, NULL);
	sa.sa_handler = on_usr1;
	sigaction(SIGUSR1, &sa, NULL);
	sigemptyset(&usr1);
	sigaddset(&usr1, SIGUSR1);
	sigprocmask(SIG_BLOCK, &usr1, NULL);
}

static int open_kvm(void)
{
	/* /dev/kvm is registered before init runs; allow the node a moment anyway. */
	for (int i = 0; i < 100 && kvm_fd < 0; i++) {
		kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
		if (kvm_fd < 0 && getpid() == 1)
			usleep(100000);
		else
			break;
	}
	if (kvm_fd < 0) {
		out("fatal cannot open /dev/kvm: %s", strerror(errno));
		return -1;
	}
	kvm_run_size = ioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (kvm_run_size <= 0) {
		out("fatal KVM_GET_VCPU_MMAP_SIZE: %s", strerror(errno));
		return -1;
	}
	out("ready api %d cpus %ld", ioctl(kvm_fd, KVM_GET_API_VERSION, 0), sysconf(_SC_NPROCESSORS_ONLN));
	return 0;
}
