/*
 * shutdown.c - "test=shutdown-wait": wait for the VMM's shutdown request and obey it, as a
 * well-behaved OS would.
 *
 * With ACPI (the boot information has an RSDP) the request is the power button: bit 0 of the
 * Generic Event Device's event register (the DSDT's GED _EVT reads the same port; reading
 * clears it). The guest then powers off through the ACPI sleep register (S5). Without ACPI
 * the request is Ctrl-Alt-Del typed on the i8042 keyboard (scancode set 1, as the controller
 * translates by default); the guest then reboots through the i8042 reset line, as Linux does.
 * Interrupts stay off: both are polled.
 *
 * With "shutdown.tick" on the command line it prints "tick <n>" lines while it waits, so a
 * test can see whether the guest is running (pause/resume).
 */
#include "bootinfo.h"
#include "io.h"
#include "lib.h"
#include "tests.h"

#define ACPI_SLEEP_PORT		0x3c0
#define SLP_EN			(1 << 5)
#define S5_SLEEP_TYPE		5
#define GED_PORT		0x3c4
#define GED_POWER_BUTTON	0x01

#define I8042_DATA		0x60
#define I8042_STATUS		0x64
#define I8042_OUTPUT_FULL	0x01
#define I8042_CMD_RESET		0xfe

/* Set 1 scancodes: make codes, break = make | 0x80; Delete is extended (0xe0 prefix). */
#define SC_EXTENDED		0xe0
#define SC_CTRL			0x1d
#define SC_ALT			0x38
#define SC_DELETE		0x53
#define SC_BREAK		0x80

/* TSC cycles between ticks: ~45 ms at 3 GHz; the exact rate does not matter. */
#define TICK_CYCLES		(1ULL << 27)

struct ticker {
	bool on;
	uint64_t next;
	uint64_t count;
};

static void tick(struct ticker *t)
{
	uint64_t now;

	if (!t->on)
		return;
	now = rdtsc();
	if (now < t->next)
		return;
	t->next = now + TICK_CYCLES;
	print("tick ");
	print_dec(t->count++);
	print("\n");
}

/* True once Delete is pressed while Ctrl and Alt are held. */
static bool ctrl_alt_del(uint8_t code, bool *extended, bool *ctrl, bool *alt)
{
	bool ext = *extended;
	bool down = !(code & SC_BREAK);

	*extended = (code == SC_EXTENDED);
	switch (code & ~SC_BREAK) {
	case SC_CTRL:
		*ctrl = down;
		break;
	case SC_ALT:
		*alt = down;
		break;
	case SC_DELETE:
		return ext && down && *ctrl && *alt;
	}
	return false;
}

void test_shutdown_wait(const struct bootinfo *bi)
{
	struct ticker t = { .on = cmdline_has_word(bi->cmdline, "shutdown.tick") };
	bool extended = false, ctrl = false, alt = false;

	if (bi->rsdp) {
		print("shutdown: waiting for the power button\n");
		while (!(inb(GED_PORT) & GED_POWER_BUTTON)) {
			tick(&t);
			cpu_relax();
		}
		print("shutdown: power button pressed; powering off\n");
		outb(ACPI_SLEEP_PORT, SLP_EN | (S5_SLEEP_TYPE << 2));
		return;
	}
	print("shutdown: waiting for ctrl-alt-del\n");
	for (;;) {
		uint8_t code;

		tick(&t);
		if (!(inb(I8042_STATUS) & I8042_OUTPUT_FULL)) {
			cpu_relax();
			continue;
		}
		code = inb(I8042_DATA);
		if (ctrl_alt_del(code, &extended, &ctrl, &alt))
			break;
	}
	print("shutdown: ctrl-alt-del pressed; rebooting\n");
	outb(I8042_STATUS, I8042_CMD_RESET);
}
