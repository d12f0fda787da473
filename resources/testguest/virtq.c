/*
 * virtq.c - split virtqueues (virtio spec 2.7) in static, identity-mapped
 * memory. The driver polls the used ring; interrupts stay disabled.
 *
 * Ordering (x86 is TSO, but the fences are cheap and make the intent plain):
 * descriptors and the avail ring entry are written before the avail index
 * (mb), the index before QueueNotify (mb), and the used index is read before
 * the used element and the buffers (mb).
 */
#include "virtq.h"
#include "io.h"
#include "lib.h"

#define VIRTQ_PAGES	8	/* queues set up over the guest's lifetime */
#define PAGE_SIZE	4096

/* Ring layout inside one page. */
#define DESC_OFF	0
#define AVAIL_OFF	(VIRTQ_MAX_SIZE * sizeof(struct virtq_desc))
#define USED_OFF	2048

_Static_assert(AVAIL_OFF + sizeof(struct virtq_avail) <= USED_OFF, "avail ring overlaps");
_Static_assert(USED_OFF + sizeof(struct virtq_used) <= PAGE_SIZE, "used ring too large");

static uint8_t ring_pages[VIRTQ_PAGES][PAGE_SIZE] __attribute__((aligned(PAGE_SIZE)));
static unsigned ring_pages_used;

static void vq_error(struct virtq *vq, const char *what, const char *msg)
{
	print(vq->dev->name);
	print(": error: ");
	print(what);
	print(": queue ");
	print_dec(vq->index);
	print(": ");
	print(msg);
	print("\n");
}

static void write_addr(struct virtio_mmio_dev *dev, uint32_t low_reg, const volatile void *p)
{
	uint64_t addr = (uint64_t)(uintptr_t)p;

	virtio_mmio_write(dev, low_reg, (uint32_t)addr);
	virtio_mmio_write(dev, low_reg + 4, (uint32_t)(addr >> 32));
}

bool virtq_setup(struct virtq *vq, struct virtio_mmio_dev *dev, uint16_t index)
{
	uint32_t max;
	uint8_t *page;

	memset(vq, 0, sizeof(*vq));
	vq->dev = dev;
	vq->index = index;

	virtio_mmio_write(dev, VIRTIO_MMIO_QUEUE_SEL, index);
	if (virtio_mmio_read(dev, VIRTIO_MMIO_QUEUE_READY)) {
		vq_error(vq, "setup", "already ready");
		return false;
	}
	max = virtio_mmio_read(dev, VIRTIO_MMIO_QUEUE_NUM_MAX);
	if (max == 0) {
		vq_error(vq, "setup", "not available (QueueNumMax 0)");
		return false;
	}
	if (ring_pages_used == VIRTQ_PAGES) {
		vq_error(vq, "setup", "out of ring pages");
		return false;
	}
	vq->num = VIRTQ_MAX_SIZE;
	while (vq->num > max)
		vq->num >>= 1;

	page = ring_pages[ring_pages_used++];
	vq->desc = (struct virtq_desc *)(page + DESC_OFF);
	vq->avail = (struct virtq_avail *)(page + AVAIL_OFF);
	vq->used = (volatile struct virtq_used *)(page + USED_OFF);
	memset(vq->desc, 0, VIRTQ_MAX_SIZE * sizeof(struct virtq_desc));
	memset(vq->avail, 0, sizeof(struct virtq_avail));
	memset((void *)vq->used, 0, sizeof(struct virtq_used));
	for (uint16_t i = 0; i < vq->num; i++)
		vq->desc[i].next = (uint16_t)(i + 1);
	vq->free_head = 0;
	vq->num_free = vq->num;

	virtio_mmio_write(dev, VIRTIO_MMIO_QUEUE_NUM, vq->num);
	write_addr(dev, VIRTIO_MMIO_QUEUE_DESC_LOW, vq->desc);
	write_addr(dev, VIRTIO_MMIO_QUEUE_DRIVER_LOW, vq->avail);
	write_addr(dev, VIRTIO_MMIO_QUEUE_DEVICE_LOW, vq->used);
	mb();
	virtio_mmio_write(dev, VIRTIO_MMIO_QUEUE_READY, 1);
	if (virtio_mmio_read(dev, VIRTIO_MMIO_QUEUE_READY) != 1) {
		vq_error(vq, "setup", "QueueReady did not stick");
		return false;
	}
	return true;
}

