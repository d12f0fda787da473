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

void print_hex(uint64_t v, unsigned digits)
{
	static const char hex[] = "0123456789abcdef";
	char buf[17];

	if (digits > 16)
		digits = 16;
	buf[digits] = '\0';
	for (unsigned i = digits; i > 0; i--, v >>= 4)
		buf[i - 1] = hex[v & 0xf];
	print(buf);
}

void print_n(const char *s, size_t n)
{
	while (n--)
		uart_putc(*s++);
}

static bool is_blank(char c)
{
	return c == ' ' || c == '\t' || c == '\n';
}

bool cmdline_next_word(const char **cursor, const char **word, size_t *len)
{
	const char *p = *cursor;

	while (is_blank(*p))
		p++;
	if (!*p)
		return false;
	*word = p;
	while (*p && !is_blank(*p))
		p++;
	*len = (size_t)(p - *word);
	*cursor = p;
	return true;
}

bool cmdline_has_word(const char *cmdline, const char *word)
{
	size_t len = strlen(word), n;
	const char *w;

	while (cmdline_next_word(&cmdline, &w, &n))
		if (n == len && memcmp(w, word, len) == 0)
			return true;
	return false;
}

const char *cmdline_value(const char *cmdline, const char *prefix, size_t *len)
{
	size_t plen = strlen(prefix), n;
	const char *w;

	while (cmdline_next_word(&cmdline, &w, &n)) {
		if (n >= plen && memcmp(w, prefix, plen) == 0) {
			*len = n - plen;
			return w + plen;
		}
	}
	return NULL;
}

static int digit_value(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return 99;
}

size_t parse_u64(const char *s, size_t n, uint64_t *out)
{
	unsigned base = 10;
	size_t i = 0, start;
	uint64_t v = 0;

	if (n > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		base = 16;
		i = 2;
	}
	for (start = i; i < n; i++) {
		unsigned d = (unsigned)digit_value(s[i]);

		if (d >= base)
			break;
		if (v > (UINT64_MAX - d) / base)
			return 0;
		v = v * base + d;
	}
	if (i == start)
		return 0;
	*out = v;
	return i;
}

uint64_t fnv1a64(uint64_t h, const void *data, size_t n)
{
	const unsigned char *p = data;

	while (n--) {
		h ^= *p++;
		h *= 0x100000001b3ULL;
	}
	return h;
}
