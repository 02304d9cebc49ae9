/* buffer.cu — CUDA buffers: shared storage is pinned host memory (host-visible, mapped, moved by
 * the copy engines), private storage is device memory copied through read/write. Graph-owned
 * io heads (graph.cu) use the same struct: shared ones over pinned staging, private ones over
 * a device tensor such as an input gradient. */
#include "cuda.h"

#include <string.h>

int cu_buffer_create(mpscy_device dev, size_t bytes, int32_t storage, mpscy_buffer *out, char *err, size_t n) {
    cu_buffer *b = (cu_buffer *)cu_host_alloc(dev, sizeof *b);
    if (!b) return MPSCY_FAIL(err, n, MPSCY_OOM, CU, "buffer head");
    void *mem = NULL;
    int st = storage == MPSCY_STORAGE_SHARED ? cu_pinned_alloc(dev, &mem, bytes) : cu_dev_alloc(dev, &mem, bytes);
    if (st != MPSCY_OK) {
        cu_host_free(dev, b, sizeof *b);
        return MPSCY_FAIL(err, n, st, CU, "%s buffer of %zu bytes", storage == MPSCY_STORAGE_SHARED ? "pinned" : "device",
                          bytes);
    }
    b->base.vt = dev->vt;
    b->base.dev = dev;
    b->base.bytes = bytes;
    b->base.storage = storage;
    b->base.host = storage == MPSCY_STORAGE_SHARED ? mem : NULL;
    b->dmem = storage == MPSCY_STORAGE_SHARED ? NULL : mem;
    *out = &b->base;
    return MPSCY_OK;
}

void cu_buffer_destroy(mpscy_buffer buf) {
    cu_buffer *b = (cu_buffer *)buf;
    mpscy_device dev = buf->dev;
    cu_settle(dev, NULL, 0);
    if (buf->host) cu_pinned_free(dev, buf->host, buf->bytes);
    else cu_dev_free(dev, b->dmem, buf->bytes);
    cu_host_free(dev, b, sizeof *b);
}

int cu_buffer_read(mpscy_buffer buf, size_t off, void *dst, size_t bytes, char *err, size_t n) {
    cu_buffer *b = (cu_buffer *)buf;
    int st = cu_settle(buf->dev, err, n);
    if (st != MPSCY_OK) return st;
    if (buf->host) {
        memcpy(dst, (char *)buf->host + off, bytes);
        return MPSCY_OK;
    }
    cudaError_t e = cudaMemcpy(dst, (char *)b->dmem + off, bytes, cudaMemcpyDeviceToHost);
    if (e != cudaSuccess)
        return MPSCY_FAIL(err, n, MPSCY_DEVICE, CU, "device-to-host copy of %zu bytes: %s", bytes, cudaGetErrorString(e));
    return MPSCY_OK;
}

int cu_buffer_write(mpscy_buffer buf, size_t off, const void *src, size_t bytes, char *err, size_t n) {
    cu_buffer *b = (cu_buffer *)buf;
    int st = cu_settle(buf->dev, err, n);
    if (st != MPSCY_OK) return st;
    if (buf->host) {
        memcpy((char *)buf->host + off, src, bytes);
        return MPSCY_OK;
    }
    if (buf->borrowed)
        return MPSCY_FAIL(err, n, MPSCY_INVALID, CU, "this graph buffer (an input gradient) is read-only");
    cudaError_t e = cudaMemcpy((char *)b->dmem + off, src, bytes, cudaMemcpyHostToDevice);
    if (e == cudaSuccess) e = cu_legacy_done();
    if (e != cudaSuccess)
        return MPSCY_FAIL(err, n, MPSCY_DEVICE, CU, "host-to-device copy of %zu bytes: %s", bytes, cudaGetErrorString(e));
    return MPSCY_OK;
}
