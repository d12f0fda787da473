/* lib.c - freestanding string and print helpers. */
#include "lib.h"
#include "uart.h"

void *memset(void *dst, int c, size_t n)
{
	unsigned char *d = dst;

	while (n--)
		*d++ = (unsigned char)c;
	return dst;
}

void *memcpy(void *dst, const void *src, size_t n)
{
	unsigned char *d = dst;
	const unsigned char *s = src;

	while (n--)
		*d++ = *s++;
	return dst;
}

void *memmove(void *dst, const void *src, size_t n)
{
	unsigned char *d = dst;
	const unsigned char *s = src;

	if (d <= s || d >= s + n)
		return memcpy(dst, src, n);
	while (n--)
		d[n] = s[n];
	return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const unsigned char *x = a, *y = b;

	for (; n; n--, x++, y++)
		if (*x != *y)
			return *x - *y;
	return 0;
}

size_t strlen(const char *s)
{
	const char *p = s;

	while (*p)
		p++;
	return (size_t)(p - s);
}

void print(const char *s)
{
	uart_puts(s);
}

void print_hex64(uint64_t v)
{
	static const char digits[] = "0123456789abcdef";
	char buf[17];

	for (int i = 15; i >= 0; i--, v >>= 4)
		buf[i] = digits[v & 0xf];
	buf[16] = '\0';
	print(buf);
}

void print_dec(uint64_t v)
{
	char buf[21];
	int i = sizeof(buf) - 1;

	buf[i] = '\0';
	do {
		buf[--i] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	print(&buf[i]);
}

static bool is_blank(char c)
{
	return c == ' ' || c == '\t' || c == '\n';
}

bool cmdline_has_word(const char *cmdline, const char *word)
{
	size_t len = strlen(word);
	const char *p = cmdline;

	while (*p) {
		while (is_blank(*p))
			p++;
		const char *start = p;

		while (*p && !is_blank(*p))
			p++;
		if ((size_t)(p - start) == len && memcmp(start, word, len) == 0)
			return true;
	}
	return false;
}
