/* buffer.m — ABI buffers on Metal: MTLBuffers in shared storage (the host pointer is the
 * buffer's contents, so a memoryview copy lands in GPU-visible memory with no staging) or in
 * private storage (read and written through a blit into a temporary shared buffer). Graph io
 * buffers are borrowed heads over shared buffers the graph owns (graph.m). */
#import "metal.h"

#include <string.h>

#define FAIL(status, ...) MPSCY_FAIL(err, n, (status), METAL_C, __VA_ARGS__)

typedef struct metal_buffer {
    struct mpscy_buffer_ base;
    void *mtl;   /* id<MTLBuffer>, owned through CFBridgingRetain */
} metal_buffer;

int metal_buffer_create(mpscy_device dev, size_t bytes, int32_t storage, mpscy_buffer *out, char *err, size_t n) {
    @autoreleasepool {
        id<MTLBuffer> mtl = metal_new_buffer(dev, bytes, storage);
        if (!mtl) return FAIL(MPSCY_OOM, "newBufferWithLength: %zu bytes (%s storage) returned nil", bytes,
                              storage == MPSCY_STORAGE_PRIVATE ? "private" : "shared");
        metal_buffer *b = metal_host_alloc(dev, sizeof *b);
        if (!b) {
            metal_count_buffer_free(dev, mtl);
            return FAIL(MPSCY_OOM, "buffer object of %zu bytes", sizeof *b);
        }
        b->base.vt = dev->vt;
        b->base.dev = dev;
        b->base.bytes = bytes;
        b->base.storage = storage;
        b->base.host = storage == MPSCY_STORAGE_SHARED ? mtl.contents : NULL;
        b->mtl = (void *)CFBridgingRetain(mtl);
        *out = &b->base;
        return MPSCY_OK;
    }
}

void metal_buffer_destroy(mpscy_buffer buf) {
    metal_buffer *b = (metal_buffer *)buf;
    mpscy_device dev = buf->dev;
    @autoreleasepool {
        id<MTLBuffer> mtl = CFBridgingRelease(b->mtl);
        metal_count_buffer_free(dev, mtl);
    }
    metal_host_free(dev, b, sizeof *b);
}

/* Copies between a private buffer and a temporary shared one over the 4-byte aligned range
 * [lo, hi); to_host selects the direction. One command buffer, waited on. */
static int blit(mpscy_device dev, id<MTLBuffer> priv, id<MTLBuffer> stage, size_t lo, size_t hi, int to_host,
                char *err, size_t n) {
    id<MTLCommandBuffer> cb = [metal_queue(dev) commandBuffer];
    id<MTLBlitCommandEncoder> enc = cb ? [cb blitCommandEncoder] : nil;
    if (!enc) return FAIL(MPSCY_DEVICE, "could not create a blit command encoder");
    if (to_host) [enc copyFromBuffer:priv sourceOffset:lo toBuffer:stage destinationOffset:0 size:hi - lo];
    else [enc copyFromBuffer:stage sourceOffset:0 toBuffer:priv destinationOffset:lo size:hi - lo];
    [enc endEncoding];
    [cb commit];
    [cb waitUntilCompleted];
    return metal_check_command_buffer(cb, nil, "blit between private and shared buffers", err, n);
}

/* Reads (dst != NULL) or writes (src != NULL) bytes at off of a private buffer. A write of
 * an unaligned range first reads the aligned range so the bytes around it are kept. */
static int private_copy(mpscy_buffer buf, size_t off, void *dst, const void *src, size_t bytes, char *err, size_t n) {
    mpscy_device dev = buf->dev;
    id<MTLBuffer> priv = (__bridge id<MTLBuffer>)((metal_buffer *)buf)->mtl;
    size_t lo = off / 4 * 4, hi = (off + bytes + 3) / 4 * 4;
    if (hi > priv.length) hi = priv.length;
    if (bytes == 0) return MPSCY_OK;
    id<MTLBuffer> stage = metal_new_buffer(dev, hi - lo, MPSCY_STORAGE_SHARED);
    if (!stage) return FAIL(MPSCY_OOM, "staging buffer of %zu bytes", hi - lo);
    int st = MPSCY_OK;
    int aligned = lo == off && hi - lo == bytes;
    if (dst || !aligned) st = blit(dev, priv, stage, lo, hi, 1, err, n);
    if (st == MPSCY_OK && dst) memcpy(dst, (char *)stage.contents + (off - lo), bytes);
    if (st == MPSCY_OK && src) {
        memcpy((char *)stage.contents + (off - lo), src, bytes);
        st = blit(dev, priv, stage, lo, hi, 0, err, n);
    }
    metal_count_buffer_free(dev, stage);
    return st;
}

int metal_buffer_read(mpscy_buffer buf, size_t off, void *dst, size_t bytes, char *err, size_t n) {
    if (buf->host) {
        memcpy(dst, (char *)buf->host + off, bytes);
        return MPSCY_OK;
    }
    @autoreleasepool {
        return private_copy(buf, off, dst, NULL, bytes, err, n);
    }
}

int metal_buffer_write(mpscy_buffer buf, size_t off, const void *src, size_t bytes, char *err, size_t n) {
    if (buf->host) {
        memcpy((char *)buf->host + off, src, bytes);
        return MPSCY_OK;
    }
    @autoreleasepool {
        return private_copy(buf, off, NULL, src, bytes, err, n);
    }
}
