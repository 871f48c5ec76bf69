/*
 * bench_filter: the reference upstream of the benchmarks -- a minimal filter on stock libmilter.
 *
 * Why it exists: a benchmark of the bridge needs an upstream whose own cost is negligible and
 * known, so that the figures measure the bridge, not the filter.  A pymilter filter spends
 * milliseconds of Python per message; this one spends microseconds of C.  It answers CONTINUE
 * to every step (so the MTA, or the bridge, walks every step of the protocol, as with a
 * real scanner), optionally sleeps at end-of-message (to stand for a scanner's work without
 * using CPU), adds one header there (or --edits N of them), and gives the verdict it was
 * told to give.
 *
 * Several edits: the soak test (benchmarks/soak.py) kills filters at random and then checks
 * that every delivered message carries all or none of each filter's edits.  That needs a
 * filter whose edits are several packets: --edits N adds the headers NAME-1 .. NAME-N, each
 * written to the socket as soon as it is made (libmilter sends every edit at once), and
 * --edit-gap-ms sleeps between two of them, so that a SIGKILL can land after some edits
 * are on the wire and before the final reply -- the case the receiver must not half-apply.
 * --log-edits writes "eom ID edit I" to stderr after each edit is sent and "eom ID replied"
 * when the callback returns (ID counts end-of-message calls), so that the soak test can tell
 * from a killed filter's log which messages it left between two edits.
 *
 * TCP_NODELAY: libmilter never sets it on the sockets it accepts, and it writes an edit and the
 * final reply of end-of-message in separate write() calls.  With Nagle on, the second write
 * waits for the peer's delayed ACK (about 40 ms on Linux) whenever the first is still
 * unacknowledged, so every figure would measure the kernel's timer.  libmilter gives the
 * callbacks no way to reach their socket, so this program defines accept() itself: the dynamic
 * linker resolves libmilter's call to accept() to this definition (the executable comes first
 * in symbol lookup), which accepts with accept4() and sets TCP_NODELAY on every TCP socket.
 * --verbose logs each accepted socket with the option read back, which is how the tests check
 * that the interposition took effect.  --nagle leaves Nagle on, as every packaged libmilter
 * filter ships: the delayed-ACK experiment of benchmarks/README.md.
 *
 *   bench_filter --socket inet:PORT@127.0.0.1 | --socket unix:/path | --port PORT
 *                [--sleep-ms N] [--header-name NAME] [--header-value VALUE]
 *                [--edits N] [--edit-gap-ms N] [--log-edits]
 *                [--verdict continue|accept|reject|tempfail|discard] [--backlog N]
 *                [--timeout SECONDS] [--ready] [--exit-on-stdin-eof] [--verbose] [--nagle]
 *
 * --ready prints "READY" on stdout once the socket listens.  --exit-on-stdin-eof exits as soon
 * as stdin reaches end of file, so that a parent that dies never leaves a filter behind.
 */

#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include <libmilter/mfapi.h>

static long sleep_ms = 0;
static char *header_name = "X-Bench-Filter";
static char *header_value = "1";
static long edits = 1;
static long edit_gap_ms = 0;
static int log_edits = 0;
static long eom_calls = 0;
static sfsistat eom_verdict = SMFIS_CONTINUE;
static int verbose = 0;
static int nagle = 0;

/* ---- TCP_NODELAY on accepted sockets ------------------------------------------------------ */

int accept(int fd, struct sockaddr *addr, socklen_t *addrlen)
{
	int conn = accept4(fd, addr, addrlen, 0);
	if (conn < 0)
		return conn;
	int saved = errno;
	int domain = 0;
	socklen_t len = sizeof(domain);
	if (getsockopt(conn, SOL_SOCKET, SO_DOMAIN, &domain, &len) == 0 &&
	    (domain == AF_INET || domain == AF_INET6)) {
		int one = 1;
		if (!nagle && setsockopt(conn, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) != 0)
			fprintf(stderr, "bench_filter: TCP_NODELAY on fd %d: %s\n", conn,
				strerror(errno));
		if (verbose) {
			int value = -1;
			len = sizeof(value);
			getsockopt(conn, IPPROTO_TCP, TCP_NODELAY, &value, &len);
			fprintf(stderr, "accepted fd=%d tcp_nodelay=%d\n", conn, value);
		}
	} else if (verbose) {
		fprintf(stderr, "accepted fd=%d unix\n", conn);
	}
	errno = saved;
	return conn;
}

/* ---- callbacks ---------------------------------------------------------------------------- */

static sfsistat on_connect(SMFICTX *ctx, char *host, _SOCK_ADDR *addr)
{
	(void)ctx, (void)host, (void)addr;
	return SMFIS_CONTINUE;
}

static sfsistat on_helo(SMFICTX *ctx, char *name)
{
	(void)ctx, (void)name;
	return SMFIS_CONTINUE;
}

