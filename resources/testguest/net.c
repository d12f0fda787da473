/*
 * net.c - "test=net": virtio-net (virtio spec 5.1) over virtio-mmio.
 *
 * Negotiates VERSION_1 and MAC only (no mergeable buffers, no offloads), so
 * every buffer is a 12-byte struct virtio_net_hdr_v1 followed by one
 * Ethernet frame. Sends one broadcast frame of ethertype 0x88b5 carrying
 * "mvmm-ping <net.token>", then waits for a 0x88b5 frame back and prints
 * its payload. The line formats are listed in README.md.
 */
#include "io.h"
#include "lib.h"
#include "tests.h"
#include "virtio_mmio.h"
#include "virtq.h"

#define VIRTIO_NET_F_MAC	5
#define VIRTIO_NET_CFG_MAC	0	/* u8[6] */

#define NET_HDR_LEN		12	/* struct virtio_net_hdr_v1, all zero on TX */
#define ETH_HLEN		14
#define ETH_ZLEN		60	/* minimum frame length without FCS */
#define ETHERTYPE_MVMM		0x88b5	/* IEEE local experimental ethertype 1 */
#define PAYLOAD_MAX		64
#define TOKEN_MAX		40

#define RX_BUFS			4
#define RX_BUF_SIZE		2048	/* >= 12 + 1514 */
#define RX_QUEUE		0
#define TX_QUEUE		1

/* How long to wait for the reply: 12e9 TSC ticks, 4 s at 3 GHz, 6 s at 2 GHz. */
#define NET_REPLY_TIMEOUT_TSC	12000000000ULL

static uint8_t rx_bufs[RX_BUFS][RX_BUF_SIZE] __attribute__((aligned(4096)));
static uint8_t tx_buf[NET_HDR_LEN + ETH_HLEN + PAYLOAD_MAX] __attribute__((aligned(64)));
static int8_t rx_buf_of_head[VIRTQ_MAX_SIZE];	/* descriptor head -> rx_bufs index */
static struct virtq rxq, txq;

static void print_mac(const uint8_t *mac)
{
	for (int i = 0; i < 6; i++) {
		if (i)
			print(":");
		print_hex(mac[i], 2);
	}
}

/* Prints up to `n` bytes of `s`, stopping at a NUL; non-printable bytes as '?'. */
static void print_text(const uint8_t *s, size_t n)
{
	for (size_t i = 0; i < n && s[i]; i++) {
		char c = (char)s[i];

		print_n(c >= 0x20 && c < 0x7f ? &c : "?", 1);
	}
}

static bool rx_post(int b)
{
	struct vq_buf buf = { rx_bufs[b], RX_BUF_SIZE, true };
	int head = virtq_add(&rxq, &buf, 1);

	if (head < 0) {
		print("net: error: RX queue full\n");
		return false;
	}
	rx_buf_of_head[head] = (int8_t)b;
	return true;
}

static bool net_open(struct virtio_mmio_dev *dev, uint8_t *mac)
{
	dev->name = "net";
	if (!virtio_mmio_init(dev, 1ULL << VIRTIO_NET_F_MAC) ||
	    !virtq_setup(&rxq, dev, RX_QUEUE) || !virtq_setup(&txq, dev, TX_QUEUE)) {
		virtio_mmio_fail(dev);
		return false;
	}
	if (virtio_has_feature(dev->accepted, VIRTIO_NET_F_MAC)) {
		for (int i = 0; i < 6; i++)
			mac[i] = virtio_mmio_config8(dev, VIRTIO_NET_CFG_MAC + i);
	} else {
		static const uint8_t fallback[6] = { 0x02, 0, 0, 0, 0, 0x01 };

		print("net: error: device has no MAC (VIRTIO_NET_F_MAC), using 02:00:00:00:00:01\n");
		memcpy(mac, fallback, 6);
	}
	if (!virtio_mmio_driver_ok(dev))
		return false;
	for (int b = 0; b < RX_BUFS; b++)
		if (!rx_post(b))
			return false;
	virtq_notify(&rxq);
	return true;
}

/* Builds and sends the ping; returns the frame length, 0 on failure. */
static uint32_t send_ping(const uint8_t *mac, const char *token, size_t token_len)
{
	uint8_t *frame = tx_buf + NET_HDR_LEN;
	uint32_t len, written;
	size_t plen;
	struct vq_buf buf;

	memset(tx_buf, 0, sizeof(tx_buf));
	memset(frame, 0xff, 6);
	memcpy(frame + 6, mac, 6);
	frame[12] = ETHERTYPE_MVMM >> 8;
	frame[13] = ETHERTYPE_MVMM & 0xff;
	memcpy(frame + ETH_HLEN, "mvmm-ping ", 10);
	if (token_len > TOKEN_MAX)
		token_len = TOKEN_MAX;
	memcpy(frame + ETH_HLEN + 10, token, token_len);
	plen = 10 + token_len;
	len = (uint32_t)(ETH_HLEN + plen);
	if (len < ETH_ZLEN)
		len = ETH_ZLEN;

	buf = (struct vq_buf){ tx_buf, NET_HDR_LEN + len, false };
	if (!virtq_transfer(&txq, &buf, 1, &written, "tx"))
		return 0;
	return len;
}

/* Waits for a frame of ethertype 0x88b5; other frames are re-posted. */
static bool wait_reply(struct virtio_mmio_dev *dev)
{
	uint64_t start = rdtsc();
	uint32_t len;
	int head;

	while (rdtsc() - start < NET_REPLY_TIMEOUT_TSC) {
		head = virtq_get(&rxq, &len);
		if (head < 0) {
			cpu_relax();
			continue;
		}
		virtio_mmio_ack_interrupt(dev);

		int b = rx_buf_of_head[head];
		const uint8_t *frame = rx_bufs[b] + NET_HDR_LEN;
		uint32_t flen = len > NET_HDR_LEN ? len - NET_HDR_LEN : 0;

		if (len <= RX_BUF_SIZE && flen >= ETH_HLEN &&
		    ((frame[12] << 8) | frame[13]) == ETHERTYPE_MVMM) {
			uint32_t plen = flen - ETH_HLEN;

			print("net: received ");
			print_dec(flen);
			print(" payload=");
			print_text(frame + ETH_HLEN, plen < PAYLOAD_MAX ? plen : PAYLOAD_MAX);
			print("\nnet: from=");
			print_mac(frame + 6);
			print("\n");
			return true;
		}
		if (!rx_post(b))
			return false;
		virtq_notify(&rxq);
	}
	if (virtio_mmio_status_ok(dev, "rx"))
		print("net: timeout\n");
	return false;
}

void test_net(const struct bootinfo *bi)
{
	struct virtio_mmio_dev *dev = virtio_mmio_get(bi->cmdline, VIRTIO_ID_NET, 0);
	const char *token;
	size_t token_len;
	uint8_t mac[6];
	uint32_t sent;

	if (!dev) {
		print("net: error: no virtio-net device\n");
		print("net: done\n");
		return;
	}
	token = cmdline_value(bi->cmdline, "net.token=", &token_len);
	if (!token) {
		token = "none";
		token_len = 4;
	}
	if (net_open(dev, mac)) {
		print("net: mac=");
		print_mac(mac);
		print("\n");
		sent = send_ping(mac, token, token_len);
		if (sent) {
			print("net: sent ");
			print_dec(sent);
			print("\n");
			wait_reply(dev);
		}
	}
	print("net: done\n");
}
