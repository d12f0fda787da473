/* lib.h - freestanding string and print helpers. */
#ifndef TESTGUEST_LIB_H
#define TESTGUEST_LIB_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define ARRAY_SIZE(a)	(sizeof(a) / sizeof((a)[0]))

/* The compiler may emit calls to these four itself. */
void *memset(void *dst, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);

/* Output to the UART. */
void print(const char *s);
void print_hex64(uint64_t v);	/* 16 lowercase hex digits, no "0x" */
void print_dec(uint64_t v);

/* True if `word` is one of the blank-separated words of `cmdline`. */
bool cmdline_has_word(const char *cmdline, const char *word);

#endif
