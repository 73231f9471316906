/* dist/scaleout's launcher: one file that runs with no Python on the machine, and starts as fast
 * as an unpacked program.
 *
 * PyInstaller's one-file mode unpacks its ~110 MB of libraries into a fresh temporary directory
 * at every start (0.6-0.7 s before Python runs). This launcher carries the same PyInstaller build
 * (scaleout.spec, one-folder form) as a deflate stream appended to itself, unpacks it once into a
 * per-user cache keyed by the payload's hash (as shiv does for the zipapp), and from then on
 * execs the unpacked program at once: same process, so signals and exit codes are the program's.
 *
 * File layout: [this program][payload: zlib stream of entries][trailer, 64 bytes]
 *   trailer = key[32] (hex sha256 prefix of the payload) | offset u64 LE | length u64 LE
 *             | reserved[8] | magic "SCOLNCH1"
 *   entry   = type u8 ('d' dir, 'f' file, 'l' symlink) | mode u16 LE | path length u32 LE
 *             | data length u64 LE | path | data (file bytes, or the link target)
 *
 * Cache: $SCALEOUT_CACHE, else $XDG_CACHE_HOME/scaleout, else $HOME/.cache/scaleout, else
 * /tmp/scaleout-UID; the program lives in frozen-KEY/ there. Unpacking goes to a temporary
 * directory renamed into place when complete, so a crash or a full disk never leaves a broken
 * program behind, and two first starts at once both end up running the same copy.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

#define MAGIC "SCOLNCH1"
#define TRAILER 64
#define KEEP_OTHER_VERSIONS 2

static char cache_root[PATH_MAX];
static char unpacking[PATH_MAX]; /* the temporary folder being filled, removed if we stop */

static void remove_tree(const char *path);

/* The payload is damaged: say so in one line, leave nothing half-unpacked behind. */
static void damaged(const char *what) {
    if (*unpacking) remove_tree(unpacking);
    fprintf(stderr, "scaleout: the program file is damaged or truncated (%s); download it again\n", what);
    exit(1);
}

static void die(const char *what, const char *path, int err) {
    if (*unpacking) remove_tree(unpacking);
    fprintf(stderr, "scaleout: cannot unpack the program (%s %s: %s); set SCALEOUT_CACHE to a writable "
                    "directory with 200 MB free\n", what, path, strerror(err));
    exit(1);
}

static uint64_t le64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

static int mkdirs(const char *path, mode_t mode) {
    char buf[PATH_MAX];
    size_t n = strlen(path);
    if (n >= sizeof buf) return ENAMETOOLONG;
    memcpy(buf, path, n + 1);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/') continue;
        *p = 0;
        if (mkdir(buf, mode) != 0 && errno != EEXIST) return errno;
        *p = '/';
    }
    if (mkdir(buf, mode) != 0 && errno != EEXIST) return errno;
    return 0;
}

static void pick_cache_root(void) {
    const char *env = getenv("SCALEOUT_CACHE");
    const char *xdg = getenv("XDG_CACHE_HOME");
    const char *home = getenv("HOME");
    if (env && *env) snprintf(cache_root, sizeof cache_root, "%s", env);
    else if (xdg && *xdg == '/') snprintf(cache_root, sizeof cache_root, "%s/scaleout", xdg);
    else if (home && *home == '/') snprintf(cache_root, sizeof cache_root, "%s/.cache/scaleout", home);
    else snprintf(cache_root, sizeof cache_root, "/tmp/scaleout-%u", (unsigned)getuid());
    if (strlen(cache_root) > PATH_MAX - 512) die("use", "the cache directory", ENAMETOOLONG);
}

/* The stream of entries, read through zlib from the payload. */
typedef struct {
    int fd;
    uint64_t left; /* compressed bytes not yet read */
    z_stream z;
    unsigned char in[1 << 16];
    int done;
} Inflater;

