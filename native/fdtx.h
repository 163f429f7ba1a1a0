/* Native helpers for AVE: process controls (prctl) and descriptor transfer. */
#ifndef AVE_FDTX_H
#define AVE_FDTX_H

/* Set the calling thread's name (what ps and psutil show), at most 15 bytes kept.
 * Returns 0, or -1 with errno set. */
int ave_set_proc_name(const char *name);

/* Ask the kernel to send `signum` to the caller when its parent dies (0 clears).
 * Returns 0, or -1 with errno set. */
int ave_set_death_signal(int signum);

#endif
