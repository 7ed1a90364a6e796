/*
 * pause: the sandbox ("pause") process of a pod for the rrc test bed.
 *
 * Runs as pid 1 of a pod sandbox and holds its namespaces open:
 *   - sleeps in pause() forever,
 *   - reaps every child that gets re-parented to it (SIGCHLD),
 *   - exits 0 on SIGINT or SIGTERM.
 *
 * Built with `gcc -static -Os` by integration/images/build.sh.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define PAUSE_VERSION "rrc-pause 1.0"

static void on_terminate(int sig)
{
	(void)sig;
	_exit(0);
}

static void on_child(int sig)
{
	int saved = errno;

	(void)sig;
	while (waitpid(-1, NULL, WNOHANG) > 0)
		;
	errno = saved;
}

static int install(int sig, void (*handler)(int), int flags)
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = handler;
	sa.sa_flags = flags;
	sigemptyset(&sa.sa_mask);
	return sigaction(sig, &sa, NULL);
}

int main(int argc, char **argv)
{
	if (argc > 1 && (strcmp(argv[1], "-v") == 0 || strcmp(argv[1], "--version") == 0)) {
		puts(PAUSE_VERSION);
		return 0;
	}
	if (getpid() != 1)
		fputs("pause: warning: not running as pid 1\n", stderr);

	if (install(SIGINT, on_terminate, 0) < 0 ||
	    install(SIGTERM, on_terminate, 0) < 0 ||
	    install(SIGCHLD, on_child, SA_NOCLDSTOP | SA_RESTART) < 0) {
		perror("pause: sigaction");
		return 1;
	}

	for (;;)
		pause();

	/* not reached */
	return 42;
}