static sfsistat on_envfrom(SMFICTX *ctx, char **argv)
{
	(void)ctx, (void)argv;
	return SMFIS_CONTINUE;
}

static sfsistat on_envrcpt(SMFICTX *ctx, char **argv)
{
	(void)ctx, (void)argv;
	return SMFIS_CONTINUE;
}

static sfsistat on_data(SMFICTX *ctx)
{
	(void)ctx;
	return SMFIS_CONTINUE;
}

static sfsistat on_header(SMFICTX *ctx, char *name, char *value)
{
	(void)ctx, (void)name, (void)value;
	return SMFIS_CONTINUE;
}

static sfsistat on_eoh(SMFICTX *ctx)
{
	(void)ctx;
	return SMFIS_CONTINUE;
}

static sfsistat on_body(SMFICTX *ctx, unsigned char *chunk, size_t len)
{
	(void)ctx, (void)chunk, (void)len;
	return SMFIS_CONTINUE;
}

static void sleep_for(long ms)
{
	if (ms <= 0)
		return;
	struct timespec wait = {ms / 1000, (ms % 1000) * 1000000L};
	while (nanosleep(&wait, &wait) != 0 && errno == EINTR)
		;
}

/* One line in one write(), so that the threads' lines never interleave. */
static void log_eom(long id, const char *what, long edit)
{
	char line[96];
	int len = edit > 0 ? snprintf(line, sizeof(line), "eom %ld %s %ld\n", id, what, edit)
			   : snprintf(line, sizeof(line), "eom %ld %s\n", id, what);
	if (write(STDERR_FILENO, line, (size_t)len) < 0)
		return;
}

/* One header as before (NAME: VALUE), or with --edits N > 1 the headers NAME-1 .. NAME-N. */
static int add_headers(SMFICTX *ctx, long id)
{
	if (header_name[0] == '\0')
		return MI_SUCCESS;
	char name[256];
	for (long i = 1; i <= edits; i++) {
		if (i > 1)
			sleep_for(edit_gap_ms);
		if (edits > 1)
			snprintf(name, sizeof(name), "%s-%ld", header_name, i);
		if (smfi_addheader(ctx, edits > 1 ? name : header_name, header_value) != MI_SUCCESS)
			return MI_FAILURE;
		if (log_edits)
			log_eom(id, "edit", i);
	}
	return MI_SUCCESS;
}

static sfsistat on_eom(SMFICTX *ctx)
{
	long id = __atomic_add_fetch(&eom_calls, 1, __ATOMIC_RELAXED);
	sleep_for(sleep_ms);
	if (add_headers(ctx, id) != MI_SUCCESS)
		return SMFIS_TEMPFAIL;
	if (log_edits)
		log_eom(id, "replied", 0);
	return eom_verdict;
}

static sfsistat on_abort(SMFICTX *ctx)
{
	(void)ctx;
	return SMFIS_CONTINUE;
}

static sfsistat on_close(SMFICTX *ctx)
{
	(void)ctx;
	return SMFIS_CONTINUE;
}

/* ---- start-up ------------------------------------------------------------------------------ */

static void *watch_stdin(void *unused)
{
	(void)unused;
	char buffer[256];
	for (;;) {
		ssize_t n = read(STDIN_FILENO, buffer, sizeof(buffer));
		if (n == 0 || (n < 0 && errno != EINTR))
			_exit(0);
	}
	return NULL;
}

static void usage(const char *why)
{
	fprintf(stderr,
		"bench_filter: %s\n"
		"usage: bench_filter (--socket SPEC | --port PORT) [--sleep-ms N]\n"
		"         [--header-name NAME] [--header-value VALUE]\n"
		"         [--edits N] [--edit-gap-ms N] [--log-edits]\n"
		"         [--verdict continue|accept|reject|tempfail|discard] [--backlog N]\n"
		"         [--timeout SECONDS] [--ready] [--exit-on-stdin-eof] [--verbose] [--nagle]\n",
		why);
	exit(2);
}

static long number(const char *text, const char *option)
{
	char *end = NULL;
	errno = 0;
	long value = strtol(text, &end, 10);
	if (errno != 0 || end == text || *end != '\0' || value < 0) {
		char why[200];
		snprintf(why, sizeof(why), "%s: not a whole number >= 0: %s", option, text);
		usage(why);
	}
	return value;
}

static sfsistat parse_verdict(const char *text)
{
	static const struct {
		const char *name;
		sfsistat value;
	} verdicts[] = {
		{"continue", SMFIS_CONTINUE}, {"accept", SMFIS_ACCEPT},
		{"reject", SMFIS_REJECT},     {"tempfail", SMFIS_TEMPFAIL},
		{"discard", SMFIS_DISCARD},
	};
	for (size_t i = 0; i < sizeof(verdicts) / sizeof(verdicts[0]); i++)
		if (strcmp(text, verdicts[i].name) == 0)
			return verdicts[i].value;
	usage("--verdict: expected continue, accept, reject, tempfail or discard");
	return SMFIS_CONTINUE;
}

