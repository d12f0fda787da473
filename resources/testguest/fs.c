/*
 * fs.c - "test=fs" and "test=fs-wait": a minimal virtio-fs client (virtio
 * spec 5.11) over virtio-mmio, speaking FUSE (fuse.h) to the device.
 *
 * Queue 0 is the high-priority queue (set up, never used), queue 1 the first
 * request queue. Every FUSE request is one chain on queue 1: the request
 * header and arguments, then a name or WRITE data (device-readable), then
 * the reply header and the reply body (device-writable). Requests are sent
 * one at a time, and a request's descriptors and buffers are only reused
 * once the device has returned it.
 *
 * test=fs: INIT; LOOKUP (component by component), OPEN, READ (4 KiB at most)
 * and RELEASE of fs.read; LOOKUP/MKDIR of fs.write's directories, then
 * CREATE, WRITE "mvmm-fs <fs.token>\n", FSYNC and RELEASE of fs.write.
 * test=fs-wait: the same, then LOOKUP fs.marker every 100 ms until it
 * exists (waiting as long as needed for each reply, up to 60 s in all, as
 * the VMM may replay requests to a restarted virtiofsd), then read fs.read
 * again. The line formats are listed in README.md.
 */
#include "fuse.h"
#include "io.h"
#include "lib.h"
#include "tests.h"
#include "virtio_mmio.h"
#include "virtq.h"

#define VIRTIO_FS_CFG_TAG	0	/* u8[36], NUL-padded */
#define VIRTIO_FS_TAG_LEN	36
#define VIRTIO_FS_CFG_NUM_QUEUES 36	/* le32: number of request queues */
#define FS_HIPRIO_QUEUE		0
#define FS_REQUEST_QUEUE	1

/* Times in TSC ticks, counted at 3 GHz like blk.c and net.c. */
#define TSC_PER_MS		3000000ULL
#define FS_TIMEOUT_TSC		VIRTQ_TIMEOUT_TSC	/* test=fs: per request, ~4 s */
#define FS_WAIT_TSC		(60000 * TSC_PER_MS)	/* test=fs-wait: ~60 s */
#define FS_RETRY_TSC		(100 * TSC_PER_MS)	/* between marker LOOKUPs */
#define FS_STATUS_POLL_TSC	(10 * TSC_PER_MS)	/* status register checks */

#define FS_READ_MAX		4096
#define FS_TOKEN_MAX		64
#define FS_READAHEAD		0x20000

struct fs {
	struct virtio_mmio_dev *dev;
	struct virtq hiprio, req;
	uint64_t unique;		/* last request ID */
	uint32_t status;		/* device status last seen */
	int pending;			/* head of a request that timed out, or -1 */
	uint64_t timeout;		/* how long to wait for one reply, TSC ticks */
};

/* One FUSE exchange, for fuse_call. */
struct fuse_msg {
	uint32_t opcode;
	uint64_t nodeid;
	const void *args;		/* the opcode's argument struct */
	uint32_t args_len;
	const char *name;		/* a path component (NUL appended), or NULL */
	size_t name_len;
	const void *data;		/* WRITE data, or NULL */
	uint32_t data_len;
	void *body;			/* reply after the header: a static buffer */
	uint32_t body_len;
	uint32_t got;			/* set by fuse_call: reply bytes after the header */
};

/* Request and reply buffers, static so that a late reply lands in them. */
static struct {
	struct fuse_req_header h;
	uint8_t args[64];
} req_buf __attribute__((aligned(64)));
static uint8_t req_tail[FUSE_NAME_MAX + 1] __attribute__((aligned(64)));	/* name or WRITE data */
static struct fuse_reply_header reply_hdr __attribute__((aligned(64)));
static union {
	struct fuse_init_reply init;
	struct fuse_entry_reply entry;
	struct fuse_open_reply open;
	struct fuse_create_reply create;
	struct fuse_write_reply write;
} reply __attribute__((aligned(64)));
static uint8_t file_buf[FS_READ_MAX] __attribute__((aligned(4096)));	/* READ data */

static struct fs fs_state;

/* "fs: error <op> <-errno>" */
static void fs_error(const char *op, int err)
{
	print("fs: error ");
	print(op);
	print(err < 0 ? " -" : " ");
	print_dec((uint64_t)(err < 0 ? -(int64_t)err : err));
	print("\n");
}

/* Prints "fs: status=0x<xx>" when the device status register has changed. */
static void fs_check_status(struct fs *fs)
{
	uint32_t status = virtio_mmio_read(fs->dev, VIRTIO_MMIO_STATUS);

	if (status != fs->status) {
		print("fs: status=0x");
		print_hex(status, 2);
		print("\n");
		fs->status = status;
	}
}

