/* MetalPerformanceShadersGraph.h — STAND-IN for the syntax check only (check/run.sh), never
 * for a build: exactly the MPSGraph classes, enums and selectors the metal backend uses, each
 * transcribed from Apple's headers (MPSGraphCore.h, MPSGraphDevice.h, MPSGraphTensorData.h,
 * MPSGraph.h, MPSGraphExecutable.h and the ops category headers). ../../API_NOTES.md names the
 * header version each was checked against. */
#ifndef MPSCY_CHECK_MPSGRAPH_H
#define MPSCY_CHECK_MPSGRAPH_H

#import <MetalPerformanceShaders/MetalPerformanceShaders.h>

/* MPSGraphCore.h */
typedef enum MPSGraphTensorNamedDataLayout : NSUInteger {
    MPSGraphTensorNamedDataLayoutNCHW = 0,
    MPSGraphTensorNamedDataLayoutNHWC = 1,
    MPSGraphTensorNamedDataLayoutOIHW = 2,
    MPSGraphTensorNamedDataLayoutHWIO = 3,
} MPSGraphTensorNamedDataLayout;

typedef enum MPSGraphPaddingStyle : NSUInteger {
    MPSGraphPaddingStyleExplicit = 0,
    MPSGraphPaddingStyleTF_VALID = 1,
    MPSGraphPaddingStyleTF_SAME = 2,
} MPSGraphPaddingStyle;

@interface MPSGraphObject : NSObject
@end

@interface MPSGraphType : MPSGraphObject <NSCopying>
@end

@interface MPSGraphShapedType : MPSGraphType
@property (readwrite, copy) MPSShape *shape;
@property (readwrite) MPSDataType dataType;
- (instancetype)initWithShape:(MPSShape *)shape dataType:(MPSDataType)dataType;
@end

/* MPSGraphTensor.h, MPSGraphOperation.h */
@interface MPSGraphTensor : MPSGraphObject <NSCopying>
@end

@interface MPSGraphOperation : MPSGraphObject <NSCopying>
@end

/* MPSGraphDevice.h */
@interface MPSGraphDevice : MPSGraphObject
+ (instancetype)deviceWithMTLDevice:(id<MTLDevice>)metalDevice;
@end

/* MPSGraphTensorData.h */
@interface MPSGraphTensorData : MPSGraphObject
- (instancetype)initWithMTLBuffer:(id<MTLBuffer>)buffer shape:(MPSShape *)shape dataType:(MPSDataType)dataType;
@end

/* MPSGraph.h, MPSGraphExecutable.h */
@interface MPSGraphCompilationDescriptor : MPSGraphObject
@end

@interface MPSGraphExecutableExecutionDescriptor : MPSGraphObject
@end

@interface MPSGraphExecutable : MPSGraphObject
@property (readonly, atomic) NSArray<MPSGraphTensor *> *feedTensors;
@property (readonly, atomic) NSArray<MPSGraphTensor *> *targetTensors;
- (NSArray<MPSGraphTensorData *> *)encodeToCommandBuffer:(MPSCommandBuffer *)commandBuffer
                                             inputsArray:(NSArray<MPSGraphTensorData *> *)inputsArray
                                            resultsArray:(NSArray<MPSGraphTensorData *> *)resultsArray
                                     executionDescriptor:(MPSGraphExecutableExecutionDescriptor *)executionDescriptor;
@end

typedef NSDictionary<MPSGraphTensor *, MPSGraphShapedType *> MPSGraphTensorShapedTypeDictionary;

@interface MPSGraph : MPSGraphObject
+ (instancetype)new;
- (MPSGraphExecutable *)compileWithDevice:(MPSGraphDevice *)device
                                    feeds:(MPSGraphTensorShapedTypeDictionary *)feeds
                            targetTensors:(NSArray<MPSGraphTensor *> *)targetTensors
                         targetOperations:(NSArray<MPSGraphOperation *> *)targetOperations
                    compilationDescriptor:(MPSGraphCompilationDescriptor *)compilationDescriptor;

