/*
 * entry.S - entry points, GDT, identity page tables and VM exit.
 *
 * The image is linked at 0x100000 (see link.ld):
 *   0x100000  pvh_entry    32-bit PVH entry (XEN_ELFNOTE_PHYS32_ENTRY)
 *   0x100200  linux_entry  64-bit Linux boot protocol entry (ELF e_entry and
 *                          bzImage code32_start + 0x200)
 *
 * Both paths switch to this file's own GDT and page tables, then meet in
 * start64, which calls guest_main(protocol, boot_info_paddr).
 */
#include "bootinfo.h"

#define GDT_CS64	0x10	/* same selector values as Linux __BOOT_CS/__BOOT_DS */
#define GDT_DS		0x18

#define CR0_PE		(1 << 0)
#define CR0_NW		(1 << 29)
#define CR0_CD		(1 << 30)
#define CR0_PG		(1 << 31)
#define CR4_PAE		(1 << 5)
#define MSR_EFER	0xc0000080
#define EFER_LME	(1 << 8)

/* Page table entry bits. A and D are preset so the CPU never writes back. */
#define PTE_P		0x001
#define PTE_RW		0x002
#define PTE_PWT		0x008
#define PTE_PCD		0x010
#define PTE_A		0x020
#define PTE_D		0x040
#define PTE_PS		0x080
#define PTE_TABLE	(PTE_P | PTE_RW | PTE_A)
#define PDE_2M		(PTE_P | PTE_RW | PTE_A | PTE_D | PTE_PS)
#define PDE_2M_UC	(PDE_2M | PTE_PCD | PTE_PWT)

/* [UNCACHED_START, 4 GiB) is the MMIO hole (virtio-mmio, IOAPIC, LAPIC). */
#define UNCACHED_START	0xb0000000

/* ------------------------------------------------------------------------
 * PVH entry: 32-bit protected mode, paging off, flat CS/DS/ES/SS,
 * EBX = physical address of struct hvm_start_info. No stack is used here.
 */
	.section .text.entry_pvh, "ax"
	.code32
	.globl pvh_entry
pvh_entry:
	cli
	lgdt	gdt_desc
	movl	$pml4, %eax
	movl	%eax, %cr3
	movl	$CR4_PAE, %eax
	movl	%eax, %cr4
	movl	$MSR_EFER, %ecx
	movl	$EFER_LME, %eax
	xorl	%edx, %edx
	wrmsr
	movl	%cr0, %eax
	andl	$~(CR0_CD | CR0_NW), %eax
	orl	$(CR0_PE | CR0_PG), %eax
	movl	%eax, %cr0		/* now in compatibility mode */
	ljmp	$GDT_CS64, $pvh_entry64

	.code64
pvh_entry64:
	movl	$BOOT_PROTO_PVH, %r12d
	movl	%ebx, %r13d		/* zero-extends: start_info below 4 GiB */
	jmp	start64

/* ------------------------------------------------------------------------
 * Linux 64-bit boot protocol entry: long mode, identity paging covering at
 * least this image, RSI = physical address of struct boot_params.
 */
	.section .text.entry_linux, "ax"
	.code64
	.globl linux_entry
linux_entry:
	cli
	movl	$BOOT_PROTO_LINUX, %r12d
	movq	%rsi, %r13
	movl	$stack_top, %esp
	lgdt	gdt_desc
	movl	$pml4, %eax
	movq	%rax, %cr3
	pushq	$GDT_CS64
	pushq	$start64
	lretq				/* reload CS from our GDT */

/* ------------------------------------------------------------------------
 * Common 64-bit start: r12d = BOOT_PROTO_*, r13 = boot info address.
 */
	.text
start64:
	movl	$GDT_DS, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	movl	%eax, %fs
	movl	%eax, %gs
	lidt	null_idt_desc		/* any exception now triple-faults: the VM ends */
	movl	$stack_top, %esp
	xorl	%ebp, %ebp
	cld
	/* Clear .bss (the stack lies above __bss_end and is left alone). */
	movl	$__bss_start, %edi
	movl	$__bss_end, %ecx
	subl	%edi, %ecx
	shrl	$3, %ecx
	xorl	%eax, %eax
	rep stosq
	movl	%r12d, %edi
	movq	%r13, %rsi
	call	guest_main
	/* fall through */

/* End the VM: i8042 CPU reset, and if that is ignored, a triple fault. */
	.globl guest_reset
guest_reset:
	movb	$0xfe, %al
	outb	%al, $0x64
	lidt	null_idt_desc
	ud2
	int3
1:	hlt
	jmp	1b

/* ------------------------------------------------------------------------
 * GDT (accessed bits preset, so loading a selector never writes it).
 */
	.section .rodata.gdt, "a"
	.balign 16
gdt:
	.quad	0			/* 0x00 null */
	.quad	0			/* 0x08 unused */
	.quad	0x00af9b000000ffff	/* 0x10 64-bit code, DPL 0 */
	.quad	0x00cf93000000ffff	/* 0x18 flat 4 GiB data */
gdt_end:

	.balign 8
	.word	0, 0, 0
gdt_desc:				/* also read by the 32-bit lgdt (low 4 base bytes) */
	.word	gdt_end - gdt - 1
	.quad	gdt

	.word	0, 0, 0
null_idt_desc:
	.word	0
	.quad	0

/* ------------------------------------------------------------------------
 * Static identity map of the first 4 GiB with 2 MiB pages:
 * PML4[0] -> PDPT, PDPT[0..3] -> four PDs of 512 entries each.
 */
	.section .data.pagetables, "aw"
	.balign 4096
	.globl pml4
pml4:
	.quad	pdpt + PTE_TABLE
	.fill	511, 8, 0
pdpt:
	.quad	pd + 0x0000 + PTE_TABLE
	.quad	pd + 0x1000 + PTE_TABLE
	.quad	pd + 0x2000 + PTE_TABLE
	.quad	pd + 0x3000 + PTE_TABLE
	.fill	508, 8, 0
pd:
	.set	.Laddr, 0
	.rept	2048
	.if	.Laddr < UNCACHED_START
	.quad	.Laddr + PDE_2M
	.else
	.quad	.Laddr + PDE_2M_UC
	.endif
	.set	.Laddr, .Laddr + 0x200000
	.endr

/* ------------------------------------------------------------------------
 * Boot stack: placed by link.ld at the end of .bss, above __bss_end.
 */
	.section .stack, "aw", @nobits
	.balign 16
	.skip	16384
	.globl stack_top
stack_top:
