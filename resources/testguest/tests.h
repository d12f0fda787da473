/* tests.h - tests in their own files, run from main.c's tests[] table. */
#ifndef TESTGUEST_TESTS_H
#define TESTGUEST_TESTS_H

#include "bootinfo.h"

void test_blk(const struct bootinfo *bi);	/* blk.c, "test=blk" */
void test_net(const struct bootinfo *bi);	/* net.c, "test=net" */
void test_fs(const struct bootinfo *bi);	/* fs.c, "test=fs" */
void test_fs_wait(const struct bootinfo *bi);	/* fs.c, "test=fs-wait" */
void test_smbios(const struct bootinfo *bi);	/* smbios.c, "test=smbios" */
void test_shutdown_wait(const struct bootinfo *bi);	/* shutdown.c, "test=shutdown-wait" */

#endif
