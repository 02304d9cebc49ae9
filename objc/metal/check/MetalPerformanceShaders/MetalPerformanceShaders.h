/* MetalPerformanceShaders.h — STAND-IN for the syntax check only (check/run.sh), never for a
 * build: MPSDataType, MPSShape and MPSCommandBuffer as Apple's MPSCore headers declare them
 * (MPSCoreTypes.h, MPSCommandBuffer.h). */
#ifndef MPSCY_CHECK_MPS_H
#define MPSCY_CHECK_MPS_H

#import <Metal/Metal.h>

typedef enum MPSDataType : uint32_t {
    MPSDataTypeFloatBit = 0x10000000,
    MPSDataTypeSignedBit = 0x20000000,
    MPSDataTypeBool = 0x80000000 | 8,
    MPSDataTypeFloat32 = 0x10000000 | 32,
    MPSDataTypeInt32 = 0x20000000 | 32,
} MPSDataType;

typedef NSArray<NSNumber *> MPSShape;

@interface MPSCommandBuffer : NSObject <MTLCommandBuffer>
+ (instancetype)commandBufferFromCommandQueue:(id<MTLCommandQueue>)commandQueue;
@property (readonly, retain) id<MTLCommandBuffer> rootCommandBuffer;
@end

#endif