/* Polls for the chain at `head` for up to `timeout` ticks. */
static bool fs_wait(struct fs *fs, int head, uint64_t timeout, uint32_t *len)
{
	uint64_t start = rdtsc(), polled = start, now;
	int done;

	for (;;) {
		done = virtq_get(&fs->req, len);
		if (done >= 0) {
			virtio_mmio_ack_interrupt(fs->dev);
			fs_check_status(fs);
			if (done == head)
				return true;
			print("fs: error: unexpected used descriptor\n");
		}
		now = rdtsc();
		if (now - polled >= FS_STATUS_POLL_TSC) {
			fs_check_status(fs);
			polled = now;
		}
		if (now - start >= timeout)
			return false;
		cpu_relax();
	}
}

/* Busy-waits `ticks`, watching the device status. */
static void fs_sleep(struct fs *fs, uint64_t ticks)
{
	uint64_t start = rdtsc();

	while (rdtsc() - start < ticks)
		cpu_relax();
	fs_check_status(fs);
}

/*
 * Sends one request and waits for its reply (fs->timeout). Returns the
 * reply's error (0 or a negative errno), -ETIMEDOUT if no reply came, or
 * -EPROTO for a malformed one. A request that timed out keeps its
 * descriptors and buffers: until it completes, later calls fail with
 * -ETIMEDOUT without sending anything.
 */
static int fuse_call(struct fs *fs, struct fuse_msg *m)
{
	uint32_t tail_len = m->name ? (uint32_t)m->name_len + 1 : m->data_len;
	struct vq_buf bufs[4];
	uint32_t used_len;
	unsigned n = 0;
	int head;

	m->got = 0;
	if (fs->pending >= 0) {
		if (virtq_get(&fs->req, &used_len) != fs->pending)
			return -FUSE_ETIMEDOUT;
		fs->pending = -1;
	}
	if (m->args_len > sizeof(req_buf.args) || tail_len > sizeof(req_tail))
		return -FUSE_EINVAL;

	memset(&req_buf.h, 0, sizeof(req_buf.h));
	req_buf.h.len = (uint32_t)sizeof(req_buf.h) + m->args_len + tail_len;
	req_buf.h.opcode = m->opcode;
	req_buf.h.unique = ++fs->unique;
	req_buf.h.nodeid = m->nodeid;
	memcpy(req_buf.args, m->args, m->args_len);
	if (m->name) {
		memcpy(req_tail, m->name, m->name_len);
		req_tail[m->name_len] = '\0';
	} else {
		memcpy(req_tail, m->data, m->data_len);
	}
	memset(&reply_hdr, 0, sizeof(reply_hdr));

	bufs[n++] = (struct vq_buf){ &req_buf, (uint32_t)sizeof(req_buf.h) + m->args_len, false };
	if (tail_len)
		bufs[n++] = (struct vq_buf){ req_tail, tail_len, false };
	bufs[n++] = (struct vq_buf){ &reply_hdr, sizeof(reply_hdr), true };
	if (m->body_len)
		bufs[n++] = (struct vq_buf){ m->body, m->body_len, true };
	head = virtq_add(&fs->req, bufs, n);
	if (head < 0)
		return -FUSE_EIO;	/* cannot happen: one request at a time */
	virtq_notify(&fs->req);
	if (!fs_wait(fs, head, fs->timeout, &used_len)) {
		fs->pending = head;
		return -FUSE_ETIMEDOUT;
	}

	if (reply_hdr.unique != req_buf.h.unique || reply_hdr.len < sizeof(reply_hdr) ||
	    reply_hdr.error > 0)
		return -FUSE_EPROTO;
	if (reply_hdr.error)
		return reply_hdr.error;
	m->got = reply_hdr.len - (uint32_t)sizeof(reply_hdr);
	if (m->got > m->body_len)
		m->got = m->body_len;
	return 0;
}

/* FUSE_INIT; prints "fs: init ok ..." if `show`. */
static int fs_init(struct fs *fs, bool show)
{
	struct fuse_init_args a = { FUSE_MAJOR, FUSE_MINOR, FS_READAHEAD, 0 };
	struct fuse_msg m = { .opcode = FUSE_OP_INIT, .args = &a, .args_len = sizeof(a),
			      .body = &reply.init, .body_len = sizeof(reply.init) };
	int err = fuse_call(fs, &m);

	if (!err && m.got < 8)
		err = -FUSE_EPROTO;
	if (err || !show)
		return err;
	print("fs: init ok major=");
	print_dec(reply.init.major);
	print(" minor=");
	print_dec(reply.init.minor);
	print("\n");
	return 0;
}

/* LOOKUP or MKDIR (mkdir_mode != 0) of `name` in `parent`: sets *nodeid. */
static int fs_entry(struct fs *fs, uint64_t parent, const char *name, size_t len,
		    uint32_t mkdir_mode, uint64_t *nodeid)
{
	struct fuse_mkdir_args a = { mkdir_mode, 0 };
	struct fuse_msg m = { .opcode = mkdir_mode ? FUSE_OP_MKDIR : FUSE_OP_LOOKUP,
			      .nodeid = parent, .name = name, .name_len = len,
			      .body = &reply.entry, .body_len = sizeof(reply.entry) };
	int err;

	if (len == 0)
		return -FUSE_EINVAL;
	if (len > FUSE_NAME_MAX)
		return -FUSE_ENAMETOOLONG;
	if (mkdir_mode) {
		m.args = &a;
		m.args_len = sizeof(a);
	}
	err = fuse_call(fs, &m);
	if (err)
		return err;
	if (m.got < sizeof(reply.entry.nodeid))
		return -FUSE_EPROTO;
	if (reply.entry.nodeid == 0)	/* a negative entry */
		return -FUSE_ENOENT;
	*nodeid = reply.entry.nodeid;
	return 0;
}

/*
 * Walks the directories of `path` (the components before the last '/')
 * from the root, creating missing ones (mode 0755) if `mkdirs`. Sets *dir
 * and the last component (*name, *name_len). On failure returns the error
 * and sets *op to the operation that failed.
 */
static int fs_walk(struct fs *fs, const char *path, size_t len, bool mkdirs,
		   uint64_t *dir, const char **name, size_t *name_len, const char **op)
{
	uint64_t node = FUSE_ROOT_NODE, next;
	size_t i = 0, start, end;
	int err;

	for (;;) {
		while (i < len && path[i] == '/')
			i++;
		start = i;
		while (i < len && path[i] != '/')
			i++;
		end = i;
		while (i < len && path[i] == '/')
			i++;
		if (i == len)
			break;		/* path[start..end) is the last component */
		*op = "lookup";
		err = fs_entry(fs, node, path + start, end - start, 0, &next);
		if (err == -FUSE_ENOENT && mkdirs) {
			*op = "mkdir";
			err = fs_entry(fs, node, path + start, end - start, 0755, &next);
			if (err == -FUSE_EEXIST) {	/* created meanwhile */
				*op = "lookup";
				err = fs_entry(fs, node, path + start, end - start, 0, &next);
			}
		}
		if (err)
			return err;
		node = next;
	}
	*op = "lookup";
	if (start == end)
		return -FUSE_EINVAL;
	*dir = node;
	*name = path + start;
	*name_len = end - start;
	return 0;
}

/* LOOKUP of every component of `path`: sets *nodeid, or *op on failure. */
static int fs_resolve(struct fs *fs, const char *path, size_t len, uint64_t *nodeid, const char **op)
{
	const char *name;
	size_t name_len;
	uint64_t dir;
	int err = fs_walk(fs, path, len, false, &dir, &name, &name_len, op);

	return err ? err : fs_entry(fs, dir, name, name_len, 0, nodeid);
}

static int fs_release(struct fs *fs, uint64_t nodeid, uint64_t fh, uint32_t flags)
{
	struct fuse_release_args a = { .fh = fh, .flags = flags };
	struct fuse_msg m = { .opcode = FUSE_OP_RELEASE, .nodeid = nodeid,
			      .args = &a, .args_len = sizeof(a) };

	return fuse_call(fs, &m);
}

/*
 * LOOKUP, OPEN (read-only), READ of up to FS_READ_MAX bytes at offset 0
 * into file_buf, RELEASE. Returns the number of bytes read, or a negative
 * errno after an error line.
 */
static int fs_read_file(struct fs *fs, const char *path, size_t len)
{
	struct fuse_open_args oa = { FUSE_O_RDONLY, 0 };
	struct fuse_msg m = { .opcode = FUSE_OP_OPEN, .args = &oa, .args_len = sizeof(oa),
			      .body = &reply.open, .body_len = sizeof(reply.open) };
	struct fuse_io_args ra = { .size = FS_READ_MAX, .flags = FUSE_O_RDONLY };
	const char *op;
	uint64_t node;
	int err, n;

	err = fs_resolve(fs, path, len, &node, &op);
	if (err) {
		fs_error(op, err);
		return err;
	}
	m.nodeid = node;
	err = fuse_call(fs, &m);
	if (!err && m.got < sizeof(reply.open.fh))
		err = -FUSE_EPROTO;
	if (err) {
		fs_error("open", err);
		return err;
	}
	ra.fh = reply.open.fh;

	m = (struct fuse_msg){ .opcode = FUSE_OP_READ, .nodeid = node, .args = &ra,
			       .args_len = sizeof(ra), .body = file_buf, .body_len = FS_READ_MAX };
	n = fuse_call(fs, &m);
	if (n)
		fs_error("read", n);
	else
		n = (int)m.got;
	err = fs_release(fs, node, ra.fh, FUSE_O_RDONLY);
	if (err)
		fs_error("release", err);
	return n;
}

