struct sf_region { uint64_t base, size; int kind, prefault; };
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
	const uint64_t *writes;          /* ... and the data of each MMIO write to userspace */
	size_t nwrites;
	const char *ending, *ending_detail;
};

static const struct sf_case cases[] = {
/* @CASES@ */
};
