/*
 * main.c - test guest main: print the boot information, run the tests that
 * the command line selects, then return to entry.S, which ends the VM.
 */
#include "bootinfo.h"
#include "io.h"
#include "lib.h"
#include "tests.h"

/* The VMM's ACPI sleep control register (FADT SLEEP_CONTROL_REG). */
#define ACPI_SLEEP_PORT 0x3c0

/*
 * Tests run after the boot information dump, in table order. A test runs
 * when its word (e.g. "test=blk") appears in the kernel command line.
 */
/* Lifecycle tests: how the VM ends, for the VMM's exit-path tests. */
static void test_hang(const struct bootinfo *bi)
{
	(void)bi;
	print("testguest: hanging\n");
	for (;;)
		__asm__ volatile("cli; hlt");
}

static void test_triplefault(const struct bootinfo *bi)
{
	(void)bi;
	print("testguest: triple fault\n");
	/* The IDT is empty: the #UD cannot be delivered and the CPU shuts down. */
	__asm__ volatile("ud2");
}

static void test_poweroff(const struct bootinfo *bi)
{
	(void)bi;
	print("testguest: acpi poweroff\n");
	/* SLP_EN | SLP_TYP=5 to the FADT's sleep control register. */
	outb(ACPI_SLEEP_PORT, (1 << 5) | (5 << 2));
}

/* Sum of the initrd's little-endian 64-bit words: the test compares it with the host file. */
static void test_initrd(const struct bootinfo *bi)
{
	const uint64_t *w = (const uint64_t *)(uintptr_t)bi->initrd_addr;
	uint64_t sum = 0;

	for (uint64_t i = 0; i < bi->initrd_size / 8; i++)
		sum += w[i];
	print("initrd-sum: 0x");
	print_hex64(sum);
	print("\n");
}

struct guest_test {
	const char *word;
	void (*run)(const struct bootinfo *bi);
};

static const struct guest_test tests[] = {
	{ "test=initrd", test_initrd },
	{ "test=hang", test_hang },
	{ "test=triplefault", test_triplefault },
	{ "test=poweroff", test_poweroff },
	{ "test=blk", test_blk },		/* blk.c */
	{ "test=net", test_net },		/* net.c */
	{ "test=fs", test_fs },			/* fs.c */
	{ "test=fs-wait", test_fs_wait },	/* fs.c */
	{ "test=smbios", test_smbios },	/* smbios.c */
	{ "test=shutdown-wait", test_shutdown_wait },	/* shutdown.c */
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
	if (bi->initrd_size) {
		print("initrd: addr=0x");
		print_hex64(bi->initrd_addr);
		print(" size=");
		print_dec(bi->initrd_size);
		print("\n");
	}
	print("rsdp: 0x");
	print_hex64(bi->rsdp);
	print("\n");
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
