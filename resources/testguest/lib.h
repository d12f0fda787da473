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
void print_hex(uint64_t v, unsigned digits);	/* the low `digits` hex digits, no "0x" */
void print_n(const char *s, size_t n);		/* exactly n bytes */

/* True if `word` is one of the blank-separated words of `cmdline`. */
bool cmdline_has_word(const char *cmdline, const char *word);

/*
 * Word iterator: sets *word and *len to the next blank-separated word after
 * *cursor and advances *cursor past it. False when there are no more words.
 */
bool cmdline_next_word(const char **cursor, const char **word, size_t *len);

/*
 * The value of the first word that starts with `prefix` (e.g. "blk.seed="):
 * a pointer to the rest of that word and its length in *len, or NULL.
 */
const char *cmdline_value(const char *cmdline, const char *prefix, size_t *len);

/*
 * Parses an unsigned number at s (at most n chars): "0x" + hex digits or
 * decimal digits. Returns the number of chars used, 0 if none or overflow.
 */
size_t parse_u64(const char *s, size_t n, uint64_t *out);

/* FNV-1a 64-bit: h = fnv1a64(FNV1A64_INIT, data, n), chainable over pieces. */
#define FNV1A64_INIT	0xcbf29ce484222325ULL
uint64_t fnv1a64(uint64_t h, const void *data, size_t n);

#endif
