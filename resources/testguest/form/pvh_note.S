/*
 * pvh_note.S - linked into testguest-pvh.elf only.
 *
 * ELF note XEN_ELFNOTE_PHYS32_ENTRY ("Xen", type 18): its descriptor is the
 * 32-bit physical address of the PVH entry point. link.ld puts it in the
 * .note.Xen section, which the linker turns into a PT_NOTE segment.
 */
#define XEN_ELFNOTE_PHYS32_ENTRY 18

	.section .note.Xen, "a", @note
	.balign 4
	.long	2f - 1f			/* namesz */
	.long	4f - 3f			/* descsz */
	.long	XEN_ELFNOTE_PHYS32_ENTRY
1:	.asciz	"Xen"
2:	.balign 4
3:	.long	pvh_entry
4:
