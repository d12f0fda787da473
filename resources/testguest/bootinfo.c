/* bootinfo.c - parse PVH start_info or Linux boot_params into struct bootinfo. */
#include "bootinfo.h"
#include "lib.h"

/* PVH: struct hvm_start_info and its memory map (xen/include/public/arch-x86/hvm/start_info.h). */
#define HVM_START_MAGIC		0x336ec578

struct hvm_start_info {
	uint32_t magic;
	uint32_t version;
	uint32_t flags;
	uint32_t nr_modules;
	uint64_t modlist_paddr;
	uint64_t cmdline_paddr;
	uint64_t rsdp_paddr;
	uint64_t memmap_paddr;		/* version >= 1 */
	uint32_t memmap_entries;	/* version >= 1 */
	uint32_t reserved;
};

struct hvm_modlist_entry {
	uint64_t paddr;
	uint64_t size;
	uint64_t cmdline_paddr;
	uint64_t reserved;
};

struct hvm_memmap_entry {
	uint64_t addr;
	uint64_t size;
	uint32_t type;
	uint32_t reserved;
};

/* Linux: offsets into struct boot_params (the "zero page"). */
#define BP_ACPI_RSDP_ADDR	0x070
#define BP_EXT_RAMDISK_IMAGE	0x0c0
#define BP_EXT_RAMDISK_SIZE	0x0c4
#define BP_EXT_CMD_LINE_PTR	0x0c8
#define BP_RAMDISK_IMAGE	0x218
#define BP_RAMDISK_SIZE		0x21c
#define BP_E820_ENTRIES		0x1e8
#define BP_CMD_LINE_PTR		0x228
#define BP_E820_TABLE		0x2d0
#define BP_E820_MAX		128

struct boot_e820_entry {
	uint64_t addr;
	uint64_t size;
	uint32_t type;
} __attribute__((packed));

static const void *phys(uint64_t paddr)
{
	return (const void *)(uintptr_t)paddr;
}

static void add_mem(struct bootinfo *bi, uint64_t addr, uint64_t size, uint32_t type)
{
	if (bi->nr_mem < BOOTINFO_MAX_MEM) {
		struct mem_region *r = &bi->mem[bi->nr_mem++];

		r->addr = addr;
		r->size = size;
		r->type = type;
	}
}

static const char *parse_pvh(struct bootinfo *bi, const struct hvm_start_info *si)
{
	if (si->magic != HVM_START_MAGIC)
		return "bad hvm_start_info magic";
	if (si->cmdline_paddr)
		bi->cmdline = phys(si->cmdline_paddr);
	if (si->nr_modules && si->modlist_paddr) {
		const struct hvm_modlist_entry *m = phys(si->modlist_paddr);

		bi->initrd_addr = m->paddr;
		bi->initrd_size = m->size;
	}
	bi->rsdp = si->rsdp_paddr;
	if (si->version >= 1 && si->memmap_paddr) {
		const struct hvm_memmap_entry *e = phys(si->memmap_paddr);

		for (uint32_t i = 0; i < si->memmap_entries; i++)
			add_mem(bi, e[i].addr, e[i].size, e[i].type);
	}
	return NULL;
}

static const char *parse_linux(struct bootinfo *bi, const uint8_t *bp)
{
	uint64_t cmdline = *(const uint32_t *)(bp + BP_CMD_LINE_PTR) |
			   (uint64_t)*(const uint32_t *)(bp + BP_EXT_CMD_LINE_PTR) << 32;
	uint32_t n = bp[BP_E820_ENTRIES];
	const struct boot_e820_entry *e = (const void *)(bp + BP_E820_TABLE);

	if (cmdline)
		bi->cmdline = phys(cmdline);
	bi->initrd_addr = *(const uint32_t *)(bp + BP_RAMDISK_IMAGE) |
			  (uint64_t)*(const uint32_t *)(bp + BP_EXT_RAMDISK_IMAGE) << 32;
	bi->initrd_size = *(const uint32_t *)(bp + BP_RAMDISK_SIZE) |
			  (uint64_t)*(const uint32_t *)(bp + BP_EXT_RAMDISK_SIZE) << 32;
	bi->rsdp = *(const uint64_t *)(bp + BP_ACPI_RSDP_ADDR);
	if (n > BP_E820_MAX)
		n = BP_E820_MAX;
	for (uint32_t i = 0; i < n; i++)
		add_mem(bi, e[i].addr, e[i].size, e[i].type);
	return NULL;
}

const char *bootinfo_parse(struct bootinfo *bi, uint32_t protocol, uint64_t info)
{
	bi->protocol = protocol;
	bi->cmdline = "";
	bi->nr_mem = 0;
	bi->initrd_addr = bi->initrd_size = bi->rsdp = 0;
	if (!info)
		return "no boot information pointer";
	if (protocol == BOOT_PROTO_PVH)
		return parse_pvh(bi, phys(info));
	return parse_linux(bi, phys(info));
}