/* CREATE (with missing directories), WRITE, FSYNC, RELEASE of `path`. */
static void fs_write_file(struct fs *fs, const char *path, size_t len,
			  const char *token, size_t token_len)
{
	static char data[sizeof("mvmm-fs \n") + FS_TOKEN_MAX];
	const uint32_t flags = FUSE_O_WRONLY | FUSE_O_CREAT | FUSE_O_TRUNC;
	struct fuse_create_args ca = { flags, FUSE_S_IFREG | 0644, 0, 0 };
	struct fuse_io_args wa = { .flags = flags };
	struct fuse_fsync_args sa = { 0 };
	struct fuse_msg m;
	const char *name, *op;
	size_t name_len;
	uint64_t dir, node;
	int err;

	err = fs_walk(fs, path, len, true, &dir, &name, &name_len, &op);
	if (!err && name_len > FUSE_NAME_MAX)
		err = -FUSE_ENAMETOOLONG;
	if (err) {
		fs_error(op, err);
		return;
	}
	m = (struct fuse_msg){ .opcode = FUSE_OP_CREATE, .nodeid = dir, .args = &ca,
			       .args_len = sizeof(ca), .name = name, .name_len = name_len,
			       .body = &reply.create, .body_len = sizeof(reply.create) };
	err = fuse_call(fs, &m);
	if (!err && (m.got < sizeof(reply.create) || reply.create.entry.nodeid == 0))
		err = -FUSE_EPROTO;
	if (err) {
		fs_error("create", err);
		return;
	}
	node = reply.create.entry.nodeid;
	wa.fh = sa.fh = reply.create.open.fh;

	if (token_len > FS_TOKEN_MAX)
		token_len = FS_TOKEN_MAX;
	memcpy(data, "mvmm-fs ", 8);
	memcpy(data + 8, token, token_len);
	data[8 + token_len] = '\n';
	wa.size = (uint32_t)(8 + token_len + 1);
	m = (struct fuse_msg){ .opcode = FUSE_OP_WRITE, .nodeid = node, .args = &wa,
			       .args_len = sizeof(wa), .data = data, .data_len = wa.size,
			       .body = &reply.write, .body_len = sizeof(reply.write) };
	err = fuse_call(fs, &m);
	if (!err && m.got < sizeof(reply.write.size))
		err = -FUSE_EPROTO;
	if (err) {
		fs_error("write", err);
	} else {
		print("fs: wrote ");
		print_dec(reply.write.size);
		print(" bytes\n");
	}

	m = (struct fuse_msg){ .opcode = FUSE_OP_FSYNC, .nodeid = node, .args = &sa,
			       .args_len = sizeof(sa) };
	err = fuse_call(fs, &m);
	if (err)
		fs_error("fsync", err);
	else
		print("fs: fsync ok\n");

	err = fs_release(fs, node, wa.fh, flags);
	if (err)
		fs_error("release", err);
}

/*
 * test=fs-wait: LOOKUP `marker` every FS_RETRY_TSC until it exists, for up
 * to FS_WAIT_TSC in all; each reply is waited for until that deadline. Then
 * reads `path` again with fresh LOOKUPs. A restarted virtiofsd knows no node
 * IDs, not even the root's, until it gets FUSE_INIT (before that, LOOKUP
 * fails with EBADF): any error other than ENOENT is followed by an INIT.
 */
static void fs_wait_marker(struct fs *fs, const char *marker, size_t marker_len,
			   const char *path, size_t path_len)
{
	uint64_t start = rdtsc(), elapsed, node;
	int err, last_err = 0, n;
	const char *op;
	bool changed;

	while ((elapsed = rdtsc() - start) < FS_WAIT_TSC) {
		fs->timeout = FS_WAIT_TSC - elapsed;
		err = fs_resolve(fs, marker, marker_len, &node, &op);
		if (!err) {
			print("fs: marker found\n");
			fs->timeout = FS_WAIT_TSC;
			n = fs_read_file(fs, path, path_len);
			if (n >= 0) {
				print("fs: reread ok ");
				print_dec((uint64_t)n);
				print(" bytes\n");
			}
			return;
		}
		if (err == -FUSE_ETIMEDOUT)
			break;		/* no reply before the deadline */
		changed = err != last_err;
		last_err = err;
		if (err != -FUSE_ENOENT) {
			if (changed)
				fs_error(op, err);
			err = fs_init(fs, changed);
			if (err == -FUSE_ETIMEDOUT)
				break;
			if (err && changed)
				fs_error("init", err);
		}
		fs_sleep(fs, FS_RETRY_TSC);
	}
	print("fs: marker timeout\n");
}