int virtq_add(struct virtq *vq, const struct vq_buf *bufs, unsigned n)
{
	uint16_t head = vq->free_head, d = head, last = head;

	if (n == 0 || n > vq->num_free)
		return -1;
	for (unsigned i = 0; i < n; i++) {
		struct virtq_desc *desc = &vq->desc[d];

		desc->addr = (uint64_t)(uintptr_t)bufs[i].addr;
		desc->len = bufs[i].len;
		desc->flags = bufs[i].device_writes ? VIRTQ_DESC_F_WRITE : 0;
		if (i + 1 < n)
			desc->flags |= VIRTQ_DESC_F_NEXT;
		last = d;
		d = desc->next;
	}
	vq->free_head = vq->desc[last].next;
	vq->num_free = (uint16_t)(vq->num_free - n);

	vq->avail->ring[vq->avail->idx & (vq->num - 1)] = head;
	mb();		/* descriptors and ring entry before the index */
	vq->avail->idx++;
	return head;
}

void virtq_notify(struct virtq *vq)
{
	mb();		/* the avail index before the notification */
	virtio_mmio_write(vq->dev, VIRTIO_MMIO_QUEUE_NOTIFY, vq->index);
}

/* Returns the chain at `head` to the free list. */
static void free_chain(struct virtq *vq, uint16_t head)
{
	uint16_t d = head, n = 1;

	while (vq->desc[d].flags & VIRTQ_DESC_F_NEXT) {
		d = vq->desc[d].next;
		n++;
	}
	vq->desc[d].next = vq->free_head;
	vq->free_head = head;
	vq->num_free = (uint16_t)(vq->num_free + n);
}

int virtq_get(struct virtq *vq, uint32_t *len)
{
	struct virtq_used_elem elem;

	if (vq->used->idx == vq->last_used)
		return -1;
	mb();		/* the used index before the element and the buffers */
	elem.id = vq->used->ring[vq->last_used & (vq->num - 1)].id;
	elem.len = vq->used->ring[vq->last_used & (vq->num - 1)].len;
	vq->last_used++;
	if (elem.id >= vq->num) {
		vq_error(vq, "used ring", "bad descriptor id");
		return -1;
	}
	free_chain(vq, (uint16_t)elem.id);
	*len = elem.len;
	return (int)elem.id;
}

int virtq_wait(struct virtq *vq, uint32_t *len, uint64_t timeout_tsc)
{
	uint64_t start = rdtsc();
	int head;

	while ((head = virtq_get(vq, len)) < 0) {
		if (rdtsc() - start > timeout_tsc)
			return -1;
		cpu_relax();
	}
	return head;
}

bool virtq_transfer(struct virtq *vq, const struct vq_buf *bufs, unsigned n,
		    uint32_t *len, const char *what)
{
	int head, done;

	head = virtq_add(vq, bufs, n);
	if (head < 0) {
		vq_error(vq, what, "no free descriptors");
		return false;
	}
	virtq_notify(vq);
	done = virtq_wait(vq, len, VIRTQ_TIMEOUT_TSC);
	virtio_mmio_ack_interrupt(vq->dev);
	if (!virtio_mmio_status_ok(vq->dev, what))
		return false;
	if (done < 0) {
		vq_error(vq, what, "timeout");
		return false;
	}
	if (done != head) {
		vq_error(vq, what, "unexpected used descriptor");
		return false;
	}
	return true;
}