/* MPSGraphMemoryOps.h */
- (MPSGraphTensor *)placeholderWithShape:(MPSShape *)shape dataType:(MPSDataType)dataType name:(NSString *)name;
- (MPSGraphTensor *)constantWithScalar:(double)scalar dataType:(MPSDataType)dataType;
- (MPSGraphTensor *)constantWithScalar:(double)scalar shape:(MPSShape *)shape dataType:(MPSDataType)dataType;
- (MPSGraphTensor *)constantWithData:(NSData *)data shape:(MPSShape *)shape dataType:(MPSDataType)dataType;

/* MPSGraphArithmeticOps.h */
- (MPSGraphTensor *)identityWithTensor:(MPSGraphTensor *)tensor name:(NSString *)name;
- (MPSGraphTensor *)exponentWithTensor:(MPSGraphTensor *)tensor name:(NSString *)name;
- (MPSGraphTensor *)logarithmWithTensor:(MPSGraphTensor *)tensor name:(NSString *)name;
- (MPSGraphTensor *)squareRootWithTensor:(MPSGraphTensor *)tensor name:(NSString *)name;
- (MPSGraphTensor *)absoluteWithTensor:(MPSGraphTensor *)tensor name:(NSString *)name;
- (MPSGraphTensor *)negativeWithTensor:(MPSGraphTensor *)tensor name:(NSString *)name;
- (MPSGraphTensor *)tanhWithTensor:(MPSGraphTensor *)tensor name:(NSString *)name;
- (MPSGraphTensor *)isFiniteWithTensor:(MPSGraphTensor *)tensor name:(NSString *)name;
- (MPSGraphTensor *)isNaNWithTensor:(MPSGraphTensor *)tensor name:(NSString *)name;
- (MPSGraphTensor *)erfWithTensor:(MPSGraphTensor *)tensor name:(NSString *)name;
- (MPSGraphTensor *)additionWithPrimaryTensor:(MPSGraphTensor *)primaryTensor
                              secondaryTensor:(MPSGraphTensor *)secondaryTensor name:(NSString *)name;
- (MPSGraphTensor *)subtractionWithPrimaryTensor:(MPSGraphTensor *)primaryTensor
                                 secondaryTensor:(MPSGraphTensor *)secondaryTensor name:(NSString *)name;
- (MPSGraphTensor *)multiplicationWithPrimaryTensor:(MPSGraphTensor *)primaryTensor
                                    secondaryTensor:(MPSGraphTensor *)secondaryTensor name:(NSString *)name;
- (MPSGraphTensor *)divisionWithPrimaryTensor:(MPSGraphTensor *)primaryTensor
                              secondaryTensor:(MPSGraphTensor *)secondaryTensor name:(NSString *)name;
- (MPSGraphTensor *)equalWithPrimaryTensor:(MPSGraphTensor *)primaryTensor
                           secondaryTensor:(MPSGraphTensor *)secondaryTensor name:(NSString *)name;
- (MPSGraphTensor *)notEqualWithPrimaryTensor:(MPSGraphTensor *)primaryTensor
                              secondaryTensor:(MPSGraphTensor *)secondaryTensor name:(NSString *)name;
- (MPSGraphTensor *)lessThanWithPrimaryTensor:(MPSGraphTensor *)primaryTensor
                              secondaryTensor:(MPSGraphTensor *)secondaryTensor name:(NSString *)name;
- (MPSGraphTensor *)greaterThanWithPrimaryTensor:(MPSGraphTensor *)primaryTensor
                                 secondaryTensor:(MPSGraphTensor *)secondaryTensor name:(NSString *)name;
- (MPSGraphTensor *)lessThanOrEqualToWithPrimaryTensor:(MPSGraphTensor *)primaryTensor
                                       secondaryTensor:(MPSGraphTensor *)secondaryTensor name:(NSString *)name;
- (MPSGraphTensor *)logicalANDWithPrimaryTensor:(MPSGraphTensor *)primaryTensor
                                secondaryTensor:(MPSGraphTensor *)secondaryTensor name:(NSString *)name;
- (MPSGraphTensor *)selectWithPredicateTensor:(MPSGraphTensor *)predicateTensor
                          truePredicateTensor:(MPSGraphTensor *)truePredicateTensor
                         falsePredicateTensor:(MPSGraphTensor *)falseSelectTensor name:(NSString *)name;

