/*
 * stepfuzz real-KVM runner: a minimal VMM that single-steps each case of a
 * batch in a fresh VM and prints what KVM_RUN returned.
 *
 * It runs as /init of an initramfs inside an arm64 kernel booted under QEMU,
 * or natively on an arm64 host with /dev/kvm.  Either way it serves batches
 * read from standard input (the serial console under QEMU, put in raw mode;
 * a pipe natively), one after another, so one boot serves a whole campaign;
 * `quit` or the end of input powers off.  As /init with /prog present it
 * runs that program instead (exec mode).  Only libc and <linux/kvm.h>.
 *
 * Input (written by oracle/realkvm/batch.py), whitespace-separated tokens:
 *   stepfuzz-batch 1                (or quit)
 *   case ID BASE MAX_STEPS TIMEOUT_MS MMIO_READ
 *   reg INDEX VALUE                 (0..30 = x0..x30, 31 = sp_el1)
 *   region KIND BASE SIZE PREFAULT  (KIND: ram | mmio | mmio-kernel)
 *   daif VALUE                      (PSTATE.DAIF at the start)
 *   el1-reg NAME VALUE              (NAME: elr_el1 | spsr_el1 | esr_el1 | far_el1, at the start)
 *   vectors BASE                    (VBAR_EL1)
 *   handler OFFSET COUNT W1 W2 ...  (a handler's words at BASE + OFFSET)
 *   smccc FIRST COUNT               (SMCCC function ids forwarded to the VMM)
 *   hypercall-result VALUE          (x0 after each KVM_EXIT_HYPERCALL)
 *   event WHEN N WHAT [ARGS]        (WHEN: start | mmio | stop | hypercall | eintr;
 *                                    WHAT: immediate-exit | signal | preempt |
 *                                    set-reg REG VALUE (0..30 x, 31 sp, 32 pc, 33 daif) |
 *                                    debug step|continue|off NBPS BP... |
 *                                    irq-line irq|fiq LEVEL)
 *   words COUNT W1 W2 ...
 *   go                              (run the case described since `case`)
 *   end                             (the batch is over: the runner says `done RUN_US CASES_US BATCH_US
 *                                    SETUP_US PREFAULT_US STEP_US TEARDOWN_US`: time inside KVM_RUN, in
 *                                    whole cases, since the batch's first token, then in each stage of a case)
 * Output: lines "@@sf ..." (see docs/real-kvm.md); anything else on the
 * console is the kernel's.
 */
#include "vmm.c"

#include <termios.h>

/* ------------------------------------------------------------ input */

static int token(FILE *f, char *buf, size_t len)
{
	int c, n = 0;

	while ((c = getc(f)) != EOF && (c == ' ' || c == '\n' || c == '\t' || c == '\r'))
		;
	while (c != EOF && c != ' ' && c != '\n' && c != '\t' && c != '\r') {
		if ((size_t)n + 1 < len)
			buf[n++] = (char)c;
		c = getc(f);
	}
	buf[n] = 0;
	return n;
}

static uint64_t number(FILE *f)
{
	char buf[64];

	token(f, buf, sizeof(buf));
	return strtoull(buf, NULL, 0);
}

/* ------------------------------------------------------------ the batch */

static uint64_t case_ns;         /* time in whole cases, for `done` */

/*
 * Under QEMU the guest boots with its second CPU offline (maxcpus=1, vm.py):
 * online and idle, it let two VMs on two cores run no faster than one
 * (docs/real-kvm.md).  Only the `preempt` event needs it, to migrate to: a batch brings it online at its first case
 * with one, and takes it offline again at its end.
 */
static int as_init;
static int cpu_hotplugged;

