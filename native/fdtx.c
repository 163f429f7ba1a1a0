/* Native helpers for AVE. Every function returns -1 with errno set on failure so the
 * Python side can raise OSError with the real cause. */
#include <errno.h>
#include <string.h>
#include <sys/prctl.h>

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