/* Reads the NUL-padded tag from config space into tag[VIRTIO_FS_TAG_LEN]; returns its length. */
static size_t fs_read_tag(struct virtio_mmio_dev *dev, char *tag)
{
	size_t len = 0;

	while (len < VIRTIO_FS_TAG_LEN &&
	       (tag[len] = (char)virtio_mmio_config8(dev, VIRTIO_FS_CFG_TAG + len)) != '\0')
		len++;
	return len;
}

/* Finds the device (fs.tag, or the first), initialises it and its queues 0 and 1. */
static bool fs_open(struct fs *fs, const char *cmdline)
{
	char tag[VIRTIO_FS_TAG_LEN];
	size_t want_len = 0, len = 0;
	const char *want = cmdline_value(cmdline, "fs.tag=", &want_len);
	struct virtio_mmio_dev *dev;

	for (unsigned i = 0; (dev = virtio_mmio_get(cmdline, VIRTIO_ID_FS, i)); i++) {
		len = fs_read_tag(dev, tag);
		if (!want || (len == want_len && memcmp(tag, want, len) == 0))
			break;
	}
	if (!dev) {
		fs_error("device", -FUSE_ENODEV);
		return false;
	}
	print("fs: tag=");
	for (size_t i = 0; i < len; i++)
		print_n(tag[i] >= 0x20 && tag[i] < 0x7f ? &tag[i] : "?", 1);
	print("\n");

	memset(fs, 0, sizeof(*fs));
	fs->dev = dev;
	fs->pending = -1;
	dev->name = "fs";
	if (!virtio_mmio_init(dev, 0))
		return false;
	if (virtio_mmio_config32(dev, VIRTIO_FS_CFG_NUM_QUEUES) == 0) {
		print("fs: error: num_request_queues is 0\n");
		virtio_mmio_fail(dev);
		return false;
	}
	if (!virtq_setup(&fs->hiprio, dev, FS_HIPRIO_QUEUE) ||
	    !virtq_setup(&fs->req, dev, FS_REQUEST_QUEUE)) {
		virtio_mmio_fail(dev);
		return false;
	}
	if (!virtio_mmio_driver_ok(dev))
		return false;
	fs->status = virtio_mmio_read(dev, VIRTIO_MMIO_STATUS);
	return true;
}

/* The value of `prefix` on the command line, or `def`. */
static const char *param(const char *cmdline, const char *prefix, const char *def, size_t *len)
{
	const char *v = cmdline_value(cmdline, prefix, len);

	if (v)
		return v;
	*len = strlen(def);
	return def;
}

static void fs_run(const struct bootinfo *bi, bool wait)
{
	struct fs *fs = &fs_state;
	size_t read_len, write_len, token_len, marker_len;
	const char *read_path = param(bi->cmdline, "fs.read=", "hello.txt", &read_len);
	const char *write_path = param(bi->cmdline, "fs.write=", "from-guest.txt", &write_len);
	const char *token = param(bi->cmdline, "fs.token=", "none", &token_len);
	const char *marker = param(bi->cmdline, "fs.marker=", "marker", &marker_len);
	int n, err;

	if (fs_open(fs, bi->cmdline)) {
		fs->timeout = wait ? FS_WAIT_TSC : FS_TIMEOUT_TSC;
		err = fs_init(fs, true);
		if (err)
			fs_error("init", err);
		n = fs_read_file(fs, read_path, read_len);
		if (n >= 0) {
			print("fs: read ");
			print_dec((uint64_t)n);
			print(" bytes\nfs: content-hex=");
			for (int i = 0; i < n; i++)
				print_hex(file_buf[i], 2);
			print("\n");
		}
		fs_write_file(fs, write_path, write_len, token, token_len);
		if (wait)
			fs_wait_marker(fs, marker, marker_len, read_path, read_len);
	}
	print("fs: done\n");
}

void test_fs(const struct bootinfo *bi)
{
	fs_run(bi, false);
}

void test_fs_wait(const struct bootinfo *bi)
{
	fs_run(bi, true);
}
