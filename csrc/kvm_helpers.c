/*
 * kvm_helpers.c - the small C pieces the Python layer cannot do well itself.
 *
 * fcntl.ioctl only takes a C int argument (KVM_SET_TSS_ADDR with 0xfffbd000
 * overflows it) and variadic calls through cffi need explicit casts, so every
 * ioctl goes through two fixed-signature wrappers here.
 */
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/ioctl.h>

#include "kvmpy_native.h"

int kvmpy_ioctl_ptr(int fd, unsigned long request, void *arg)
{
	int r = ioctl(fd, request, arg);

	return r < 0 ? -errno : r;
}

int kvmpy_ioctl_int(int fd, unsigned long request, unsigned long arg)
{
	int r = ioctl(fd, request, arg);

	return r < 0 ? -errno : r;
}

static void kvmpy_kick_handler(int signo)
{
	(void)signo;	/* its only job is to interrupt KVM_RUN with EINTR */
}

int kvmpy_kick_signal(void)
{
	static int installed;
	int signo = SIGRTMIN;

	if (!installed) {
		struct sigaction sa;

		memset(&sa, 0, sizeof(sa));
		sa.sa_handler = kvmpy_kick_handler;
		sigemptyset(&sa.sa_mask);
		sa.sa_flags = 0;	/* no SA_RESTART: KVM_RUN must see EINTR */
		if (sigaction(signo, &sa, NULL) < 0)
			return -errno;
		installed = 1;
	}
	return signo;
}
