/*
 * fuse.h - the few FUSE protocol messages the virtio-fs test uses, written
 * from the protocol description (kernel ABI 7.x; all fields little-endian,
 * naturally aligned, no implicit padding). A request is an in-header, the
 * opcode's argument struct, then a name or data; a reply is an out-header
 * and, on success, the opcode's reply struct or data.
 */
#ifndef TESTGUEST_FUSE_H
#define TESTGUEST_FUSE_H

#include <stdint.h>

#define FUSE_MAJOR		7
#define FUSE_MINOR		31	/* what we announce; virtiofsd needs >= 27 */
#define FUSE_ROOT_NODE		1

/* Opcodes. */
#define FUSE_OP_LOOKUP		1
#define FUSE_OP_MKDIR		9
#define FUSE_OP_OPEN		14
#define FUSE_OP_READ		15
#define FUSE_OP_WRITE		16
#define FUSE_OP_RELEASE		18
#define FUSE_OP_FSYNC		20
#define FUSE_OP_INIT		26
#define FUSE_OP_CREATE		35

/* Linux open(2) flags and mode bits, as FUSE carries them. */
#define FUSE_O_RDONLY		0
#define FUSE_O_WRONLY		01
#define FUSE_O_CREAT		0100
#define FUSE_O_TRUNC		01000
#define FUSE_S_IFREG		0100000

/* Linux errno values (replies carry them negated). */
#define FUSE_ENOENT		2
#define FUSE_EIO		5
#define FUSE_ENODEV		19
#define FUSE_EEXIST		17
#define FUSE_EINVAL		22
#define FUSE_ENAMETOOLONG	36
#define FUSE_EPROTO		71
#define FUSE_ETIMEDOUT		110

#define FUSE_NAME_MAX		255

/* Every request starts with this (40 bytes). len covers the whole request. */
struct fuse_req_header {
	uint32_t len;
	uint32_t opcode;
	uint64_t unique;		/* echoed in the reply */
	uint64_t nodeid;		/* the inode the request is about */
	uint32_t uid, gid, pid;
	uint16_t ext_len;		/* request extensions, in 8-byte units: none */
	uint16_t pad;
};

/* Every reply starts with this (16 bytes). len covers the whole reply. */
struct fuse_reply_header {
	uint32_t len;
	int32_t error;			/* 0 or a negative errno */
	uint64_t unique;
};

/* FUSE_INIT */
struct fuse_init_args {
	uint32_t major, minor;
	uint32_t max_readahead;
	uint32_t flags;
};

struct fuse_init_reply {
	uint32_t major, minor;
	uint32_t max_readahead;
	uint32_t flags;
	uint16_t max_background;
	uint16_t congestion_threshold;
	uint32_t max_write;
	uint32_t time_gran;
	uint16_t max_pages;
	uint16_t map_alignment;
	uint32_t flags2;
	uint32_t reserved[7];
};

/* Inode attributes, part of an entry reply. */
struct fuse_attrs {
	uint64_t ino, size, blocks;
	uint64_t atime, mtime, ctime;
	uint32_t atime_ns, mtime_ns, ctime_ns;
	uint32_t mode, nlink, uid, gid, rdev;
	uint32_t blksize;
	uint32_t flags;
};

/* Reply to LOOKUP, MKDIR (and the first part of CREATE's). */
struct fuse_entry_reply {
	uint64_t nodeid;		/* 0: negative entry, i.e. ENOENT */
	uint64_t generation;
	uint64_t entry_valid, attr_valid;	/* cache timeouts, s */
	uint32_t entry_valid_ns, attr_valid_ns;
	struct fuse_attrs attr;
};

/* FUSE_MKDIR; the name follows, NUL-terminated. */
struct fuse_mkdir_args {
	uint32_t mode;
	uint32_t umask;
};

/* FUSE_OPEN */
struct fuse_open_args {
	uint32_t flags;			/* open(2) flags */
	uint32_t open_flags;		/* FUSE-specific: none */
};

/* Reply to OPEN (and the second part of CREATE's). */
struct fuse_open_reply {
	uint64_t fh;			/* file handle for READ/WRITE/FSYNC/RELEASE */
	uint32_t open_flags;
	uint32_t pad;
};

/* FUSE_CREATE; the name follows, NUL-terminated. */
struct fuse_create_args {
	uint32_t flags;			/* open(2) flags */
	uint32_t mode;
	uint32_t umask;
	uint32_t open_flags;
};

struct fuse_create_reply {
	struct fuse_entry_reply entry;
	struct fuse_open_reply open;
};

/* FUSE_READ and FUSE_WRITE (the data follows a WRITE's arguments). */
struct fuse_io_args {
	uint64_t fh;
	uint64_t offset;
	uint32_t size;
	uint32_t io_flags;		/* READ/WRITE-specific flags: none */
	uint64_t lock_owner;
	uint32_t flags;			/* open(2) flags of the handle */
	uint32_t pad;
};

struct fuse_write_reply {
	uint32_t size;			/* bytes written */
	uint32_t pad;
};

/* FUSE_RELEASE */
struct fuse_release_args {
	uint64_t fh;
	uint32_t flags;			/* open(2) flags of the handle */
	uint32_t release_flags;
	uint64_t lock_owner;
};

/* FUSE_FSYNC */
struct fuse_fsync_args {
	uint64_t fh;
	uint32_t fsync_flags;		/* 0: data and metadata */
	uint32_t pad;
};

_Static_assert(sizeof(struct fuse_req_header) == 40, "fuse_req_header");
_Static_assert(sizeof(struct fuse_reply_header) == 16, "fuse_reply_header");
_Static_assert(sizeof(struct fuse_init_args) == 16, "fuse_init_args");
_Static_assert(sizeof(struct fuse_init_reply) == 64, "fuse_init_reply");
_Static_assert(sizeof(struct fuse_attrs) == 88, "fuse_attrs");
_Static_assert(sizeof(struct fuse_entry_reply) == 128, "fuse_entry_reply");
_Static_assert(sizeof(struct fuse_open_reply) == 16, "fuse_open_reply");
_Static_assert(sizeof(struct fuse_create_args) == 16, "fuse_create_args");
_Static_assert(sizeof(struct fuse_io_args) == 40, "fuse_io_args");
_Static_assert(sizeof(struct fuse_release_args) == 24, "fuse_release_args");
_Static_assert(sizeof(struct fuse_fsync_args) == 16, "fuse_fsync_args");

#endif
