/*
 * smbios.c - "test=smbios": find the SMBIOS 3.0 entry point the VMM placed in the
 * BIOS area and print the system UUID (type 1), as Linux shows it in
 * /sys/class/dmi/id/product_uuid and systemd uses it for the machine id.
 */
#include "lib.h"
#include "tests.h"

#define SMBIOS_AREA_START	0xf0000
#define SMBIOS_AREA_END		0x100000
#define SMBIOS_TYPE_SYSTEM	1
#define SMBIOS_TYPE_END		127

static const uint8_t *find_entry_point(void)
{
	/* The anchor is 16-byte aligned somewhere in 0xf0000-0xfffff. */
	for (uintptr_t p = SMBIOS_AREA_START; p < SMBIOS_AREA_END; p += 16)
		if (memcmp((const void *)p, "_SM3_", 5) == 0)
			return (const uint8_t *)p;
	return NULL;
}

/* The end of a structure: its formatted part, then strings ending in a double NUL. */
static const uint8_t *next_structure(const uint8_t *s, const uint8_t *end)
{
	const uint8_t *p = s + s[1];

	while (p + 1 < end && (p[0] || p[1]))
		p++;
	return p + 2;
}

static void print_uuid(const uint8_t *u)
{
	/* The first three fields are little-endian in SMBIOS 2.6+. */
	static const int order[16] = { 3, 2, 1, 0, 5, 4, 7, 6, 8, 9, 10, 11, 12, 13, 14, 15 };

	for (int i = 0; i < 16; i++) {
		if (i == 4 || i == 6 || i == 8 || i == 10)
			print("-");
		print_hex(u[order[i]], 2);
	}
}

void test_smbios(const struct bootinfo *bi)
{
	const uint8_t *ep = find_entry_point();
	(void)bi;

	if (!ep) {
		print("smbios: no entry point\n");
		return;
	}
	const uint8_t *table = (const uint8_t *)(uintptr_t)*(const uint64_t *)(ep + 0x10);
	const uint8_t *end = table + *(const uint32_t *)(ep + 0x0c);

	for (const uint8_t *s = table; s + 4 <= end && s[0] != SMBIOS_TYPE_END;
	     s = next_structure(s, end)) {
		if (s[0] == SMBIOS_TYPE_SYSTEM && s[1] >= 0x19) {
			print("smbios: uuid=");
			print_uuid(s + 8);
			print("\n");
			return;
		}
	}
	print("smbios: no system information\n");
}
