/*
 * uart.c - 8250 UART output.
 *
 * Each port access is a VM exit, so bytes go straight to THR without
 * initialising the UART or polling LSR (virtual UARTs never overrun).
 */
#include "uart.h"
#include "io.h"

void uart_putc(char c)
{
	outb(UART_COM1, (uint8_t)c);
}

void uart_puts(const char *s)
{
	while (*s)
		outb(UART_COM1, (uint8_t)*s++);
}
