/*
 * virtio_mmio.c - virtio-mmio transport: discovery and initialisation
 * (virtio 1.x spec, sections 3.1 and 4.2). Every register access is one
 * 32-bit MMIO access, i.e. one VM exit.
 */
#include "virtio_mmio.h"
#include "io.h"
#include "lib.h"

#define CMDLINE_PREFIX	"virtio_mmio.device="
#define RESET_POLLS	1000

uint32_t virtio_mmio_read(struct virtio_mmio_dev *dev, uint32_t reg)
{
	return mmio_read32(dev->base + reg);
}

void virtio_mmio_write(struct virtio_mmio_dev *dev, uint32_t reg, uint32_t val)
{
	mmio_write32(dev->base + reg, val);
}

static void print_window(uint64_t base)
{
	print("virtio-mmio: base=0x");
	print_hex64(base);
}

/* "<size>@<base>:<irq>[:<id>]"; size may end in K, M or G. */
static bool parse_device_word(const char *s, size_t n, struct virtio_mmio_dev *dev)
{
	size_t i, used;
	uint64_t irq;

	used = parse_u64(s, n, &dev->size);
	if (!used)
		return false;
	i = used;
	if (i < n && (s[i] == 'K' || s[i] == 'k')) {
		dev->size <<= 10;
		i++;
	} else if (i < n && (s[i] == 'M' || s[i] == 'm')) {
		dev->size <<= 20;
		i++;
	} else if (i < n && (s[i] == 'G' || s[i] == 'g')) {
		dev->size <<= 30;
		i++;
	}
	if (i >= n || s[i++] != '@')
		return false;
	used = parse_u64(s + i, n - i, &dev->base);
	if (!used)
		return false;
	i += used;
	if (i >= n || s[i++] != ':')
		return false;
	used = parse_u64(s + i, n - i, &irq);
	if (!used || irq > 0xffffffffu)
		return false;
	i += used;
	dev->irq = (uint32_t)irq;
	/* An optional ":<platform device id>" follows; it is ignored. */
	return i == n || s[i] == ':';
}

/* Checks the window's ID registers; true if it holds a usable device. */
static bool probe(struct virtio_mmio_dev *dev)
{
	uint32_t magic, version;

	print_window(dev->base);
	/* entry.S identity-maps 4 GiB ([0xb0000000, 4 GiB) uncached). */
	if (dev->size < VIRTIO_MMIO_CONFIG || dev->base >= 0x100000000ULL ||
	    dev->size > 0x100000000ULL - dev->base) {
		print(" error: window too small or not below 4 GiB\n");
		return false;
	}
	magic = virtio_mmio_read(dev, VIRTIO_MMIO_MAGIC_VALUE);
	if (magic != VIRTIO_MMIO_MAGIC) {
		print(" error: bad magic 0x");
		print_hex(magic, 8);
		print("\n");
		return false;
	}
	version = virtio_mmio_read(dev, VIRTIO_MMIO_VERSION);
	if (version != VIRTIO_MMIO_VERSION_MODERN) {
		print(" error: version ");
		print_dec(version);
		print(" not supported\n");
		return false;
	}
	dev->device_id = virtio_mmio_read(dev, VIRTIO_MMIO_DEVICE_ID);
	dev->vendor_id = virtio_mmio_read(dev, VIRTIO_MMIO_VENDOR_ID);
	print(" irq=");
	print_dec(dev->irq);
	if (dev->device_id == 0) {
		print(" empty\n");
		return false;
	}
	print(" device=");
	print_dec(dev->device_id);
	print(" vendor=0x");
	print_hex(dev->vendor_id, 8);
	print("\n");
	return true;
}

static struct virtio_mmio_dev devices[VIRTIO_MMIO_MAX_DEVICES];
static unsigned n_devices;
static bool discovered;

static void discover(const char *cmdline)
{
	const size_t plen = sizeof(CMDLINE_PREFIX) - 1;
	const char *word;
	size_t len;

	while (cmdline_next_word(&cmdline, &word, &len)) {
		struct virtio_mmio_dev dev;

		if (len < plen || memcmp(word, CMDLINE_PREFIX, plen) != 0)
			continue;
		memset(&dev, 0, sizeof(dev));
		if (!parse_device_word(word + plen, len - plen, &dev)) {
			print("virtio-mmio: error: bad word: ");
			print_n(word, len);
			print("\n");
			continue;
		}
		if (!probe(&dev))
			continue;
		if (n_devices == VIRTIO_MMIO_MAX_DEVICES) {
			print("virtio-mmio: error: too many devices\n");
			break;
		}
		dev.name = "virtio";
		devices[n_devices++] = dev;
	}
}

struct virtio_mmio_dev *virtio_mmio_get(const char *cmdline, uint32_t device_id, unsigned nth)
{
	if (!discovered) {
		discover(cmdline);
		discovered = true;
	}
	for (unsigned i = 0; i < n_devices; i++)
		if (devices[i].device_id == device_id && nth-- == 0)
			return &devices[i];
	return NULL;
}

