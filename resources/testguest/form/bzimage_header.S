/*
 * bzimage_header.S - linked into the bzImage form only.
 *
 * The real-mode setup area of a Linux bzImage: a boot sector carrying the
 * setup header at 0x1f1, then SETUP_SECTS more 512-byte sectors. link.ld places
 * it right below the payload (linked at 0x100000), so `objcopy -O binary`
 * yields setup area + payload, and a loader copies the file from offset
 * (setup_sects + 1) * 512 to code32_start.
 *
 * Only the 64-bit boot protocol is supported (entry = code32_start + 0x200).
 * A 16-bit loader that jumps to the real-mode entry gets an error message on
 * the UART and a CPU reset.
 *
 * __bz_* symbols come from link.ld.
 */
#define LOADED_HIGH	0x01
#define XLF_KERNEL_64	0x0001

	.section .setup, "a"
	.code16
setup_start:
	.org 0x1f1;	.byte	__bz_setup_sects	/* setup_sects */
	.org 0x1f2;	.word	0			/* root_flags */
	.org 0x1f4;	.long	__bz_syssize		/* syssize (16-byte units) */
	.org 0x1f8;	.word	0			/* ram_size */
	.org 0x1fa;	.word	0xffff			/* vid_mode: normal */
	.org 0x1fc;	.word	0			/* root_dev */
	.org 0x1fe;	.word	0xaa55			/* boot_flag */
	.org 0x200;	.byte	0xeb, realmode_entry - 1f /* jump (short jmp) */
1:
	.org 0x202;	.ascii	"HdrS"			/* header magic */
	.org 0x206;	.word	0x020c			/* version 2.12 */
	.org 0x208;	.long	0			/* realmode_swtch */
	.org 0x20c;	.word	0			/* start_sys_seg */
	.org 0x20e;	.word	kernel_version - setup_start - 0x200
	.org 0x210;	.byte	0			/* type_of_loader */
	.org 0x211;	.byte	LOADED_HIGH		/* loadflags */
	.org 0x212;	.word	0			/* setup_move_size */
	.org 0x214;	.long	__bz_load_addr		/* code32_start */
	.org 0x218;	.long	0			/* ramdisk_image */
	.org 0x21c;	.long	0			/* ramdisk_size */
	.org 0x220;	.long	0			/* bootsect_kludge */
	.org 0x224;	.word	0			/* heap_end_ptr */
	.org 0x226;	.byte	0			/* ext_loader_ver */
	.org 0x227;	.byte	0			/* ext_loader_type */
	.org 0x228;	.long	0			/* cmd_line_ptr */
	.org 0x22c;	.long	0x7fffffff		/* initrd_addr_max */
	.org 0x230;	.long	0x100000		/* kernel_alignment */
	.org 0x234;	.byte	0			/* relocatable_kernel: no */
	.org 0x235;	.byte	20			/* min_alignment (log2) */
	.org 0x236;	.word	XLF_KERNEL_64		/* xloadflags */
	.org 0x238;	.long	4095			/* cmdline_size */
	.org 0x23c;	.long	0			/* hardware_subarch */
	.org 0x240;	.quad	0			/* hardware_subarch_data */
	.org 0x248;	.long	0			/* payload_offset */
	.org 0x24c;	.long	0			/* payload_length */
	.org 0x250;	.quad	0			/* setup_data */
	.org 0x258;	.quad	__bz_load_addr		/* pref_address */
	.org 0x260;	.long	__bz_init_size		/* init_size */
	.org 0x264;	.long	0			/* handover_offset */
	.org 0x268;	.long	0			/* kernel_info_offset (unused) */
	.org 0x26c

/* 16-bit real-mode entry, CS = setup segment + 0x20: not supported. */
realmode_entry:
	cli
	movw	%cs, %ax
	movw	%ax, %ds
	movw	$(realmode_msg - setup_start - 0x200), %si
	movw	$0x3f8, %dx
1:	lodsb
	testb	%al, %al
	jz	2f
	outb	%al, %dx
	jmp	1b
2:	movb	$0xfe, %al
	outb	%al, $0x64
	lidt	(realmode_null_idt - setup_start - 0x200)
	int3
	hlt

realmode_null_idt:
	.word	0, 0, 0
realmode_msg:
	.asciz	"testguest: 16-bit real-mode entry is not supported, use the 64-bit boot protocol or PVH\n"

kernel_version:
	.asciz	"mvmm testguest"
