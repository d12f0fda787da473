/*
 * virtq.h - split virtqueues (virtio spec 2.7), driven by polling the used
 * ring (no interrupts).
 */
#ifndef TESTGUEST_VIRTQ_H
#define TESTGUEST_VIRTQ_H

#include <stdbool.h>
#include <stdint.h>

#include "virtio_mmio.h"

#define VIRTQ_MAX_SIZE		16	/* queue size used when the device allows it */

#define VIRTQ_DESC_F_NEXT	1
#define VIRTQ_DESC_F_WRITE	2	/* device-writable buffer */

/*
 * How long a request may take before it is reported as timed out, in TSC
 * ticks: 12e9 is 4 s at 3 GHz, 6 s at 2 GHz.
 */
#define VIRTQ_TIMEOUT_TSC	12000000000ULL

struct virtq_desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags;
	uint16_t next;
};

struct virtq_avail {
	uint16_t flags;
	uint16_t idx;
	uint16_t ring[VIRTQ_MAX_SIZE];	/* only the first `num` are used */
};

struct virtq_used_elem {
	uint32_t id;			/* head of the completed chain */
	uint32_t len;			/* bytes the device wrote into it */
};

struct virtq_used {
	uint16_t flags;
	uint16_t idx;
	struct virtq_used_elem ring[VIRTQ_MAX_SIZE];
};

struct virtq {
	struct virtio_mmio_dev *dev;
	uint16_t index;			/* queue number on the device */
	uint16_t num;			/* queue size, a power of 2 */
	struct virtq_desc *desc;
	struct virtq_avail *avail;
	volatile struct virtq_used *used;
	uint16_t free_head;		/* free descriptors, linked through `next` */
	uint16_t num_free;
	uint16_t last_used;		/* used->idx value consumed so far */
};

/* One buffer of a descriptor chain. */
struct vq_buf {
	void *addr;			/* identity-mapped: also the guest-physical address */
	uint32_t len;
	bool device_writes;		/* VIRTQ_DESC_F_WRITE */
};

/*
 * Spec 4.2.3.2: sets up queue `index` of `dev` with min(VIRTQ_MAX_SIZE,
 * QueueNumMax) entries (rounded down to a power of 2) in a static page and
 * sets QueueReady. False, after an error line, on failure.
 */
bool virtq_setup(struct virtq *vq, struct virtio_mmio_dev *dev, uint16_t index);

/*
 * Chains `bufs` (device-readable ones first) into free descriptors and
 * publishes the chain in the available ring. Returns the head descriptor,
 * or -1 if there are not enough free descriptors. Does not notify.
 */
int virtq_add(struct virtq *vq, const struct vq_buf *bufs, unsigned n);

/* QueueNotify. */
void virtq_notify(struct virtq *vq);

/*
 * Takes the next used element if there is one: frees its chain, stores the
 * written length in *len and returns its head; -1 if none.
 */
int virtq_get(struct virtq *vq, uint32_t *len);

/* Polls virtq_get for up to `timeout_tsc` TSC ticks; -1 on timeout. */
int virtq_wait(struct virtq *vq, uint32_t *len, uint64_t timeout_tsc);

/*
 * One synchronous request: add, notify, wait (VIRTQ_TIMEOUT_TSC), then
 * acknowledge the interrupt and check the device status. Prints an error
 * line "<dev name>: error: <what>: ..." and returns false on failure.
 */
bool virtq_transfer(struct virtq *vq, const struct vq_buf *bufs, unsigned n,
		    uint32_t *len, const char *what);

#endif
