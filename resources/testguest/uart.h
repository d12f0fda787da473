/* uart.h - output to the 8250 UART at COM1. */
#ifndef TESTGUEST_UART_H
#define TESTGUEST_UART_H

#define UART_COM1	0x3f8

void uart_putc(char c);
void uart_puts(const char *s);

#endif