int main(int argc, char **argv)
{
	static const struct option options[] = {
		{"socket", required_argument, NULL, 's'},
		{"port", required_argument, NULL, 'p'},
		{"sleep-ms", required_argument, NULL, 'S'},
		{"header-name", required_argument, NULL, 'n'},
		{"header-value", required_argument, NULL, 'v'},
		{"edits", required_argument, NULL, 'E'},
		{"edit-gap-ms", required_argument, NULL, 'G'},
		{"log-edits", no_argument, NULL, 'L'},
		{"verdict", required_argument, NULL, 'V'},
		{"backlog", required_argument, NULL, 'b'},
		{"timeout", required_argument, NULL, 't'},
		{"ready", no_argument, NULL, 'r'},
		{"exit-on-stdin-eof", no_argument, NULL, 'e'},
		{"verbose", no_argument, NULL, 'x'},
		{"nagle", no_argument, NULL, 'N'},
		{"help", no_argument, NULL, 'h'},
		{NULL, 0, NULL, 0},
	};
	char *spec = NULL;
	char port_spec[64];
	long backlog = 4096; /* sessions arrive in bursts of hundreds in the memory benchmark */
	long timeout = 7210; /* libmilter's default */
	int ready = 0, stdin_eof = 0;
	int opt;
	while ((opt = getopt_long(argc, argv, "", options, NULL)) != -1) {
		switch (opt) {
		case 's':
			spec = optarg;
			break;
		case 'p':
			snprintf(port_spec, sizeof(port_spec), "inet:%ld@127.0.0.1",
				 number(optarg, "--port"));
			spec = port_spec;
			break;
		case 'S':
			sleep_ms = number(optarg, "--sleep-ms");
			break;
		case 'n':
			header_name = optarg;
			break;
		case 'v':
			header_value = optarg;
			break;
		case 'E':
			edits = number(optarg, "--edits");
			break;
		case 'G':
			edit_gap_ms = number(optarg, "--edit-gap-ms");
			break;
		case 'L':
			log_edits = 1;
			break;
		case 'V':
			eom_verdict = parse_verdict(optarg);
			break;
		case 'b':
			backlog = number(optarg, "--backlog");
			break;
		case 't':
			timeout = number(optarg, "--timeout");
			break;
		case 'r':
			ready = 1;
			break;
		case 'e':
			stdin_eof = 1;
			break;
		case 'x':
			verbose = 1;
			break;
		case 'N':
			nagle = 1;
			break;
		case 'h':
			usage("a reference milter for the benchmarks");
			break;
		default:
			usage("unknown option");
		}
	}
	if (optind != argc)
		usage("unexpected argument");
	if (spec == NULL)
		usage("--socket or --port is required");
	if (edits < 1 || edits > 1000)
		usage("--edits: between 1 and 1000 (an empty --header-name adds none)");
	if (strlen(header_name) > 200)
		usage("--header-name: at most 200 characters");

	struct smfiDesc desc = {
		.xxfi_name = "bench_filter",
		.xxfi_version = SMFI_VERSION,
		.xxfi_flags = SMFIF_ADDHDRS,
		.xxfi_connect = on_connect,
		.xxfi_helo = on_helo,
		.xxfi_envfrom = on_envfrom,
		.xxfi_envrcpt = on_envrcpt,
		.xxfi_header = on_header,
		.xxfi_eoh = on_eoh,
		.xxfi_body = on_body,
		.xxfi_eom = on_eom,
		.xxfi_abort = on_abort,
		.xxfi_close = on_close,
		.xxfi_data = on_data,
	};
	if (smfi_setconn(spec) != MI_SUCCESS)
		usage("--socket: libmilter refused the socket specification");
	if (smfi_setbacklog((int)backlog) != MI_SUCCESS)
		usage("--backlog: refused by libmilter");
	if (smfi_settimeout((int)timeout) != MI_SUCCESS)
		usage("--timeout: refused by libmilter");
	if (smfi_register(desc) != MI_SUCCESS) {
		fprintf(stderr, "bench_filter: smfi_register failed\n");
		return 1;
	}
	if (smfi_opensocket(1) != MI_SUCCESS) {
		fprintf(stderr, "bench_filter: cannot open socket %s\n", spec);
		return 1;
	}
	if (stdin_eof) {
		pthread_t thread;
		if (pthread_create(&thread, NULL, watch_stdin, NULL) != 0) {
			fprintf(stderr, "bench_filter: cannot start the stdin watcher\n");
			return 1;
		}
		pthread_detach(thread);
	}
	if (ready) {
		printf("READY\n");
		fflush(stdout);
	}
	return smfi_main() == MI_SUCCESS ? 0 : 1;
}
