/* buffer.c — CPU buffers: host memory, so shared and private storage are the same bytes;
 * a private buffer simply does not expose its pointer, as on a GPU, and is copied through
 * read/write. Graph-owned io buffers are heads over the graph's io slab (graph.c). */
#include "cpu.h"

#include <string.h>

typedef struct cpu_buffer {
    struct mpscy_buffer_ base;
    void *mem;
} cpu_buffer;

int cpu_buffer_create(mpscy_device dev, size_t bytes, int32_t storage, mpscy_buffer *out, char *err, size_t n) {
    cpu_buffer *b = cpu_alloc(dev, sizeof *b);
    void *mem = b ? cpu_alloc(dev, bytes) : NULL;
    if (!mem) {
        cpu_free(dev, b, sizeof *b);
        return MPSCY_FAIL(err, n, MPSCY_OOM, CPU, "buffer of %zu bytes", bytes);
    }
    b->base.vt = dev->vt;
    b->base.dev = dev;
    b->base.bytes = bytes;
    b->base.storage = storage;
    b->base.host = storage == MPSCY_STORAGE_SHARED ? mem : NULL;
    b->mem = mem;
    *out = &b->base;
    return MPSCY_OK;
}

void cpu_buffer_destroy(mpscy_buffer buf) {
    cpu_buffer *b = (cpu_buffer *)buf;
    mpscy_device dev = buf->dev;
    cpu_free(dev, b->mem, buf->bytes);
    cpu_free(dev, b, sizeof *b);
}

/* Graph io buffers are always shared, so their bytes are at host. */
static void *cpu_buffer_bytes(mpscy_buffer buf) {
    return buf->borrowed ? buf->host : ((cpu_buffer *)buf)->mem;
}

int cpu_buffer_read(mpscy_buffer buf, size_t off, void *dst, size_t bytes, char *err, size_t n) {
    (void)err; (void)n;
    memcpy(dst, (char *)cpu_buffer_bytes(buf) + off, bytes);
    return MPSCY_OK;
}

int cpu_buffer_write(mpscy_buffer buf, size_t off, const void *src, size_t bytes, char *err, size_t n) {
    (void)err; (void)n;
    memcpy((char *)cpu_buffer_bytes(buf) + off, src, bytes);
    return MPSCY_OK;
}
