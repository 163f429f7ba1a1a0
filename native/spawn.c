/* Starting a command on a terminal of its own, for ave.cmd.
 *
 * Why vfork: fork(2) copies the caller's page tables (milliseconds for a big Python
 * process) and leaves a copy of the caller, with every lock another thread held at
 * that instant, running until exec. vfork(2) lends the child the caller's memory and
 * suspends the calling thread until the child has exec'd or exited, so it costs
 * neither and the outcome is known when vfork returns: the child writes its failure
 * into the caller's memory (the `failure` struct) before exiting, no pipe needed.
 *
 * The price is that the child must touch nothing it shares except that struct: it
 * only makes system calls (and execvp, which searches PATH on the stack) and ends in
 * execvp or _exit. Signals are blocked from before vfork until the child has put
 * every handler back to default, so no handler of the caller ever runs in the child
 * on the caller's memory. Other threads of the caller keep running throughout; they
 * never see the child, which works only on its own stack frames and its own copy of
 * the descriptor table. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "spawn.h"

/* Exit status of a child that failed before exec, as shells use for "cannot run". */
enum { EXEC_FAILED = 127 };

/* Put every signal back to its default action. glibc refuses to touch the two
 * real-time signals it reserves for itself (32 and 33), yet a caller can have
 * inherited them ignored (glibc's posix_spawn leaves them so), and exec would pass
 * that on; those go to the kernel directly. An all-zero kernel sigaction means
 * SIG_DFL, no flags and an empty mask in every Linux ABI; where the system call
 * takes other arguments it fails harmlessly. */
static void default_signal_actions(void)
{
    struct sigaction dfl;
    unsigned long kernel_dfl[8];
    int sig;

    memset(&dfl, 0, sizeof(dfl));
    dfl.sa_handler = SIG_DFL;
    memset(kernel_dfl, 0, sizeof(kernel_dfl));
    for (sig = 1; sig < _NSIG; sig++) {
        if (sig == SIGKILL || sig == SIGSTOP)
            continue;
        if (sigaction(sig, &dfl, NULL) < 0)
            syscall(SYS_rt_sigaction, sig, kernel_dfl, NULL, (_NSIG - 1) / 8);
    }
}

/* Make `tty` the controlling terminal and descriptors 0, 1 and 2. */
static int take_terminal(int tty)
{
    int fd;

    if (ioctl(tty, TIOCSCTTY, 0) < 0)
        return -1;
    if (tty <= 2) {
        /* The caller closed its own stdio: move the terminal clear of the dup2s. */
        tty = fcntl(tty, F_DUPFD_CLOEXEC, 3);
        if (tty < 0)
            return -1;
    }
    for (fd = 0; fd <= 2; fd++)
        if (dup2(tty, fd) < 0)
            return -1;
    return 0;
}

/* Close every descriptor above 2, so the command (and a daemon it may start) holds
 * none of the caller's sockets or files. Linux before 5.9 lacks close_range; there
 * the descriptors Python opened are close-on-exec anyway, so only ones the caller
 * made inheritable on purpose pass on. */
static void close_the_rest(void)
{
#ifdef SYS_close_range
    syscall(SYS_close_range, 3U, ~0U, 0U);
#endif
}

/* The child's side: become the command or report the failed step; never returns.
 * noinline keeps the child's locals in frames of its own, below the caller's. */
static void __attribute__((noreturn, noinline))
become_command(char *const argv[], int tty, const char *cwd,
               volatile struct ave_spawn_failure *failure)
{
    sigset_t none;
    int step;

    default_signal_actions();
    step = AVE_SPAWN_SESSION;
    if (setsid() < 0)
        goto failed;
    step = AVE_SPAWN_TERMINAL;
    if (take_terminal(tty) < 0)
        goto failed;
    close_the_rest();
    step = AVE_SPAWN_DIRECTORY;
    if (cwd != NULL && cwd[0] != '\0' && chdir(cwd) < 0)
        goto failed;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    step = AVE_SPAWN_EXEC;
    execvp(argv[0], argv);
failed:
    failure->error = errno;
    failure->step = step;
    _exit(EXEC_FAILED);
}

static void reap(pid_t pid)
{
    /* ECHILD when the caller ignores SIGCHLD: the kernel reaped it already. */
    while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
        continue;
}

pid_t ave_spawn(char *const argv[], int tty, const char *cwd,
                struct ave_spawn_failure *failure)
{
    volatile struct ave_spawn_failure *shared = failure;
    sigset_t all, saved;
    pid_t pid;
    int error;

    if (argv == NULL || argv[0] == NULL || failure == NULL || tty < 0) {
        errno = EINVAL;
        return -1;
    }
    shared->step = AVE_SPAWN_OK;
    shared->error = 0;
    sigfillset(&all);
    error = pthread_sigmask(SIG_SETMASK, &all, &saved);
    if (error != 0) {
        errno = error;
        return -1;
    }
    pid = vfork();
    if (pid == 0)
        become_command(argv, tty, cwd, shared);
    error = errno;
    pthread_sigmask(SIG_SETMASK, &saved, NULL);
    if (pid < 0) {
        errno = error;
        return -1;
    }
    if (shared->step != AVE_SPAWN_OK) {
        error = shared->error;
        reap(pid);
        errno = error;
        return -1;
    }
    return pid;
}
