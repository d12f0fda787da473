/*
 * main.c - test guest main: print the boot information, run the tests that
 * the command line selects, then return to entry.S, which ends the VM.
 */
#include "bootinfo.h"
#include "lib.h"

/*
 * Tests run after the boot information dump, in table order. A test runs
 * when its word (e.g. "test=blk") appears in the kernel command line.
 */
struct guest_test {
	const char *word;
	void (*run)(const struct bootinfo *bi);
};

static const struct guest_test tests[] = {
	/* { "test=blk", test_blk }, */
	{ NULL, NULL },
};

static struct bootinfo boot;

static void print_bootinfo(const struct bootinfo *bi)
{
	uint64_t ram = 0, total = 0;

	print("cmdline: ");
	print(bi->cmdline);
	print("\n");
	for (uint32_t i = 0; i < bi->nr_mem; i++) {
		const struct mem_region *r = &bi->mem[i];

		print("e820: start=0x");
		print_hex64(r->addr);
		print(" size=0x");
		print_hex64(r->size);
		print(" type=");
		print_dec(r->type);
		print("\n");
		total += r->size;
		if (r->type == E820_RAM)
			ram += r->size;
	}
	print("mem: ram=");
	print_dec(ram);
	print(" total=");
	print_dec(total);
	print("\n");
}

static void run_tests(const struct bootinfo *bi)
{
	for (const struct guest_test *t = tests; t->word; t++)
		if (cmdline_has_word(bi->cmdline, t->word))
			t->run(bi);
}

/* Called from entry.S with protocol = BOOT_PROTO_*, info = its boot structure. */
void guest_main(uint32_t protocol, uint64_t info)
{
	const char *err;

	print(protocol == BOOT_PROTO_PVH ? "testguest: boot=pvh\n" : "testguest: boot=linux\n");
	err = bootinfo_parse(&boot, protocol, info);
	if (err) {
		print("testguest: error: ");
		print(err);
		print("\n");
		return;
	}
	print_bootinfo(&boot);
	run_tests(&boot);
	print("testguest: done\n");
}
