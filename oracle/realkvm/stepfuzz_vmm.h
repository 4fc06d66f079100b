/*
 * What stepfuzz's VMM core (vmm.c) and the C that `stepfuzz export` writes
 * (fuzz/findings/templates/) must agree on: the exports inline this file,
 * so their case tables and checks use the runner's own values.  Macros and
 * enums only, no includes: it can go anywhere in a file.
 */
#ifndef STEPFUZZ_VMM_H
#define STEPFUZZ_VMM_H

#define MAX_REGIONS 64
#define MAX_EVENTS 256
#define VGIC_REDIST_BASE 1099510579200ULL   /* 0xfffff00000: IPA_LIMIT - 1 MiB, the vGIC redistributor's home */
#define INSN_B_SELF 0x14000000u      /* `b .`: parks the guest after the case's code */

enum { EV_MMIO, EV_STOP, EV_START, EV_HYPERCALL, EV_EINTR };   /* an event comes after the Nth ... */
enum { DO_IMMEDIATE = 1, DO_SIGNAL = 2, DO_PREEMPT = 4,         /* ... and does these (a mask) */
       DO_SET_REG = 8, DO_DEBUG = 16, DO_IRQ_LINE = 32 };       /* (these three carry arguments) */
enum { LINE_IRQ, LINE_FIQ };                                    /* DO_IRQ_LINE: the vCPU's input */
enum { DEBUG_STEP, DEBUG_CONTINUE, DEBUG_OFF };                 /* KVM_SET_GUEST_DEBUG controls */
#define MAX_HW_BPS 4
#define MAX_SMCCC 32
#define REG_INDEX_PC 32                 /* set-reg register numbers: 0..30 x, 31 sp, 32 pc, 33 daif */
#define REG_INDEX_DAIF 33
enum { R_RAM, R_MMIO, R_KERNEL };                          /* region kinds */

/* How a case ends: the REASON of "@@sf ID end REASON ..." (docs/real-kvm.md). */
#define ENDED_END "end"                  /* stopped at the instruction after the code */
#define ENDED_LEFT_CODE "left-code"
#define ENDED_MAX_STEPS "max-steps"
#define ENDED_ERROR "error"              /* KVM_RUN failed; the detail is errno */
#define ENDED_EXIT "exit"                /* an exit the VMM does not handle */
#define ENDED_SETUP "setup"
#define ENDED_UNSUPPORTED "unsupported"
#define ENDED_TIMEOUT "timeout"
#define ENDED_MAX_RUNS "max-runs"
#define ENDED_BREAKPOINT "breakpoint"    /* a BRK or breakpoint stop no event answers */

#endif /* STEPFUZZ_VMM_H */
