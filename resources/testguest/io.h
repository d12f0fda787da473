/* io.h - port I/O and MMIO accessors, barriers, TSC. */
#ifndef TESTGUEST_IO_H
#define TESTGUEST_IO_H

#include <stdint.h>

static inline void outb(uint16_t port, uint8_t val)
{
	__asm__ volatile("outb %0, %1" : : "a"(val), "Nd"(port));
}

static inline uint8_t inb(uint16_t port)
{
	uint8_t val;

	__asm__ volatile("inb %1, %0" : "=a"(val) : "Nd"(port));
	return val;
}

/*
 * MMIO accessors: one plain mov each (one VM exit each), and compiler
 * barriers ("memory"), so ordinary memory accesses (virtqueue rings) are not
 * moved across them.
 */
static inline uint8_t mmio_read8(uint64_t addr)
{
	uint8_t val;

	__asm__ volatile("movb %1, %0" : "=q"(val) : "m"(*(volatile uint8_t *)(uintptr_t)addr) : "memory");
	return val;
}

static inline uint16_t mmio_read16(uint64_t addr)
{
	uint16_t val;

	__asm__ volatile("movw %1, %0" : "=r"(val) : "m"(*(volatile uint16_t *)(uintptr_t)addr) : "memory");
	return val;
}

static inline uint32_t mmio_read32(uint64_t addr)
{
	uint32_t val;

	__asm__ volatile("movl %1, %0" : "=r"(val) : "m"(*(volatile uint32_t *)(uintptr_t)addr) : "memory");
	return val;
}

static inline void mmio_write8(uint64_t addr, uint8_t val)
{
	__asm__ volatile("movb %1, %0" : "=m"(*(volatile uint8_t *)(uintptr_t)addr) : "q"(val) : "memory");
}

static inline void mmio_write16(uint64_t addr, uint16_t val)
{
	__asm__ volatile("movw %1, %0" : "=m"(*(volatile uint16_t *)(uintptr_t)addr) : "r"(val) : "memory");
}

static inline void mmio_write32(uint64_t addr, uint32_t val)
{
	__asm__ volatile("movl %1, %0" : "=m"(*(volatile uint32_t *)(uintptr_t)addr) : "r"(val) : "memory");
}

/* Compiler barrier: no memory access is moved across it. */
static inline void barrier(void)
{
	__asm__ volatile("" : : : "memory");
}

/* Full memory barrier (also a compiler barrier). */
static inline void mb(void)
{
	__asm__ volatile("mfence" : : : "memory");
}

/* Spin-loop hint. */
static inline void cpu_relax(void)
{
	__asm__ volatile("pause" : : : "memory");
}

/* Time stamp counter; it counts wall-clock time at a fixed rate (constant TSC). */
static inline uint64_t rdtsc(void)
{
	uint32_t lo, hi;

	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((uint64_t)hi << 32) | lo;
}

#endif
