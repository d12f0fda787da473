/*
 * blk.c - "test=blk": virtio-blk (virtio spec 5.2) over virtio-mmio.
 *
 * Disk 1 (the second virtio-blk device, writable): write a pattern to
 * sectors 0..7 and 2048..2055, flush, read both back and compare, and print
 * the FNV-1a 64 of the 8 KiB read back. Disk 0 (the first, read-only): hash
 * its first 64 KiB, print its capacity and serial (GET_ID), then check that a
 * write is refused. The line formats are listed in README.md;
 * expected.py computes the expected values on the host.
 */
#include "io.h"
#include "lib.h"
#include "tests.h"
#include "virtio_mmio.h"
#include "virtq.h"

#define VIRTIO_BLK_F_RO		5
#define VIRTIO_BLK_F_FLUSH	9

#define VIRTIO_BLK_T_IN		0
#define VIRTIO_BLK_T_OUT	1
#define VIRTIO_BLK_T_FLUSH	4
#define VIRTIO_BLK_T_GET_ID	8

#define VIRTIO_BLK_CFG_CAPACITY	0	/* le64, in 512-byte sectors */
#define VIRTIO_BLK_ID_BYTES	20

#define SECTOR_SIZE		512
#define CHUNK_SECTORS		8	/* 4 KiB per data request */
#define PATTERN_SECTORS		8	/* per range: 0..7 and 2048..2055 */
#define PATTERN_FAR_SECTOR	2048
#define DISK0_SECTORS		128	/* 64 KiB hashed on disk 0 */

struct virtio_blk_req_hdr {
	uint32_t type;
	uint32_t reserved;
	uint64_t sector;
};

struct disk {
	struct virtio_mmio_dev *dev;
	struct virtq vq;
	uint64_t capacity;
};

/* Request header, status byte and data, all identity-mapped .bss. */
static struct virtio_blk_req_hdr req_hdr __attribute__((aligned(16)));
static volatile uint8_t req_status;
static uint8_t id_buf[VIRTIO_BLK_ID_BYTES];
static uint8_t data[DISK0_SECTORS * SECTOR_SIZE] __attribute__((aligned(4096)));

static struct disk disks[2];

/*
 * One request: header (device-readable), optional data, status byte
 * (device-writable). Returns the status byte, or -1 after an error line
 * if the transfer itself failed.
 */
static int blk_request(struct disk *d, uint32_t type, uint64_t sector, void *buf, uint32_t len,
		       const char *what)
{
	struct vq_buf bufs[3];
	unsigned n = 0;
	uint32_t written;

	req_hdr.type = type;
	req_hdr.reserved = 0;
	req_hdr.sector = sector;
	req_status = 0xff;
	bufs[n++] = (struct vq_buf){ &req_hdr, sizeof(req_hdr), false };
	if (len)
		bufs[n++] = (struct vq_buf){ buf, len, type != VIRTIO_BLK_T_OUT };
	bufs[n++] = (struct vq_buf){ (void *)&req_status, 1, true };
	if (!virtq_transfer(&d->vq, bufs, n, &written, what))
		return -1;
	return req_status;
}

/* Like blk_request, but also prints an error line for a nonzero status. */
static bool blk_request_ok(struct disk *d, uint32_t type, uint64_t sector, void *buf,
			   uint32_t len, const char *what)
{
	int status = blk_request(d, type, sector, buf, len, what);

	if (status == 0)
		return true;
	if (status > 0) {
		print(d->dev->name);
		print(": error: ");
		print(what);
		print(" sector=");
		print_dec(sector);
		print(" status=");
		print_dec((uint64_t)status);
		print("\n");
	}
	return false;
}

/* Reads or writes `sectors` sectors at `sector` in CHUNK_SECTORS requests. */
static bool blk_rw(struct disk *d, uint32_t type, uint64_t sector, uint8_t *buf, uint32_t sectors)
{
	const char *what = type == VIRTIO_BLK_T_OUT ? "write" : "read";

	for (uint32_t done = 0; done < sectors; done += CHUNK_SECTORS) {
		uint32_t n = sectors - done < CHUNK_SECTORS ? sectors - done : CHUNK_SECTORS;

		if (!blk_request_ok(d, type, sector + done, buf + done * SECTOR_SIZE,
				    n * SECTOR_SIZE, what))
			return false;
	}
	return true;
}

/* Finds the nth virtio-blk device, initialises it with one queue. */
static bool disk_open(struct disk *d, const struct bootinfo *bi, unsigned nth, const char *name,
		      uint64_t features)
{
	d->dev = virtio_mmio_get(bi->cmdline, VIRTIO_ID_BLOCK, nth);
	if (!d->dev) {
		print(name);
		print(": error: no such virtio-blk device\n");
		return false;
	}
	d->dev->name = name;
	if (!virtio_mmio_init(d->dev, features) || !virtq_setup(&d->vq, d->dev, 0)) {
		virtio_mmio_fail(d->dev);
		return false;
	}
	if (!virtio_mmio_driver_ok(d->dev))
		return false;
	d->capacity = virtio_mmio_config64(d->dev, VIRTIO_BLK_CFG_CAPACITY);
	return true;
}

static uint8_t pattern_byte(uint64_t sector, uint32_t i, uint64_t seed)
{
	return (uint8_t)(sector * 31 + i * 7 + seed);
}