/* MPSGraphReductionOps.h */
- (MPSGraphTensor *)reductionSumWithTensor:(MPSGraphTensor *)tensor axes:(NSArray<NSNumber *> *)axes
                                      name:(NSString *)name;
- (MPSGraphTensor *)reductionMaximumWithTensor:(MPSGraphTensor *)tensor axes:(NSArray<NSNumber *> *)axes
                                          name:(NSString *)name;
- (MPSGraphTensor *)reductionMinimumWithTensor:(MPSGraphTensor *)tensor axes:(NSArray<NSNumber *> *)axes
                                          name:(NSString *)name;
- (MPSGraphTensor *)reductionArgMaximumWithTensor:(MPSGraphTensor *)tensor axis:(NSInteger)axis
                                             name:(NSString *)name;

/* MPSGraphNormalizationOps.h */
- (MPSGraphTensor *)meanOfTensor:(MPSGraphTensor *)tensor axes:(NSArray<NSNumber *> *)axes name:(NSString *)name;

/* MPSGraphTensorShapeOps.h */
- (MPSGraphTensor *)reshapeTensor:(MPSGraphTensor *)tensor withShape:(MPSShape *)shape name:(NSString *)name;
- (MPSGraphTensor *)transposeTensor:(MPSGraphTensor *)tensor dimension:(NSUInteger)dimensionIndex
                      withDimension:(NSUInteger)dimensionIndex2 name:(NSString *)name;
- (MPSGraphTensor *)sliceTensor:(MPSGraphTensor *)tensor dimension:(NSUInteger)dimensionIndex
                          start:(NSInteger)start length:(NSInteger)length name:(NSString *)name;
- (MPSGraphTensor *)concatTensors:(NSArray<MPSGraphTensor *> *)tensors dimension:(NSInteger)dimensionIndex
                             name:(NSString *)name;
- (MPSGraphTensor *)broadcastTensor:(MPSGraphTensor *)tensor toShape:(MPSShape *)shape name:(NSString *)name;
- (MPSGraphTensor *)castTensor:(MPSGraphTensor *)tensor toType:(MPSDataType)type name:(NSString *)name;

/* MPSGraphMatrixMultiplicationOps.h */
- (MPSGraphTensor *)matrixMultiplicationWithPrimaryTensor:(MPSGraphTensor *)primaryTensor
                                          secondaryTensor:(MPSGraphTensor *)secondaryTensor
                                                     name:(NSString *)name;

/* MPSGraphActivationOps.h */
- (MPSGraphTensor *)softMaxWithTensor:(MPSGraphTensor *)tensor axis:(NSInteger)axis name:(NSString *)name;

/* MPSGraphOneHotOps.h */
- (MPSGraphTensor *)oneHotWithIndicesTensor:(MPSGraphTensor *)indicesTensor depth:(NSUInteger)depth
                                   dataType:(MPSDataType)dataType name:(NSString *)name;
@end

/* MPSGraphConvolutionOps.h */
@interface MPSGraphConvolution2DOpDescriptor : MPSGraphObject <NSCopying>
+ (instancetype)descriptorWithStrideInX:(NSUInteger)strideInX
                              strideInY:(NSUInteger)strideInY
                        dilationRateInX:(NSUInteger)dilationRateInX
                        dilationRateInY:(NSUInteger)dilationRateInY
                                 groups:(NSUInteger)groups
                            paddingLeft:(NSUInteger)paddingLeft
                           paddingRight:(NSUInteger)paddingRight
                             paddingTop:(NSUInteger)paddingTop
                          paddingBottom:(NSUInteger)paddingBottom
                           paddingStyle:(MPSGraphPaddingStyle)paddingStyle
                             dataLayout:(MPSGraphTensorNamedDataLayout)dataLayout
                          weightsLayout:(MPSGraphTensorNamedDataLayout)weightsLayout;
@end

@interface MPSGraph (MPSGraphConvolutionOps)
- (MPSGraphTensor *)convolution2DWithSourceTensor:(MPSGraphTensor *)source
                                    weightsTensor:(MPSGraphTensor *)weights
                                       descriptor:(MPSGraphConvolution2DOpDescriptor *)descriptor
                                             name:(NSString *)name;
