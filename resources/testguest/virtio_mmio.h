/*
 * virtio_mmio.h - virtio-mmio transport (virtio 1.x, register layout
 * version 2): discovery from the command line and device initialisation.
 */
#ifndef TESTGUEST_VIRTIO_MMIO_H
#define TESTGUEST_VIRTIO_MMIO_H

#include <stdbool.h>
#include <stdint.h>

/* Registers (virtio spec 4.2.2), offsets from the window base. */
#define VIRTIO_MMIO_MAGIC_VALUE		0x000	/* "virt" */
#define VIRTIO_MMIO_VERSION		0x004
#define VIRTIO_MMIO_DEVICE_ID		0x008
#define VIRTIO_MMIO_VENDOR_ID		0x00c
#define VIRTIO_MMIO_DEVICE_FEATURES	0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL	0x014
#define VIRTIO_MMIO_DRIVER_FEATURES	0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL	0x024
#define VIRTIO_MMIO_QUEUE_SEL		0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX	0x034
#define VIRTIO_MMIO_QUEUE_NUM		0x038
#define VIRTIO_MMIO_QUEUE_READY		0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY	0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS	0x060
#define VIRTIO_MMIO_INTERRUPT_ACK	0x064
#define VIRTIO_MMIO_STATUS		0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW	0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH	0x084
#define VIRTIO_MMIO_QUEUE_DRIVER_LOW	0x090	/* available ring */
#define VIRTIO_MMIO_QUEUE_DRIVER_HIGH	0x094
#define VIRTIO_MMIO_QUEUE_DEVICE_LOW	0x0a0	/* used ring */
#define VIRTIO_MMIO_QUEUE_DEVICE_HIGH	0x0a4
#define VIRTIO_MMIO_CONFIG_GENERATION	0x0fc
#define VIRTIO_MMIO_CONFIG		0x100	/* device-specific configuration */

#define VIRTIO_MMIO_MAGIC		0x74726976
#define VIRTIO_MMIO_VERSION_MODERN	2

/* Device status bits (spec 2.1). */
#define VIRTIO_STATUS_ACKNOWLEDGE	1
#define VIRTIO_STATUS_DRIVER		2
#define VIRTIO_STATUS_DRIVER_OK		4
#define VIRTIO_STATUS_FEATURES_OK	8
#define VIRTIO_STATUS_NEEDS_RESET	64
#define VIRTIO_STATUS_FAILED		128

/* Device-independent feature bits (spec 6). */
#define VIRTIO_F_VERSION_1		32

#define VIRTIO_ID_NET			1
#define VIRTIO_ID_BLOCK			2
#define VIRTIO_ID_FS			26

#define VIRTIO_MMIO_MAX_DEVICES		32

/* One discovered device. */
struct virtio_mmio_dev {
	uint64_t base;
	uint64_t size;
	uint32_t irq;
	uint32_t device_id;	/* VIRTIO_ID_* */
	uint32_t vendor_id;
	uint64_t features;	/* offered by the device, read by virtio_mmio_init */
	uint64_t accepted;	/* negotiated, set by virtio_mmio_init */
	const char *name;	/* prefix for error lines, e.g. "blk1" */
};

/*
 * The nth (0-based) device of type `device_id` (VIRTIO_ID_*), or NULL.
 *
 * The first call discovers the devices: it parses every
 * "virtio_mmio.device=<size>@<base>:<irq>[:<id>]" word of `cmdline`, in
 * order, and probes each window: magic, version 2 and a nonzero device ID
 * (0 = empty slot, skipped). Each window gets one "virtio-mmio: " line.
 * Devices are numbered per type in command-line order.
 */
struct virtio_mmio_dev *virtio_mmio_get(const char *cmdline, uint32_t device_id, unsigned nth);

/*
 * Spec 3.1.1 steps 1-6: reset, ACKNOWLEDGE, DRIVER, read the device
 * features, accept `wanted` & offered (VIRTIO_F_VERSION_1 is required),
 * FEATURES_OK and check that it stuck. Returns false (after an error line and
 * setting FAILED) on failure. The queues are set up next (virtq_setup), then
 * virtio_mmio_driver_ok.
 */
bool virtio_mmio_init(struct virtio_mmio_dev *dev, uint64_t wanted);

/* Sets DRIVER_OK; false (with an error line) if the device rejects it. */
bool virtio_mmio_driver_ok(struct virtio_mmio_dev *dev);

/* Sets FAILED: the driver gives up on the device. */
void virtio_mmio_fail(struct virtio_mmio_dev *dev);

/*
 * False, with an error line naming `what`, if the device has set
 * DEVICE_NEEDS_RESET or lost DRIVER_OK.
 */
bool virtio_mmio_status_ok(struct virtio_mmio_dev *dev, const char *what);

/* Reads InterruptStatus and acknowledges what it reports; returns it. */
uint32_t virtio_mmio_ack_interrupt(struct virtio_mmio_dev *dev);

static inline bool virtio_has_feature(uint64_t features, unsigned bit)
{
	return (features >> bit) & 1;
}

/* Device configuration space accessors (natural width for each field). */
uint8_t virtio_mmio_config8(struct virtio_mmio_dev *dev, uint32_t off);
uint32_t virtio_mmio_config32(struct virtio_mmio_dev *dev, uint32_t off);
/* A 64-bit field, as two 32-bit reads made consistent by ConfigGeneration. */
uint64_t virtio_mmio_config64(struct virtio_mmio_dev *dev, uint32_t off);

/* Register accessors. */
uint32_t virtio_mmio_read(struct virtio_mmio_dev *dev, uint32_t reg);
void virtio_mmio_write(struct virtio_mmio_dev *dev, uint32_t reg, uint32_t val);

#endif
