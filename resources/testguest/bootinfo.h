/*
 * bootinfo.h - boot information common to the PVH and Linux entry paths.
 * The BOOT_PROTO_* values are shared with entry.S.
 */
#ifndef TESTGUEST_BOOTINFO_H
#define TESTGUEST_BOOTINFO_H

#define BOOT_PROTO_PVH		1	/* info = struct hvm_start_info */
#define BOOT_PROTO_LINUX	2	/* info = struct boot_params */

#ifndef __ASSEMBLER__
#include <stdint.h>

#define E820_RAM		1
#define BOOTINFO_MAX_MEM	128	/* extra map entries are dropped */

struct mem_region {
	uint64_t addr;
	uint64_t size;
	uint32_t type;			/* E820 type, E820_RAM = 1 */
};

struct bootinfo {
	uint32_t protocol;		/* BOOT_PROTO_* */
	const char *cmdline;		/* never NULL, "" if none */
	uint64_t initrd_addr;		/* 0 if none */
	uint64_t initrd_size;
	uint64_t rsdp;			/* ACPI RSDP address the VMM passed, 0 if none */
	uint32_t nr_mem;
	struct mem_region mem[BOOTINFO_MAX_MEM];
};

/*
 * Fill `bi` from the structure at physical address `info` (the boot
 * structures must lie below 4 GiB, which is identity-mapped).
 * Returns NULL on success or an error message.
 */
const char *bootinfo_parse(struct bootinfo *bi, uint32_t protocol, uint64_t info);

#endif /* __ASSEMBLER__ */
#endif
