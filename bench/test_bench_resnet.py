"""Training step of a small residual net on 3x32x32 inputs at batch 64 (the README's residual
block: Conv2D - BatchNorm - ReLU - Conv2D - BatchNorm, added to the input or to a strided 1x1
projection, then ReLU), Adam, sparse cross-entropy, against PyTorch CPU eager in the same run:
a 16-channel stem, blocks of 16, 32 (stride 2) and 64 (stride 2) channels, GlobalAvgPool2D and
Dense(10). What the README CNN's benchmark does not reach: BatchNorm, Add, GlobalAvgPool2D and
1x1 convolutions. The gate ratio is mpscy's step over a reference workload of its matrix
products (each convolution as im2col GEMMs over the whole batch: forward, weight gradient and
input gradient) through numpy's BLAS; the rest of the step (normalization, pooling, the adds)
is what the ratio's excess measures."""

import mpscy
from mpscy import layers, optim

from conftest import compare_image_model, record, torch_adam_step

BATCH = 64
INPUT = (3, 32, 32)
BLOCKS = [(16, 1), (32, 2), (64, 2)]  # (channels, stride)


def block(x, channels, stride):
    h = layers.Conv2D(channels, 3, stride=stride, padding=1, bias=False)(x)
    h = layers.ReLU()(layers.BatchNorm()(h))
    h = layers.BatchNorm()(layers.Conv2D(channels, 3, padding=1, bias=False)(h))
    skip = x if stride == 1 and x.shape[0] == channels else layers.Conv2D(channels, 1, stride=stride)(x)
    return layers.ReLU()(layers.Add()([h, skip]))


def build():
    inputs = mpscy.Input(INPUT)
    h = layers.ReLU()(layers.BatchNorm()(layers.Conv2D(16, 3, padding=1, bias=False)(inputs)))
    for channels, stride in BLOCKS:
        h = block(h, channels, stride)
    model = mpscy.Model(inputs, layers.Dense(10)(layers.GlobalAvgPool2D()(h)))
    return mpscy.Engine(model, loss="sparse_cross_entropy", optimizer=optim.Adam(lr=1e-3), batch_size=BATCH,
                        device="cpu", seed=0)


def convs():
    """(in channels, out channels, kernel, stride, input size, whether its input gradient is
    computed) of every convolution, in order."""
    out, c, hw = [(3, 16, 3, 1, 32, False)], 16, 32
    for channels, stride in BLOCKS:
        out.append((c, channels, 3, stride, hw, True))
        out.append((channels, channels, 3, 1, hw // stride, True))
        if stride != 1 or c != channels:
            out.append((c, channels, 1, stride, hw, True))
        c, hw = channels, hw // stride
    return out


def gemm_shapes():
    """(m, k, n) of every matrix product of one training step."""
    shapes = []
    for cin, cout, k, stride, hw, dx in convs():
        oh = (hw + 2 * (k // 2) - k) // stride + 1
        kk, n = cin * k * k, BATCH * oh * oh
        shapes += [(cout, kk, n), (cout, n, kk)] + ([(kk, cout, n)] if dx else [])
    shapes += [(BATCH, 64, 10), (10, BATCH, 64), (BATCH, 10, 64)]
    return shapes


def torch_step(torch, x, y):
    torch.manual_seed(0)
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self, cin, channels, stride):
            super().__init__()
            self.c1 = nn.Conv2d(cin, channels, 3, stride, 1, bias=False)
            self.b1 = nn.BatchNorm2d(channels)
            self.c2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
            self.b2 = nn.BatchNorm2d(channels)
            self.skip = nn.Conv2d(cin, channels, 1, stride) if stride != 1 or cin != channels else nn.Identity()

        def forward(self, x):
            h = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
            return torch.relu(h + self.skip(x))

    stack, c = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()], 16
    for channels, stride in BLOCKS:
        stack.append(Block(c, channels, stride))
        c = channels
    model = nn.Sequential(*stack, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))
    return torch_adam_step(torch, model, x, y)


def test_resnet_step(benchmark):
    mpscy_s, ref_s, torch_s, flops = compare_image_model(benchmark, build(), gemm_shapes(), torch_step, BATCH, INPUT)
    record("resnet_3x32x32_b64", mpscy_s, ref_s, torch_s,
           f"{flops / 1e9:.1f} GFLOP in matrix products, {flops / mpscy_s / 1e9:.0f} GFLOP/s")
