/* Native helpers for AVE: process controls (prctl) and descriptor transfer. */
#ifndef AVE_FDTX_H
#define AVE_FDTX_H

#include <stddef.h>
#include <sys/types.h>

/* Set the calling thread's name (what ps and psutil show), at most 15 bytes kept.
 * Returns 0, or -1 with errno set. */
int ave_set_proc_name(const char *name);

/* Ask the kernel to send `signum` to the caller when its parent dies (0 clears).
 * Returns 0, or -1 with errno set. */
int ave_set_death_signal(int signum);

/* Most descriptors one message may carry: the kernel's SCM_MAX_FD. Larger requests
 * are refused with EINVAL before any system call, so no buffer is sized from them. */
enum { AVE_FDTX_MAX_FDS = 253 };

/* Send `len` bytes from `buf` and the `nfds` descriptors in `fds` as one message on
 * the connected AF_UNIX socket `sock` (SCM_RIGHTS). Meant for SOCK_SEQPACKET, where a
 * message goes whole or not at all; a short send is reported as EMSGSIZE. Never
 * raises SIGPIPE (a gone peer is EPIPE). Returns 0, or -1 with errno set:
 * EINVAL for nfds > AVE_FDTX_MAX_FDS or a NULL buffer with a non-zero size. */
int ave_fdtx_send(int sock, const char *buf, size_t len, const int *fds, size_t nfds);

/* Receive one message from `sock` into `buf` (room for `buf_len` bytes) and up to
 * `max_fds` descriptors into `fds` (room for `max_fds` ints); `*nfds` gets how many
 * arrived. Nothing is ever written past those sizes. Received descriptors are
 * close-on-exec. Returns the message length (0 for an empty message or a closed
 * peer), or -1 with errno set and *nfds = 0; on every failure the descriptors that
 * did arrive are closed, so the caller never owns half a message:
 *   EINVAL    max_fds > AVE_FDTX_MAX_FDS, buf_len above SSIZE_MAX, or NULL buffers
 *   EMSGSIZE  the message was longer than buf_len (the rest is discarded)
 *   ENOBUFS   more descriptors came than max_fds, or the process ran out of them
 *   ENOMEM    no memory for the control buffer
 * and whatever recvmsg(2) reports. */
ssize_t ave_fdtx_recv(int sock, char *buf, size_t buf_len,
                      int *fds, size_t max_fds, size_t *nfds);

#endif