static size_t inflate_some(Inflater *s, unsigned char *out, size_t want) {
    s->z.next_out = out;
    s->z.avail_out = (uInt)want;
    while (s->z.avail_out > 0 && !s->done) {
        if (s->z.avail_in == 0 && s->left > 0) {
            size_t n = s->left < sizeof s->in ? (size_t)s->left : sizeof s->in;
            ssize_t got = read(s->fd, s->in, n);
            if (got <= 0) damaged("short read");
            s->left -= (uint64_t)got;
            s->z.next_in = s->in;
            s->z.avail_in = (uInt)got;
        }
        int rc = inflate(&s->z, Z_NO_FLUSH);
        if (rc == Z_STREAM_END) s->done = 1;
        else if (rc != Z_OK) damaged(s->z.msg ? s->z.msg : "inflate");
    }
    return want - s->z.avail_out;
}

static void inflate_exact(Inflater *s, void *out, size_t n) {
    if (inflate_some(s, out, n) != n) damaged("short payload");
}

static int safe_relative(const char *p) {
    if (*p == 0 || *p == '/') return 0;
    for (const char *c = p; *c;) {
        const char *e = strchr(c, '/');
        size_t len = e ? (size_t)(e - c) : strlen(c);
        if ((len == 2 && c[0] == '.' && c[1] == '.') || len == 0) return 0;
        c += len + (e ? 1 : 0);
        if (!e) break;
    }
    return 1;
}

static void unpack(int fd, uint64_t offset, uint64_t length, const char *dir) {
    static Inflater s;
    memset(&s, 0, sizeof s);
    if (lseek(fd, (off_t)offset, SEEK_SET) < 0) die("seek in", "/proc/self/exe", errno);
    s.fd = fd;
    s.left = length;
    if (inflateInit(&s.z) != Z_OK) { fprintf(stderr, "scaleout: zlib failed to start\n"); exit(1); }
    static unsigned char buf[1 << 17];
    char path[PATH_MAX], rel[PATH_MAX];
    for (;;) {
        unsigned char head[15];
        size_t got = inflate_some(&s, head, sizeof head);
        if (got == 0 && s.done) break;
        if (got != sizeof head) damaged("entry header");
        char type = (char)head[0];
        mode_t mode = (mode_t)(head[1] | (head[2] << 8)) & 07777;
        uint32_t plen = (uint32_t)head[3] | ((uint32_t)head[4] << 8) | ((uint32_t)head[5] << 16) | ((uint32_t)head[6] << 24);
        uint64_t size = le64(head + 7);
        if (plen == 0 || plen >= sizeof rel) damaged("path");
        inflate_exact(&s, rel, plen);
        rel[plen] = 0;
        if (!safe_relative(rel)) damaged("unsafe path");
        if ((size_t)snprintf(path, sizeof path, "%s/%s", dir, rel) >= sizeof path) die("create", rel, ENAMETOOLONG);
        if (type == 'd') {
            int err = mkdirs(path, 0700);
            if (err) die("create", path, err);
            chmod(path, mode | 0700);
        } else if (type == 'l') {
            char target[PATH_MAX];
            if (size >= sizeof target) damaged("link");
            inflate_exact(&s, target, (size_t)size);
            target[size] = 0;
            if (symlink(target, path) != 0) die("link", path, errno);
        } else if (type == 'f') {
            int out = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, (mode & 0777) | 0600);
            if (out < 0) die("create", path, errno);
            while (size > 0) {
                size_t want = size < sizeof buf ? (size_t)size : sizeof buf;
                inflate_exact(&s, buf, want);
                for (size_t w = 0; w < want;) {
                    ssize_t n = write(out, buf + w, want - w);
                    if (n < 0) { if (errno == EINTR) continue; die("write", path, errno); }
                    w += (size_t)n;
                }
                size -= want;
            }
            if (close(out) != 0) die("write", path, errno);
        } else {
            damaged("entry type");
        }
    }
    inflateEnd(&s.z);
}

static int remove_one(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
    (void)st; (void)flag; (void)ftw;
    remove(path);
    return 0;
}

static void remove_tree(const char *path) { nftw(path, remove_one, 16, FTW_DEPTH | FTW_PHYS); }

/* Other versions unpacked here: keep the newest few, remove the rest (and stale half-unpacked
 * directories of crashed first starts older than an hour). */