- (MPSGraphTensor *)convolution2DDataGradientWithIncomingGradientTensor:(MPSGraphTensor *)incomingGradient
                                                          weightsTensor:(MPSGraphTensor *)weights
                                                            outputShape:(MPSShape *)outputShape
                                           forwardConvolutionDescriptor:(MPSGraphConvolution2DOpDescriptor *)forwardConvolutionDescriptor
                                                                   name:(NSString *)name;
- (MPSGraphTensor *)convolution2DWeightsGradientWithIncomingGradientTensor:(MPSGraphTensor *)incomingGradient
                                                              sourceTensor:(MPSGraphTensor *)source
                                                               outputShape:(MPSShape *)outputShape
                                              forwardConvolutionDescriptor:(MPSGraphConvolution2DOpDescriptor *)forwardConvolutionDescriptor
                                                                      name:(NSString *)name;
@end

/* MPSGraphPoolingOps.h */
@interface MPSGraphPooling2DOpDescriptor : MPSGraphObject <NSCopying>
@property (readwrite, nonatomic) BOOL ceilMode;
@property (readwrite, nonatomic) BOOL includeZeroPadToAverage;
+ (instancetype)descriptorWithKernelWidth:(NSUInteger)kernelWidth
                             kernelHeight:(NSUInteger)kernelHeight
                                strideInX:(NSUInteger)strideInX
                                strideInY:(NSUInteger)strideInY
                          dilationRateInX:(NSUInteger)dilationRateInX
                          dilationRateInY:(NSUInteger)dilationRateInY
                              paddingLeft:(NSUInteger)paddingLeft
                             paddingRight:(NSUInteger)paddingRight
                               paddingTop:(NSUInteger)paddingTop
                            paddingBottom:(NSUInteger)paddingBottom
                             paddingStyle:(MPSGraphPaddingStyle)paddingStyle
                               dataLayout:(MPSGraphTensorNamedDataLayout)dataLayout;
@end

@interface MPSGraph (MPSGraphPoolingOps)
- (MPSGraphTensor *)maxPooling2DWithSourceTensor:(MPSGraphTensor *)source
                                      descriptor:(MPSGraphPooling2DOpDescriptor *)descriptor
                                            name:(NSString *)name;
- (MPSGraphTensor *)maxPooling2DGradientWithGradientTensor:(MPSGraphTensor *)gradient
                                              sourceTensor:(MPSGraphTensor *)source
                                                descriptor:(MPSGraphPooling2DOpDescriptor *)descriptor
                                                      name:(NSString *)name;
- (MPSGraphTensor *)avgPooling2DWithSourceTensor:(MPSGraphTensor *)source
                                      descriptor:(MPSGraphPooling2DOpDescriptor *)descriptor
                                            name:(NSString *)name;
- (MPSGraphTensor *)avgPooling2DGradientWithGradientTensor:(MPSGraphTensor *)gradient
                                              sourceTensor:(MPSGraphTensor *)source
                                                descriptor:(MPSGraphPooling2DOpDescriptor *)descriptor
                                                      name:(NSString *)name;
@end

/* MPSGraphResizeOps.h: the enum and the category are macOS 11 */
typedef enum MPSGraphResizeMode : NSUInteger {
    MPSGraphResizeNearest = 0,
    MPSGraphResizeBilinear = 1,
} MPSGraphResizeMode;

@interface MPSGraph (MPSGraphResizeOps)
- (MPSGraphTensor *)resizeTensor:(MPSGraphTensor *)imagesTensor
                            size:(MPSShape *)size
                            mode:(MPSGraphResizeMode)mode
                    centerResult:(BOOL)centerResult
                    alignCorners:(BOOL)alignCorners
                          layout:(MPSGraphTensorNamedDataLayout)layout
                            name:(NSString *)name;
- (MPSGraphTensor *)resizeWithGradientTensor:(MPSGraphTensor *)gradient
                                       input:(MPSGraphTensor *)input
                                        mode:(MPSGraphResizeMode)mode
                                centerResult:(BOOL)centerResult
                                alignCorners:(BOOL)alignCorners
                                      layout:(MPSGraphTensorNamedDataLayout)layout
                                        name:(NSString *)name;
@end

#endif