/* "<name>: error: [<what>: ]<msg> (status=0x<status>)" */
static void error(struct virtio_mmio_dev *dev, const char *what, const char *msg, uint32_t status)
{
	print(dev->name);
	print(": error: ");
	if (what) {
		print(what);
		print(": ");
	}
	print(msg);
	print(" (status=0x");
	print_hex(status, 2);
	print(")\n");
}

static void set_status(struct virtio_mmio_dev *dev, uint32_t bits)
{
	uint32_t status = virtio_mmio_read(dev, VIRTIO_MMIO_STATUS);

	virtio_mmio_write(dev, VIRTIO_MMIO_STATUS, status | bits);
}

void virtio_mmio_fail(struct virtio_mmio_dev *dev)
{
	set_status(dev, VIRTIO_STATUS_FAILED);
}

bool virtio_mmio_init(struct virtio_mmio_dev *dev, uint64_t wanted)
{
	uint32_t status;
	int i;

	/* Reset, and wait until the device reports it done. */
	virtio_mmio_write(dev, VIRTIO_MMIO_STATUS, 0);
	for (i = 0; i < RESET_POLLS; i++)
		if ((status = virtio_mmio_read(dev, VIRTIO_MMIO_STATUS)) == 0)
			break;
	if (i == RESET_POLLS) {
		error(dev, NULL, "reset did not complete", status);
		return false;
	}
	set_status(dev, VIRTIO_STATUS_ACKNOWLEDGE);
	set_status(dev, VIRTIO_STATUS_DRIVER);

	virtio_mmio_write(dev, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
	dev->features = virtio_mmio_read(dev, VIRTIO_MMIO_DEVICE_FEATURES);
	virtio_mmio_write(dev, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
	dev->features |= (uint64_t)virtio_mmio_read(dev, VIRTIO_MMIO_DEVICE_FEATURES) << 32;
	if (!virtio_has_feature(dev->features, VIRTIO_F_VERSION_1)) {
		error(dev, NULL, "device does not offer VIRTIO_F_VERSION_1", 0);
		virtio_mmio_fail(dev);
		return false;
	}
	dev->accepted = dev->features & (wanted | (1ULL << VIRTIO_F_VERSION_1));
	virtio_mmio_write(dev, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
	virtio_mmio_write(dev, VIRTIO_MMIO_DRIVER_FEATURES, (uint32_t)dev->accepted);
	virtio_mmio_write(dev, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
	virtio_mmio_write(dev, VIRTIO_MMIO_DRIVER_FEATURES, (uint32_t)(dev->accepted >> 32));

	set_status(dev, VIRTIO_STATUS_FEATURES_OK);
	status = virtio_mmio_read(dev, VIRTIO_MMIO_STATUS);
	if (!(status & VIRTIO_STATUS_FEATURES_OK)) {
		error(dev, NULL, "device rejected the features", status);
		virtio_mmio_fail(dev);
		return false;
	}
	return true;
}

bool virtio_mmio_driver_ok(struct virtio_mmio_dev *dev)
{
	set_status(dev, VIRTIO_STATUS_DRIVER_OK);
	return virtio_mmio_status_ok(dev, "DRIVER_OK");
}

bool virtio_mmio_status_ok(struct virtio_mmio_dev *dev, const char *what)
{
	uint32_t status = virtio_mmio_read(dev, VIRTIO_MMIO_STATUS);

	if (status & VIRTIO_STATUS_NEEDS_RESET) {
		error(dev, what, "device needs reset", status);
		return false;
	}
	if ((status & VIRTIO_STATUS_DRIVER_OK) == 0 || (status & VIRTIO_STATUS_FAILED)) {
		error(dev, what, "device not running", status);
		return false;
	}
	return true;
}

uint32_t virtio_mmio_ack_interrupt(struct virtio_mmio_dev *dev)
{
	uint32_t isr = virtio_mmio_read(dev, VIRTIO_MMIO_INTERRUPT_STATUS);

	if (isr)
		virtio_mmio_write(dev, VIRTIO_MMIO_INTERRUPT_ACK, isr);
	return isr;
}

uint8_t virtio_mmio_config8(struct virtio_mmio_dev *dev, uint32_t off)
{
	return mmio_read8(dev->base + VIRTIO_MMIO_CONFIG + off);
}

uint32_t virtio_mmio_config32(struct virtio_mmio_dev *dev, uint32_t off)
{
	return mmio_read32(dev->base + VIRTIO_MMIO_CONFIG + off);
}

uint64_t virtio_mmio_config64(struct virtio_mmio_dev *dev, uint32_t off)
{
	uint32_t gen, lo, hi;
	int tries = 100;

	do {
		gen = virtio_mmio_read(dev, VIRTIO_MMIO_CONFIG_GENERATION);
		lo = virtio_mmio_config32(dev, off);
		hi = virtio_mmio_config32(dev, off + 4);
	} while (virtio_mmio_read(dev, VIRTIO_MMIO_CONFIG_GENERATION) != gen && --tries);
	return ((uint64_t)hi << 32) | lo;
}
