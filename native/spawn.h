/* Native helper for AVE: starting a command on a terminal of its own (ave.cmd). */
#ifndef AVE_SPAWN_H
#define AVE_SPAWN_H

#include <sys/types.h>

/* The step at which a child failed to become the command (0: it did not fail). */
enum {
    AVE_SPAWN_OK = 0,
    AVE_SPAWN_SESSION = 1,   /* setsid(2) */
    AVE_SPAWN_TERMINAL = 2,  /* TIOCSCTTY or putting the terminal on 0, 1 and 2 */
    AVE_SPAWN_DIRECTORY = 3, /* chdir(2) to the requested directory */
    AVE_SPAWN_EXEC = 4       /* execvp(3) */
};

/* What the parent learns about a child that did not reach exec. */
struct ave_spawn_failure {
    int step;  /* one of AVE_SPAWN_* */
    int error; /* errno at that step */
};

/* Start `argv` (NULL-terminated; argv[0] is looked up in PATH as execvp does) in a
 * new session led by the child, with the terminal `tty` (an open descriptor of a
 * pty slave, say) as its controlling terminal and as descriptors 0, 1 and 2; every
 * other descriptor closed, every signal at its default action and none blocked; in
 * directory `cwd` unless it is NULL or empty. The child runs in the caller's memory
 * (vfork) until it execs, so the call costs no copy of the caller's address space
 * and no caller code ever runs in the child.
 *
 * Returns the child's pid once it has exec'd. Returns -1 with errno set when no
 * child could be made (failure->step stays AVE_SPAWN_OK), or when the child failed
 * before exec: then it has been reaped and *failure tells the step and the error. */
pid_t ave_spawn(char *const argv[], int tty, const char *cwd,
                struct ave_spawn_failure *failure);

#endif
