/* Native helpers for AVE. Every function returns -1 with errno set on failure so the
 * Python side can raise OSError with the real cause.
 *
 * Descriptor transfer: a message travels as one sendmsg(2) with the descriptors in a
 * single SCM_RIGHTS control message. The receiver states how much room it has for
 * bytes and for descriptors, and every buffer written here is sized from those
 * numbers (checked against AVE_FDTX_MAX_FDS first), so no caller value can make this
 * code write out of bounds. A receive that fails for any reason closes whatever
 * descriptors the kernel already installed: otherwise they would leak, since the
 * caller is never told their numbers. */
#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include "fdtx.h"

int ave_set_proc_name(const char *name)
{
    char buf[16];

    if (name == NULL) {
        errno = EINVAL;
        return -1;
    }
    /* The kernel keeps 15 bytes plus NUL; truncate here rather than rely on it. */
    strncpy(buf, name, sizeof(buf) - 1);
    buf[sizeof(buf) - 1] = '\0';
    return prctl(PR_SET_NAME, (unsigned long)buf, 0, 0, 0) == 0 ? 0 : -1;
}

int ave_set_death_signal(int signum)
{
    if (signum < 0 || signum > 64) {
        errno = EINVAL;
        return -1;
    }
    return prctl(PR_SET_PDEATHSIG, (unsigned long)signum, 0, 0, 0) == 0 ? 0 : -1;
}

/* free() that leaves errno alone, so the cause of a failure survives the clean-up. */
static void free_keep_errno(void *ptr)
{
    int saved = errno;

    free(ptr);
    errno = saved;
}

/* Close descriptors a failed receive installed, keeping errno for the caller. */
static void close_all(const int *fds, size_t count)
{
    int saved = errno;
    size_t i;

    for (i = 0; i < count; i++)
        close(fds[i]);
    errno = saved;
}

int ave_fdtx_send(int sock, const char *buf, size_t len, const int *fds, size_t nfds)
{
    struct iovec iov;
    struct msghdr msg;
    struct cmsghdr *cmsg;
    void *control = NULL;
    ssize_t sent;

    if (nfds > AVE_FDTX_MAX_FDS || len > SSIZE_MAX
        || (buf == NULL && len > 0) || (fds == NULL && nfds > 0)) {
        errno = EINVAL;
        return -1;
    }
    memset(&msg, 0, sizeof(msg));
    iov.iov_base = (void *)buf; /* sendmsg only reads through it */
    iov.iov_len = len;
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (nfds > 0) {
        /* Zeroed, so the padding CMSG_SPACE adds never carries stale memory. */
        control = calloc(1, CMSG_SPACE(nfds * sizeof(int)));
        if (control == NULL)
            return -1;
        msg.msg_control = control;
        msg.msg_controllen = CMSG_SPACE(nfds * sizeof(int));
        /* The buffer holds at least one header and calloc aligns it for any type,
         * so the first header starts at its beginning. */
        cmsg = (struct cmsghdr *)control;
        cmsg->cmsg_level = SOL_SOCKET;
        cmsg->cmsg_type = SCM_RIGHTS;
        cmsg->cmsg_len = CMSG_LEN(nfds * sizeof(int));
        memcpy(CMSG_DATA(cmsg), fds, nfds * sizeof(int));
    }
    sent = sendmsg(sock, &msg, MSG_NOSIGNAL);
    free_keep_errno(control);
    if (sent < 0)
        return -1;
    if ((size_t)sent != len) {
        /* Only a byte stream sends part of a message; the receiver could not tell. */
        errno = EMSGSIZE;
        return -1;
    }
    return 0;
}

/* How many whole ints of a control message's payload lie inside the control buffer.
 * The kernel keeps cmsg_len honest, but trusting it blindly is how overreads start. */
static size_t rights_in(const struct msghdr *msg, const struct cmsghdr *cmsg)
{
    const char *data = (const char *)CMSG_DATA(cmsg);
    const char *end = (const char *)msg->msg_control + msg->msg_controllen;
    size_t claimed, room;

    if (cmsg->cmsg_len < CMSG_LEN(0) || data > end)
        return 0;
    claimed = (cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    room = (size_t)(end - data) / sizeof(int);
    return claimed < room ? claimed : room;
}

/* Copy the descriptors of every SCM_RIGHTS control message into fds, which has room
 * for max_fds; any beyond that are closed at once and *overflow is set. Returns how
 * many were copied. */
static size_t collect_fds(struct msghdr *msg, int *fds, size_t max_fds, int *overflow)
{
    struct cmsghdr *cmsg;
    size_t count = 0;
    size_t i, n;
    int fd;

    for (cmsg = CMSG_FIRSTHDR(msg); cmsg != NULL; cmsg = CMSG_NXTHDR(msg, cmsg)) {
        if (cmsg->cmsg_level != SOL_SOCKET || cmsg->cmsg_type != SCM_RIGHTS)
            continue;
        n = rights_in(msg, cmsg);
        for (i = 0; i < n; i++) {
            /* memcpy: CMSG_DATA is not guaranteed to be aligned for int. */
            memcpy(&fd, CMSG_DATA(cmsg) + i * sizeof(int), sizeof(int));
            if (count < max_fds) {
                fds[count++] = fd;
            } else {
                close(fd);
                *overflow = 1;
            }
        }
    }
    return count;
}

ssize_t ave_fdtx_recv(int sock, char *buf, size_t buf_len,
                      int *fds, size_t max_fds, size_t *nfds)
{
    struct iovec iov;
    struct msghdr msg;
    void *control;
    size_t control_size, count;
    ssize_t got;
    int overflow = 0;

    if (nfds == NULL || max_fds > AVE_FDTX_MAX_FDS || buf_len > SSIZE_MAX
        || (buf == NULL && buf_len > 0) || (fds == NULL && max_fds > 0)) {
        errno = EINVAL;
        return -1;
    }
    *nfds = 0;
    control_size = CMSG_SPACE(max_fds * sizeof(int));
    control = calloc(1, control_size);
    if (control == NULL)
        return -1;
    memset(&msg, 0, sizeof(msg));
    iov.iov_base = buf;
    iov.iov_len = buf_len;
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = control_size;
    /* CLOEXEC at receipt: no window in which a fork+exec elsewhere inherits them. */
    got = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    if (got < 0) {
        free_keep_errno(control);
        return -1;
    }
    count = collect_fds(&msg, fds, max_fds, &overflow);
    free(control);
    if (msg.msg_flags & MSG_TRUNC) {
        close_all(fds, count);
        errno = EMSGSIZE;
        return -1;
    }
    if (overflow || (msg.msg_flags & MSG_CTRUNC)) {
        /* The kernel already dropped the descriptors that did not fit. */
        close_all(fds, count);
        errno = ENOBUFS;
        return -1;
    }
    *nfds = count;
    return got;
}
