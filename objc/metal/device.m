/* device.m — the Metal device: the system default MTLDevice and one command queue, device
 * info, counted MTLBuffer and host allocations, error text from NSError/NSException, and the
 * backend table that wires this folder to the ABI. Nothing here logs or aborts: every
 * failure comes back as a status and one line in the caller's error buffer. */
#import "metal.h"

#include <stdlib.h>
#include <string.h>

#define FAIL(status, ...) MPSCY_FAIL(err, n, (status), METAL_C, __VA_ARGS__)

id<MTLDevice> metal_mtl_device(mpscy_device dev) {
    return (__bridge id<MTLDevice>)((metal_device *)dev)->device;
}

id<MTLCommandQueue> metal_queue(mpscy_device dev) {
    return (__bridge id<MTLCommandQueue>)((metal_device *)dev)->queue;
}

id<MTLBuffer> metal_new_buffer(mpscy_device dev, size_t bytes, int32_t storage) {
    /* Blit copies need 4-byte multiples on macOS, so every length is rounded up to one. */
    size_t rounded = (bytes + 3) / 4 * 4;
    if (rounded == 0) rounded = 4;
    MTLResourceOptions opts = storage == MPSCY_STORAGE_PRIVATE ? MTLResourceStorageModePrivate
                                                               : MTLResourceStorageModeShared;
    id<MTLBuffer> buf = [metal_mtl_device(dev) newBufferWithLength:rounded options:opts];
    if (buf) mpscy_count_alloc(&dev->stats, buf.length);
    return buf;
}

void metal_count_buffer_free(mpscy_device dev, id<MTLBuffer> buf) {
    if (buf) mpscy_count_free(&dev->stats, buf.length);
}

void *metal_host_alloc(mpscy_device dev, size_t bytes) {
    void *p = calloc(1, bytes ? bytes : 1);
    if (p) mpscy_count_alloc(&dev->stats, bytes);
    return p;
}

void metal_host_free(mpscy_device dev, void *ptr, size_t bytes) {
    if (!ptr) return;
    free(ptr);
    mpscy_count_free(&dev->stats, bytes);
}

const char *metal_error_text(NSError *error) {
    const char *s = error ? error.localizedDescription.UTF8String : NULL;
    return s ? s : "no error description";
}

const char *metal_exception_text(NSException *exception) {
    const char *s = exception ? exception.reason.UTF8String : NULL;
    if (!s && exception) s = exception.name.UTF8String;
    return s ? s : "no exception reason";
}

int metal_check_command_buffer(id<MTLCommandBuffer> cb, id<MTLCommandBuffer> root, const char *what,
                               char *err, size_t n) {
    /* MPSGraph may commitAndContinue: the first part is the root buffer, the rest the current. */
    if (root && root != cb && root.status == MTLCommandBufferStatusError)
        return FAIL(MPSCY_DEVICE, "%s: %s", what, metal_error_text(root.error));
    if (cb.status == MTLCommandBufferStatusError)
        return FAIL(MPSCY_DEVICE, "%s: %s", what, metal_error_text(cb.error));
    if (cb.status != MTLCommandBufferStatusCompleted)
        return FAIL(MPSCY_DEVICE, "%s: the command buffer ended in status %d", what, (int)cb.status);
    return MPSCY_OK;
}

static int metal_device_create(const mpscy_backend *vt, mpscy_device *out, char *err, size_t n) {
    @autoreleasepool {
        if (@available(macOS 13.0, *)) {
        } else {
            return FAIL(MPSCY_DEVICE, "the metal backend needs macOS 13 or newer (MPSGraph executables)");
        }
        id<MTLDevice> mtl = MTLCreateSystemDefaultDevice();
        if (!mtl) return FAIL(MPSCY_DEVICE, "no Metal device: MTLCreateSystemDefaultDevice returned nil");
        id<MTLCommandQueue> queue = [mtl newCommandQueue];
        if (!queue) return FAIL(MPSCY_DEVICE, "newCommandQueue on %s returned nil", mtl.name.UTF8String);
        metal_device *d = calloc(1, sizeof *d);
        if (!d) return FAIL(MPSCY_OOM, "device object of %zu bytes", sizeof *d);
        d->base.vt = vt;
        mpscy_count_alloc(&d->base.stats, sizeof *d);
        d->device = (void *)CFBridgingRetain(mtl);
        d->queue = (void *)CFBridgingRetain(queue);
        *out = &d->base;
        return MPSCY_OK;
    }
}

static void metal_device_destroy(mpscy_device dev) {
    metal_device *d = (metal_device *)dev;
    @autoreleasepool {
        if (d->queue) CFBridgingRelease(d->queue);
        if (d->device) CFBridgingRelease(d->device);
    }
    free(d);
}

static int metal_device_info(mpscy_device dev, mpscy_device_info *out, char *err, size_t n) {
    (void)err; (void)n;
    @autoreleasepool {
        id<MTLDevice> mtl = metal_mtl_device(dev);
        snprintf(out->backend, sizeof out->backend, "metal");
        const char *name = mtl.name.UTF8String;
        snprintf(out->name, sizeof out->name, "%s", name ? name : "Metal device");
        out->unified_memory = mtl.hasUnifiedMemory ? 1 : 0;
        out->threads = 0;  /* Metal does not report its core count */
        out->memory_bytes = (int64_t)mtl.recommendedMaxWorkingSetSize;
        return MPSCY_OK;
    }
}

const mpscy_backend mpscy_metal_backend = {
    .name = "metal",
    .device_create = metal_device_create,
    .device_destroy = metal_device_destroy,
    .device_info = metal_device_info,
    .buffer_create = metal_buffer_create,
    .buffer_destroy = metal_buffer_destroy,
    .buffer_read = metal_buffer_read,
    .buffer_write = metal_buffer_write,
    .graph_build = metal_graph_build,
    .graph_destroy = metal_graph_destroy,
    .graph_io = metal_graph_io,
    .tensor_read = metal_tensor_read,
    .tensor_write = metal_tensor_write,
    .graph_step = metal_graph_step,
    .graph_predict = metal_graph_predict,
};