static int set_cpu_online(int cpu, int online)
{
	char path[64];
	int fd, ok;

	snprintf(path, sizeof(path), "/sys/devices/system/cpu/cpu%d/online", cpu);
	fd = open(path, O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	ok = write(fd, online ? "1" : "0", 1) == 1;
	close(fd);
	return ok ? 0 : -1;
}

static void need_cpus_for(const struct casedef *c)
{
	int preempt = 0;

	for (int i = 0; i < c->nev; i++)
		preempt |= c->ev[i].what == DO_PREEMPT;
	if (!as_init || !preempt || sysconf(_SC_NPROCESSORS_ONLN) >= 2)
		return;
	uint64_t t0 = now_ns();
	if (set_cpu_online(1, 1) < 0) {
		out("%ld note preempt: cannot bring CPU 1 online (%s)", c->id, strerror(errno));
		return;
	}
	cpu_hotplugged = 1;
	/* at once, so that a VM that dies after this says where it was */
	out("cpu 1 online in %llu ms", (unsigned long long)((now_ns() - t0) / 1000000));
	flush_out();
}

/* One batch from f: 0 when it is done, 1 on `quit` or the end of input, 2 on bad input. */
static int run_batch(FILE *f)
{
	static struct casedef c;
	char tok[64];

	if (!token(f, tok, sizeof(tok)) || !strcmp(tok, "quit"))
		return 1;
	if (strcmp(tok, "stepfuzz-batch") != 0 || number(f) != 1) {
		out("fatal the input is not a stepfuzz batch (version 1)");
		return 2;
	}
	uint64_t begun = now_ns();
	run_ns = case_ns = 0;
	memset(stage_ns, 0, sizeof(stage_ns));
	while (token(f, tok, sizeof(tok))) {
		if (!strcmp(tok, "case")) {
			memset(&c, 0, sizeof(c));
			c.id = (long)number(f);
			c.base = number(f);
			c.max_steps = number(f);
			c.timeout_ms = number(f);
			c.mmio_read = number(f);
		} else if (!strcmp(tok, "reg")) {
			uint64_t i = number(f), value = number(f);
			if (i < 32)
				c.regs[i] = value;
		} else if (!strcmp(tok, "region")) {
			char kind[16];
			token(f, kind, sizeof(kind));
			uint64_t base = number(f), size = number(f), pre = number(f);
			if (c.nreg < MAX_REGIONS)
				c.reg[c.nreg++] = (struct region){
					base, size, !strcmp(kind, "ram") ? R_RAM : !strcmp(kind, "mmio") ? R_MMIO : R_KERNEL,
					(int)pre, NULL };
		} else if (!strcmp(tok, "daif")) {
			c.daif = number(f) & 0x3c0;
			c.has_daif = 1;
		} else if (!strcmp(tok, "el1-reg")) {
			char name[16];
			int i;
			token(f, name, sizeof(name));
			uint64_t value = number(f);
			i = !strcmp(name, "elr_el1") ? EL1_ELR : !strcmp(name, "spsr_el1") ? EL1_SPSR :
			    !strcmp(name, "esr_el1") ? EL1_ESR : !strcmp(name, "far_el1") ? EL1_FAR : -1;
			if (i < 0) {
				out("fatal unknown EL1 register '%s'", name);
				return 2;
			}
			c.el1[i] = value;
			c.el1_set |= 1u << i;
		} else if (!strcmp(tok, "vectors")) {
			c.has_vectors = 1;
			c.vbar = number(f);
		} else if (!strcmp(tok, "handler")) {
			uint64_t offset = number(f), n = number(f);
			struct handler *h = c.nhandlers < MAX_HANDLERS ? &c.handler[c.nhandlers++] : NULL;
			if (h) {
				h->offset = offset;
				h->nwords = 0;
			}
			for (uint64_t i = 0; i < n; i++) {
				uint32_t w = (uint32_t)number(f);
				if (h && h->nwords < MAX_HANDLER_WORDS)
					h->words[h->nwords++] = w;
			}
		} else if (!strcmp(tok, "smccc")) {
			uint64_t first = number(f), count = number(f);
			if (c.nsmccc < MAX_SMCCC) {
				c.smccc[c.nsmccc][0] = first;
				c.smccc[c.nsmccc++][1] = count;
			}
		} else if (!strcmp(tok, "hypercall-result")) {
			c.hypercall_result = number(f);
		} else if (!strcmp(tok, "event")) {
			char when[16], what[32];
			struct event e;
			memset(&e, 0, sizeof(e));
			token(f, when, sizeof(when));
			e.n = number(f);
			token(f, what, sizeof(what));
			e.when = !strcmp(when, "mmio") ? EV_MMIO : !strcmp(when, "start") ? EV_START :
				 !strcmp(when, "hypercall") ? EV_HYPERCALL : !strcmp(when, "eintr") ? EV_EINTR : EV_STOP;
			if (!strcmp(what, "set-reg")) {
				e.what = DO_SET_REG;
				e.reg = (int)number(f);
				e.value = number(f);
			} else if (!strcmp(what, "debug")) {
				char control[16];
				e.what = DO_DEBUG;
				token(f, control, sizeof(control));
				e.control = !strcmp(control, "step") ? DEBUG_STEP : !strcmp(control, "continue") ? DEBUG_CONTINUE : DEBUG_OFF;
				e.nbps = (int)number(f);
				for (int i = 0; i < e.nbps; i++) {
					uint64_t a = number(f);
					if (i < MAX_HW_BPS - 1)
						e.bps[i] = a;
				}
				if (e.nbps > MAX_HW_BPS - 1)
					e.nbps = MAX_HW_BPS - 1;      /* one is the VMM's own (continue) */
			} else if (!strcmp(what, "irq-line")) {
				char line[8];
				e.what = DO_IRQ_LINE;
				token(f, line, sizeof(line));
				e.line = !strcmp(line, "fiq") ? LINE_FIQ : LINE_IRQ;
				e.level = number(f) ? 1 : 0;
			} else {
				e.what = !strcmp(what, "immediate-exit") ? DO_IMMEDIATE : !strcmp(what, "signal") ? DO_SIGNAL : DO_PREEMPT;
			}
			if (c.nev < MAX_EVENTS)
				c.ev[c.nev++] = e;
		} else if (!strcmp(tok, "words")) {
			uint64_t n = number(f);
			c.nwords = 0;
			for (uint64_t i = 0; i < n; i++) {
				uint32_t w = (uint32_t)number(f);
				if (c.nwords < MAX_WORDS)
					c.words[c.nwords++] = w;
			}
		} else if (!strcmp(tok, "go")) {
			uint64_t t0 = now_ns();
			need_cpus_for(&c);
			run_case(&c);
			case_ns += now_ns() - t0;
		} else if (!strcmp(tok, "end")) {
			uint64_t t0 = now_ns();
			if (cpu_hotplugged && set_cpu_online(1, 0) == 0) {
				cpu_hotplugged = 0;
				out("cpu 1 offline in %llu ms", (unsigned long long)((now_ns() - t0) / 1000000));
			}
			break;
		} else {
			out("fatal unknown batch token '%s'", tok);
			return 2;
		}
	}
	out("done %llu %llu %llu %llu %llu %llu %llu", (unsigned long long)(run_ns / 1000),
	    (unsigned long long)(case_ns / 1000), (unsigned long long)((now_ns() - begun) / 1000),
	    (unsigned long long)(stage_ns[STAGE_SETUP] / 1000), (unsigned long long)(stage_ns[STAGE_PREFAULT] / 1000),
	    (unsigned long long)(stage_ns[STAGE_STEP] / 1000), (unsigned long long)(stage_ns[STAGE_TEARDOWN] / 1000));
	flush_out();
	return 0;
}

/* Serve batches from standard input until `quit` or its end. */
static int serve(void)
{
	struct termios t;
	int rc;

	/* the console: no echo, no line editing, no signals from bytes, no CR/LF games */
	if (tcgetattr(0, &t) == 0) {
		cfmakeraw(&t);
		tcsetattr(0, TCSANOW, &t);
	}
	if (open_kvm() < 0)
		return 2;
	flush_out();                 /* `ready`: the host writes nothing before it */
	while ((rc = run_batch(stdin)) == 0)
		;
	flush_out();
	return rc == 1 ? 0 : rc;
}

/* ------------------------------------------------------------ exec mode and /init */

/*
 * The program's output reaches the host through a pipe, each line behind
 * "| ": no line it prints can start with "@@sf", so nothing it prints (a
 * case name, say) can pass for the runner's own verdict.
 */
static void relay_lines(int fd)
{
	char buf[4096], line[4096];
	size_t len = 0;
	ssize_t n;

	while ((n = read(fd, buf, sizeof(buf))) != 0) {
		if (n < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		for (ssize_t i = 0; i < n; i++) {
			if (buf[i] == '\n' || len == sizeof(line) - 1) {
				line[len] = 0;
				printf("| %s\n", line);
				len = 0;
				if (buf[i] == '\n')
					continue;
			}
			line[len++] = buf[i];
		}
		fflush(stdout);
	}
	if (len) {
		line[len] = 0;
		printf("| %s\n", line);
	}
	fflush(stdout);
}

static int exec_prog(void)
{
	pid_t pid;
	int status, pipefd[2];

	set_cpu_online(1, 1);       /* a program may migrate (a reproducer's `preempt`) */
	out("exec-start");
	flush_out();
	if (pipe(pipefd) < 0) {
		out("exec-exit error pipe: %s", strerror(errno));
		flush_out();
		return 2;
	}
	pid = fork();
	if (pid == 0) {
		char *argv[] = { "/prog", NULL };
		sigset_t none;
		sigemptyset(&none);
		sigprocmask(SIG_SETMASK, &none, NULL);
		dup2(pipefd[1], 1);
		dup2(pipefd[1], 2);
		close(pipefd[0]);
		close(pipefd[1]);
		execv("/prog", argv);
		fprintf(stderr, "stepfuzz: the program cannot be executed: %s\n", strerror(errno));
		_exit(127);
	}
	close(pipefd[1]);
	if (pid < 0) {
		out("exec-exit error fork: %s", strerror(errno));
		flush_out();
		return 2;
	}
	relay_lines(pipefd[0]);
	close(pipefd[0]);
	while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
		;
	if (WIFEXITED(status))
		out("exec-exit status %d", WEXITSTATUS(status));
	else
		out("exec-exit signal %d", WIFSIGNALED(status) ? WTERMSIG(status) : 0);
	flush_out();
	return 0;
}

static void init_system(void)
{
	mkdir("/dev", 0755);
	mkdir("/proc", 0555);
	mkdir("/sys", 0555);
	mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
	mount("proc", "/proc", "proc", 0, NULL);
	mount("sysfs", "/sys", "sysfs", 0, NULL);
	if (fcntl(1, F_GETFD) < 0) {
		int fd = open("/dev/console", O_RDWR);
		if (fd >= 0) {
			dup2(fd, 0);
			dup2(fd, 1);
			dup2(fd, 2);
		}
	}
	klogctl(8, NULL, 1);    /* console loglevel 1: keep kernel messages out of the protocol */
}

int main(int argc, char **argv)
{
	int rc = 0;

	as_init = getpid() == 1;

	if (as_init)
		init_system();
	setup_signals();

	(void)argc;
	(void)argv;
	if (as_init && access("/prog", X_OK) == 0)
		rc = exec_prog();
	else
		rc = serve();
	flush_out();
	if (as_init) {
		sync();
		reboot(RB_POWER_OFF);
		for (;;)
			pause();
	}
	return rc;
}
