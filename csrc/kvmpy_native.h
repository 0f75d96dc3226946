/*
 * kvmpy_native.h - the whole C surface of kvmpy._native, declared once.
 *
 * csrc/build.py feeds the block between the CDEF markers to cffi, so Python sees
 * exactly these declarations. Functions return 0 or a non-negative result on
 * success and -errno on failure (kvmtool style): errno never crosses the boundary.
 */
#ifndef KVMPY_NATIVE_H
#define KVMPY_NATIVE_H

/* CDEF-BEGIN */
/* ioctl(2) with a pointer or an integer argument; returns the result or -errno. */
int kvmpy_ioctl_ptr(int fd, unsigned long request, void *arg);
int kvmpy_ioctl_int(int fd, unsigned long request, unsigned long arg);

/* Install (once per process) an empty handler for the vCPU kick signal, without
 * SA_RESTART, so a kick makes a blocked KVM_RUN return -EINTR. Returns the signal
 * number to send with pthread_kill. */
int kvmpy_kick_signal(void);
/* CDEF-END */

#endif