static void prune(const char *keep) {
    DIR *d = opendir(cache_root);
    if (!d) return;
    struct { char name[NAME_MAX + 1]; time_t mtime; } found[64];
    int n = 0;
    struct dirent *e;
    char path[PATH_MAX];
    time_t now = time(NULL);
    while ((e = readdir(d)) != NULL) {
        struct stat st;
        snprintf(path, sizeof path, "%s/%s", cache_root, e->d_name);
        if (lstat(path, &st) != 0 || !S_ISDIR(st.st_mode)) continue;
        if (strncmp(e->d_name, ".unpack-", 8) == 0 && now - st.st_mtime > 3600) { remove_tree(path); continue; }
        if (strncmp(e->d_name, "frozen-", 7) != 0 || strcmp(e->d_name, keep) == 0 || n == 64) continue;
        snprintf(found[n].name, sizeof found[n].name, "%s", e->d_name);
        found[n].mtime = st.st_mtime;
        n++;
    }
    closedir(d);
    for (int kept = 0; kept < KEEP_OTHER_VERSIONS && n > 0; kept++) { /* drop the newest from the list */
        int newest = 0;
        for (int i = 1; i < n; i++) if (found[i].mtime > found[newest].mtime) newest = i;
        found[newest] = found[--n];
    }
    for (int i = 0; i < n; i++) {
        snprintf(path, sizeof path, "%s/%s", cache_root, found[i].name);
        remove_tree(path);
    }
}

int main(int argc, char **argv) {
    (void)argc;
    int fd = open("/proc/self/exe", O_RDONLY | O_CLOEXEC);
    if (fd < 0) die("open", "/proc/self/exe", errno);
    struct stat st;
    if (fstat(fd, &st) != 0 || st.st_size < TRAILER) { fprintf(stderr, "scaleout: the program file is damaged; download it again\n"); return 1; }
    unsigned char t[TRAILER];
    if (pread(fd, t, TRAILER, st.st_size - TRAILER) != TRAILER || memcmp(t + 56, MAGIC, 8) != 0) {
        fprintf(stderr, "scaleout: the program file is truncated or damaged; download it again\n");
        return 1;
    }
    char key[33];
    memcpy(key, t, 32);
    key[32] = 0;
    uint64_t offset = le64(t + 32), length = le64(t + 40);
    if (offset + length + TRAILER != (uint64_t)st.st_size) {
        fprintf(stderr, "scaleout: the program file is truncated or damaged; download it again\n");
        return 1;
    }

    pick_cache_root();
    char name[64], dir[PATH_MAX], program[PATH_MAX], marker[PATH_MAX];
    snprintf(name, sizeof name, "frozen-%s", key);
    snprintf(dir, sizeof dir, "%s/%s", cache_root, name);
    snprintf(program, sizeof program, "%s/scaleout", dir);
    snprintf(marker, sizeof marker, "%s/.complete", dir);

    if (access(marker, F_OK) != 0) {
        int err = mkdirs(cache_root, 0700);
        if (err) die("create", cache_root, err);
        char tmp[PATH_MAX];
        snprintf(tmp, sizeof tmp, "%s/.unpack-%s-XXXXXX", cache_root, key);
        if (!mkdtemp(tmp)) die("create", tmp, errno);
        snprintf(unpacking, sizeof unpacking, "%s", tmp);
        unpack(fd, offset, length, tmp);
        char tmp_marker[PATH_MAX];
        snprintf(tmp_marker, sizeof tmp_marker, "%s/.complete", tmp);
        int m = open(tmp_marker, O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
        if (m < 0) die("create", tmp_marker, errno);
        close(m);
        unpacking[0] = 0;
        if (rename(tmp, dir) != 0) {
            int e = errno;
            remove_tree(tmp);
            /* Another first start won the race, or an incomplete copy (no marker) is in the way. */
            if (access(marker, F_OK) != 0) die("rename into", dir, e);
        }
        prune(name);
    }
    close(fd);
    /* Lets the program tell which file the user ran (scaleout --version). */
    char self[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n > 0) { self[n] = 0; setenv("SCALEOUT_ARTEFACT", self, 1); }
    argv[0] = program;
    execv(program, argv);
    die("run", program, errno);
    return 1;
}