static void print_fnv(const char *prefix, uint64_t h)
{
	print(prefix);
	print(": fnv=");
	print_hex64(h);
	print("\n");
}

/* Disk 1: pattern write, flush, read back, compare, hash. */
static void test_disk1(struct disk *d, uint64_t seed)
{
	static const uint64_t starts[2] = { 0, PATTERN_FAR_SECTOR };
	const uint32_t range_bytes = PATTERN_SECTORS * SECTOR_SIZE;
	uint8_t *wr = data, *rd = data + 2 * range_bytes;
	bool ok;

	if (d->capacity < PATTERN_FAR_SECTOR + PATTERN_SECTORS) {
		print("blk1: error: capacity ");
		print_dec(d->capacity);
		print(" is below 2056 sectors\n");
		return;
	}
	/* The pattern, and its complement where the data is to be read back. */
	for (unsigned r = 0; r < 2; r++)
		for (uint32_t s = 0; s < PATTERN_SECTORS; s++)
			for (uint32_t i = 0; i < SECTOR_SIZE; i++) {
				uint32_t off = (r * PATTERN_SECTORS + s) * SECTOR_SIZE + i;
				uint8_t b = pattern_byte(starts[r] + s, i, seed);

				wr[off] = b;
				rd[off] = (uint8_t)~b;
			}

	for (unsigned r = 0; r < 2; r++)
		if (!blk_rw(d, VIRTIO_BLK_T_OUT, starts[r], wr + r * range_bytes, PATTERN_SECTORS))
			return;

	if (virtio_has_feature(d->dev->accepted, VIRTIO_BLK_F_FLUSH)) {
		print("blk1: flush=1\n");
		if (!blk_request_ok(d, VIRTIO_BLK_T_FLUSH, 0, NULL, 0, "flush"))
			return;
	} else {
		print("blk1: flush=0\n");
	}

	for (unsigned r = 0; r < 2; r++)
		if (!blk_rw(d, VIRTIO_BLK_T_IN, starts[r], rd + r * range_bytes, PATTERN_SECTORS))
			return;

	ok = true;
	for (uint32_t off = 0; off < 2 * range_bytes; off++) {
		if (rd[off] != wr[off]) {
			uint32_t s = off / SECTOR_SIZE;

			print("blk1: mismatch sector=");
			print_dec(starts[s / PATTERN_SECTORS] + s % PATTERN_SECTORS);
			print(" byte=");
			print_dec(off % SECTOR_SIZE);
			print(" got=0x");
			print_hex(rd[off], 2);
			print(" want=0x");
			print_hex(wr[off], 2);
			print("\n");
			ok = false;
			break;
		}
	}
	if (ok)
		print("blk1: write+flush+read ok\n");
	print_fnv("blk1", fnv1a64(FNV1A64_INIT, rd, 2 * range_bytes));
}

/* Disk 0: hash the first 64 KiB, capacity, serial, refused write. */
static void test_disk0(struct disk *d)
{
	uint64_t sectors = d->capacity < DISK0_SECTORS ? d->capacity : DISK0_SECTORS;
	int status;

	if (!blk_rw(d, VIRTIO_BLK_T_IN, 0, data, (uint32_t)sectors))
		return;
	print_fnv("blk0", fnv1a64(FNV1A64_INIT, data, sectors * SECTOR_SIZE));
	print("blk0: capacity=");
	print_dec(d->capacity);
	print("\n");

	memset(id_buf, 0, sizeof(id_buf));
	status = blk_request(d, VIRTIO_BLK_T_GET_ID, 0, id_buf, sizeof(id_buf), "get_id");
	if (status == 0) {
		print("blk0: id=");
		for (unsigned i = 0; i < sizeof(id_buf) && id_buf[i]; i++) {
			char c = (char)id_buf[i];

			print_n(c >= 0x20 && c < 0x7f ? &c : "?", 1);
		}
		print("\n");
	} else if (status > 0) {
		print("blk0: id status=");
		print_dec((uint64_t)status);
		print("\n");
	}

	print("blk0: ro=");
	print(virtio_has_feature(d->dev->features, VIRTIO_BLK_F_RO) ? "1\n" : "0\n");
	/* Writes back sector 0's own bytes: harmless should the device accept it. */
	status = blk_request(d, VIRTIO_BLK_T_OUT, 0, data, SECTOR_SIZE, "write");
	if (status >= 0) {
		print("blk0: write status=");
		print_dec((uint64_t)status);
		print("\n");
	}
}

void test_blk(const struct bootinfo *bi)
{
	uint64_t seed = 1;
	const char *v;
	size_t len;

	v = cmdline_value(bi->cmdline, "blk.seed=", &len);
	if (v && parse_u64(v, len, &seed) != len) {
		print("blk: error: bad blk.seed, using 1\n");
		seed = 1;
	}

	if (disk_open(&disks[1], bi, 1, "blk1", 1ULL << VIRTIO_BLK_F_FLUSH))
		test_disk1(&disks[1], seed);
	if (disk_open(&disks[0], bi, 0, "blk0", 1ULL << VIRTIO_BLK_F_RO))
		test_disk0(&disks[0]);
	print("blk: done\n");
}
