"""The functional API: Add and Concatenate against float64 references (fan-out gradients that
accumulate, the same tensor twice, several model inputs), a residual block (conv-bn-relu-conv-bn
+ skip, relu) against a reference composed from layer_refs, a ResNet-style model with two
residual blocks training on the digits, eval versus train mode, and graph-building errors."""
import numpy as np
import pytest

import mpscy
from mpscy import layers, optim

import layer_refs as R

CONV3 = dict(kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1)
CONV1 = dict(kernel=(1, 1), stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1)


def params_of(P, name):
    return {k.split(".", 1)[1]: v.astype(np.float64) for k, v in P.items() if k.split(".", 1)[0] == name}


def engine_for(device, model, batch, **kw):
    return mpscy.Engine(model, loss="mse", batch_size=batch, device=device, seed=2, input_gradients=True, **kw)


def check(g, loss, ref_grads, dx):
    assert abs(g["loss"] - loss) <= 1e-5 * loss
    for k, v in ref_grads.items():
        assert R.rel_err(g[k], v) < 1e-4, k
    if isinstance(dx, list):
        for a, b in zip(g["input"], dx):
            assert R.rel_err(a, b) < 1e-4
    else:
        assert R.rel_err(g["input"], dx) < 1e-4


@pytest.mark.parametrize("merge", ["add", "concat_channels", "concat_width"])
def test_merge_reference_gradients_match_finite_differences(merge, rng):
    """The input gradients the tests below build by hand for Add and Concatenate (an Add fed by
    the input and two convolutions of it; a Concatenate of them along channels; of the input and
    a convolution along W) agree with central differences of the same float64 forward to 1e-6:
    the merges' own check, as test_layers' is for every single layer's reference."""
    pa = {"weight": rng.standard_normal((3, 3, 3, 3)), "bias": rng.standard_normal(3)}
    pb = {"weight": rng.standard_normal((3, 3, 1, 1)), "bias": rng.standard_normal(3)}
    x = rng.standard_normal((2, 3, 4, 5))

    def forward():
        ya, ca = R.conv2d_forward(x, pa, CONV3)
        yb, cb = R.conv2d_forward(x, pb, CONV1)
        y = {"add": lambda: x + ya + yb, "concat_channels": lambda: np.concatenate([ya, x, yb], 1),
             "concat_width": lambda: np.concatenate([x, ya], -1)}[merge]()
        return y, ca, cb

    y, ca, cb = forward()
    w = rng.standard_normal(y.shape)  # f = sum(w * y): d f / d y = w
    back_a, back_b = (lambda d: R.conv2d_backward(d, ca)[0]), (lambda d: R.conv2d_backward(d, cb)[0])
    dx = {"add": lambda: w + back_a(w) + back_b(w),
          "concat_channels": lambda: back_a(w[:, :3]) + w[:, 3:6] + back_b(w[:, 6:]),
          "concat_width": lambda: w[..., :5] + back_a(w[..., 5:])}[merge]()
    assert R.rel_err(dx, R.numeric_grad(lambda: float((forward()[0] * w).sum()), x)) < 1e-6


def test_add_of_branches_and_the_input_itself(device, rng):
    """y = x + conv3x3(x) + conv1x1(x): the input's gradient accumulates from three consumers."""
    x_in = mpscy.Input((3, 5, 6))
    a = layers.Conv2D(3, 3, padding=1, name="a")(x_in)
    b = layers.Conv2D(3, 1, name="b")(x_in)
    model = mpscy.Model(x_in, layers.Add(name="sum")([x_in, a, b]))
    assert model.output_shape == (3, 5, 6)
    engine = engine_for(device, model, 4)
    P = engine.get_parameters()
    x = rng.standard_normal((4, 3, 5, 6)).astype(np.float32)
    x64 = x.astype(np.float64)
    ya, ca = R.conv2d_forward(x64, params_of(P, "a"), CONV3)
    yb, cb = R.conv2d_forward(x64, params_of(P, "b"), CONV1)
    y = x64 + ya + yb
    t = rng.standard_normal(y.shape).astype(np.float32)
    loss, dy = R.loss_ref("mse", y, t)
    dxa, ga = R.conv2d_backward(dy, ca)
    dxb, gb = R.conv2d_backward(dy, cb)
    grads = {f"a.{k}": v for k, v in ga.items()} | {f"b.{k}": v for k, v in gb.items()}
    check(engine.gradients(x, t), loss, grads, dy + dxa + dxb)
    assert R.rel_err(engine.predict(x), y) < 1e-5


def test_add_of_one_tensor_twice(device, rng):
    x_in = mpscy.Input((6,))
    h = layers.Dense(4, name="d")(x_in)
    model = mpscy.Model(x_in, layers.Add()([h, h]))
    engine = engine_for(device, model, 3)
    P = params_of(engine.get_parameters(), "d")
    x = rng.standard_normal((3, 6)).astype(np.float32)
    h64 = x.astype(np.float64) @ P["weight"].T + P["bias"]
    t = rng.standard_normal((3, 4)).astype(np.float32)
    loss, dy = R.loss_ref("mse", 2 * h64, t)
    dh = 2 * dy
    check(engine.gradients(x, t), loss, {"d.weight": dh.T @ x, "d.bias": dh.sum(0)}, dh @ P["weight"])


@pytest.mark.parametrize("axis", [1, -3])
def test_concatenate_channels(device, rng, axis):
    """Concatenate(axis=1) joins (C, H, W) images along channels; -3 names the same axis."""
    x_in = mpscy.Input((2, 4, 5))
    a = layers.Conv2D(3, 3, padding=1, name="a")(x_in)
    b = layers.Conv2D(2, 1, name="b")(x_in)
    model = mpscy.Model(x_in, layers.Concatenate(axis=axis)([a, x_in, b]))
    assert model.output_shape == (7, 4, 5)
    engine = engine_for(device, model, 3)
    P = engine.get_parameters()
    x = rng.standard_normal((3, 2, 4, 5)).astype(np.float32)
    x64 = x.astype(np.float64)
    ya, ca = R.conv2d_forward(x64, params_of(P, "a"), CONV3)
    yb, cb = R.conv2d_forward(x64, params_of(P, "b"), CONV1)
    y = np.concatenate([ya, x64, yb], 1)
    t = rng.standard_normal(y.shape).astype(np.float32)
    loss, dy = R.loss_ref("mse", y, t)
    dxa, ga = R.conv2d_backward(dy[:, :3], ca)
    dxb, gb = R.conv2d_backward(dy[:, 5:], cb)
    grads = {f"a.{k}": v for k, v in ga.items()} | {f"b.{k}": v for k, v in gb.items()}
    check(engine.gradients(x, t), loss, grads, dxa + dy[:, 3:5] + dxb)
    assert R.rel_err(engine.predict(x), y) < 1e-5


def test_concatenate_inner_axis_of_images(device, rng):
    """axis=-1 joins along W: blocks interleave per (sample, channel, row)."""
    x_in = mpscy.Input((2, 3, 4))
    model = mpscy.Model(x_in, layers.Concatenate(axis=-1)([x_in, layers.Conv2D(2, (1, 3), name="c")(x_in)]))
    assert model.output_shape == (2, 3, 6)
    engine = engine_for(device, model, 2)
    x = rng.standard_normal((2, 2, 3, 4)).astype(np.float32)
    yc, cc = R.conv2d_forward(x.astype(np.float64), params_of(engine.get_parameters(), "c"),
                              dict(CONV1, kernel=(1, 3)))
    y = np.concatenate([x.astype(np.float64), yc], -1)
    t = rng.standard_normal(y.shape).astype(np.float32)
    loss, dy = R.loss_ref("mse", y, t)
    dxc, gc = R.conv2d_backward(dy[..., 4:], cc)
    check(engine.gradients(x, t), loss, {f"c.{k}": v for k, v in gc.items()}, dy[..., :4] + dxc)


def test_two_inputs_concatenated_features(device, rng):
    """Two model inputs, a Dense branch each, concatenated (axis=-1) into a Dense head; x is a
    list and gradients() returns one input gradient per input."""
    a_in, b_in = mpscy.Input((5,), name="left"), mpscy.Input((3,), name="right")
    h = layers.Concatenate(axis=-1)([layers.Dense(4, name="da")(a_in), layers.Dense(2, name="db")(b_in)])
    model = mpscy.Model([a_in, b_in], layers.Dense(3, name="head")(h))
    engine = engine_for(device, model, 4)
    P = engine.get_parameters()
    xa, xb = rng.standard_normal((4, 5)).astype(np.float32), rng.standard_normal((4, 3)).astype(np.float32)
    pa, pb, ph = params_of(P, "da"), params_of(P, "db"), params_of(P, "head")
    ha, hb = xa @ pa["weight"].T + pa["bias"], xb @ pb["weight"].T + pb["bias"]
    hc = np.concatenate([ha, hb], 1)
    y = hc @ ph["weight"].T + ph["bias"]
    t = rng.standard_normal((4, 3)).astype(np.float32)
    loss, dy = R.loss_ref("mse", y, t)
    dhc = dy @ ph["weight"]
    grads = {"head.weight": dy.T @ hc, "head.bias": dy.sum(0), "da.weight": dhc[:, :4].T @ xa,
             "da.bias": dhc[:, :4].sum(0), "db.weight": dhc[:, 4:].T @ xb, "db.bias": dhc[:, 4:].sum(0)}
    check(engine.gradients([xa, xb], t), loss, grads, [dhc[:, :4] @ pa["weight"], dhc[:, 4:] @ pb["weight"]])
    assert R.rel_err(engine.predict([xa, xb]), y) < 1e-5
    assert engine.step([xa, xb], t).batch_size == 4
    # the wrong number of arrays is the same InvalidArgumentError from every call, fit's too, and
    # changes nothing
    before = engine.get_parameters()
    calls = {"step": lambda x: engine.step(x, t), "predict": engine.predict, "gradients": lambda x: engine.gradients(x, t),
             "evaluate": lambda x: engine.evaluate(x, t), "fit": lambda x: engine.fit(x, t, verbose=0)}
    for name, call in calls.items():
        for x in (xa, [xa], [xa, xb, xb]):
            with pytest.raises(mpscy.InvalidArgumentError, match="this model has 2 inputs: pass x as a list of 2 arrays"):
                call(x)
    after = engine.get_parameters()
    assert all(np.array_equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------ residual blocks


def residual_block(x, c, name, stride=1):
    """conv-bn-relu-conv-bn + skip (a 1x1 projection when the shape changes), then relu."""
    h = layers.Conv2D(c, 3, stride=stride, padding=1, bias=False, name=f"{name}_c1")(x)
    h = layers.ReLU(name=f"{name}_r1")(layers.BatchNorm(name=f"{name}_bn1")(h))
    h = layers.BatchNorm(name=f"{name}_bn2")(layers.Conv2D(c, 3, padding=1, bias=False, name=f"{name}_c2")(h))
    skip = x if stride == 1 and x.shape[0] == c else layers.Conv2D(c, 1, stride=stride, name=f"{name}_proj")(x)
    return layers.ReLU(name=f"{name}_out")(layers.Add(name=f"{name}_add")([h, skip]))


def test_residual_block_matches_reference(device, rng):
    """One block in train mode (batch statistics) against the composed float64 references:
    loss, every parameter gradient and d loss / d x (skip and branch gradients summed)."""
    x_in = mpscy.Input((4, 5, 5))
    model = mpscy.Model(x_in, residual_block(x_in, 4, "blk"))
    engine = engine_for(device, model, 3)
    P = engine.get_parameters()
    bn_p = {f"blk_bn{i}": {"weight": rng.uniform(0.5, 1.5, 4), "bias": rng.standard_normal(4)} for i in (1, 2)}
    engine.set_parameters({f"{k}.{s}": v.astype(np.float32) for k, d in bn_p.items() for s, v in d.items()},
                          strict=False)
    P = engine.get_parameters()
    x = rng.standard_normal((3, 4, 5, 5)).astype(np.float32)
    bn_opts = dict(eps=1e-5, train=True)
    conv = dict(CONV3)
    h1, c1 = R.conv2d_forward(x.astype(np.float64), params_of(P, "blk_c1"), conv)
    h2, c2 = R.batchnorm_forward(h1, {k: v for k, v in params_of(P, "blk_bn1").items() if "running" not in k}, bn_opts)
    h3, c3 = R.activation_forward(h2, {}, dict(kind="relu"))
    h4, c4 = R.conv2d_forward(h3, params_of(P, "blk_c2"), conv)
    h5, c5 = R.batchnorm_forward(h4, {k: v for k, v in params_of(P, "blk_bn2").items() if "running" not in k}, bn_opts)
    y, c6 = R.activation_forward(h5 + x, {}, dict(kind="relu"))
    t = rng.standard_normal(y.shape).astype(np.float32)
    loss, dy = R.loss_ref("mse", y, t)
    ds, _ = R.activation_backward(dy, c6)
    dh4, g5 = R.batchnorm_backward(ds, c5)
    dh3, g4 = R.conv2d_backward(dh4, c4)
    dh2, _ = R.activation_backward(dh3, c3)
    dh1, g2 = R.batchnorm_backward(dh2, c2)
    dx, g1 = R.conv2d_backward(dh1, c1)
    grads = {}
    for name, g in (("blk_c1", g1), ("blk_bn1", g2), ("blk_c2", g4), ("blk_bn2", g5)):
        grads.update({f"{name}.{k}": v for k, v in g.items()})
    check(engine.gradients(x, t), loss, grads, dx + ds)


def resnet(classes=10):
    x = mpscy.Input((1, 8, 8))
    h = layers.ReLU()(layers.BatchNorm()(layers.Conv2D(16, 3, padding=1, bias=False)(x)))
    h = residual_block(h, 16, "block1")
    h = residual_block(h, 32, "block2", stride=2)
    return mpscy.Model(x, layers.Dense(classes)(layers.GlobalAvgPool2D()(h)))


def test_resnet_with_two_residual_blocks_trains_on_digits(device):
    """Stem, an identity block and a strided block with a projection, global pooling, Dense: the
    training loss falls below a twentieth of its first step within 6 epochs and held-out
    accuracy passes 0.95; predict/evaluate use the running statistics (eval mode)."""
    x, y = mpscy.datasets.load_digits(images=True)
    x_train, y_train, x_test, y_test = mpscy.datasets.train_test_split(x, y, 0.2, seed=0)
    engine = mpscy.Engine(resnet(), loss="sparse_cross_entropy", optimizer=optim.Adam(lr=3e-3),
                          batch_size=64, device=device, seed=0)
    names = [n for n, _, _, _ in engine.model.summary_rows()]
    assert names.count("block1_add") == 1 and "block2_proj" in names
    rng = np.random.Generator(np.random.PCG64(0))
    first, epoch_losses = None, []
    for epoch in range(6):
        order = rng.permutation(len(x_train))
        total = 0.0
        for i in range(0, len(order), 64):
            idx = order[i:i + 64]
            r = engine.step(x_train[idx], y_train[idx])
            first = r.loss if first is None else first
            total += r.loss * len(idx)
        epoch_losses.append(total / len(order))
    assert epoch_losses[-1] < 0.05 * first, (first, epoch_losses)
    result = engine.evaluate(x_test, y_test)
    assert result["accuracy"] >= 0.95, result
    p1, p2 = engine.predict(x_test[:50]), engine.predict(x_test[:50])
    assert np.array_equal(p1, p2)  # eval mode is deterministic and changes no statistics


def test_model_summary_and_node_order():
    x = mpscy.Input((3,), name="features")
    a = layers.Dense(4, name="left")(x)
    b = layers.Dense(4, name="right")(x)
    model = mpscy.Model(x, layers.Add()([a, b]))
    rows = model.summary_rows()
    assert [r[0] for r in rows] == ["features", "left", "right", "add_2"]
    assert rows[-1][2] == (None, 4)
    assert model.native_layers()[3]["inputs"] == [1, 2]


# ------------------------------------------------------------------ errors


def test_joins_of_more_than_eight_tensors(device, rng):
    """Concatenate of 11 tensors and Add of 10 (a DenseNet block's torch.cat of many): chains of
    joins of at most 8 (the native node's inputs), summing left to right. Against NumPy in float64
    (forward, every gradient, the input's), and the same bits as the chain written by hand."""
    def build(by_hand):
        x_in = mpscy.Input((2, 3, 4))
        convs = [layers.Conv2D(1 + k % 3, 1, name=f"c{k}")(x_in) for k in range(11)]
        adds = [layers.Conv2D(3, 1, name=f"a{k}")(x_in) for k in range(9)]
        if by_hand:
            cat = layers.Concatenate(name="cat")(layers.Concatenate()(convs[:8]), *convs[8:])
            add = layers.Add(name="add")(layers.Add()(adds[:8]), adds[8], adds[8])
        else:
            cat = layers.Concatenate(name="cat")(convs)
            add = layers.Add(name="add")(adds + [adds[8]])
        return mpscy.Model(x_in, layers.Concatenate()([cat, add]))
    model = build(False)
    assert model.output_shape == (sum(1 + k % 3 for k in range(11)) + 3, 3, 4)
    assert sum(type(n.layer).__name__ == "Concatenate" for n in model.nodes) == 3
    assert sum(type(n.layer).__name__ == "Add" for n in model.nodes) == 2
    engine, hand = engine_for(device, model, 3), engine_for(device, build(True), 3)
    P = engine.get_parameters()
    hand.set_parameters(P)
    x = rng.standard_normal((3, 2, 3, 4)).astype(np.float32)
    x64 = x.astype(np.float64)
    outs = [R.conv2d_forward(x64, params_of(P, f"c{k}"), CONV1) for k in range(11)]
    adds = [R.conv2d_forward(x64, params_of(P, f"a{k}"), CONV1) for k in range(9)]
    y = np.concatenate([o for o, _ in outs] + [sum(a for a, _ in adds) + adds[8][0]], 1)
    t = rng.standard_normal(y.shape).astype(np.float32)
    loss, dy = R.loss_ref("mse", y, t)
    grads, dx, at = {}, 0.0, 0
    for k, (_, cache) in enumerate(outs):
        w = 1 + k % 3
        d, g = R.conv2d_backward(dy[:, at:at + w], cache)
        grads |= {f"c{k}.{n}": v for n, v in g.items()}
        dx, at = dx + d, at + w
    for k, (_, cache) in enumerate(adds):
        d, g = R.conv2d_backward(dy[:, at:] * (2 if k == 8 else 1), cache)
        grads |= {f"a{k}.{n}": v for n, v in g.items()}
        dx = dx + d
    got = engine.gradients(x, t)
    check(got, loss, grads, dx)
    assert R.rel_err(engine.predict(x), y) < 1e-5
    assert np.array_equal(engine.predict(x), hand.predict(x))
    mine = hand.gradients(x, t)
    assert all(np.array_equal(got[k], mine[k]) for k in got if k != "loss")


def test_made_up_names_pass_over_the_names_given():
    """An unnamed layer whose made-up name (<prefix>_<position>) another layer was given takes
    <name>_1 (the model was refused: "two layers are named 'dense_1'"); two given names that
    clash are still refused."""
    x = mpscy.Input(4)
    out = layers.Dense(2)(layers.Dense(3, name="dense_1")(x))
    assert [n.name for n in mpscy.Model(x, out).nodes] == ["input", "dense_1", "dense_1_1"]
    seq = mpscy.Sequential([layers.Dense(3, name="dense_1"), layers.Dense(2)], input_shape=(4,))
    assert [n.name for n in seq.nodes] == ["input", "dense_1", "dense_1_1"]
    x = mpscy.Input(4)
    with pytest.raises(mpscy.InvalidArgumentError, match="two layers are named 'a'"):
        mpscy.Model(x, layers.Dense(2, name="a")(layers.Dense(3, name="a")(x)))


def test_graph_building_errors():
    x = mpscy.Input((3, 4, 4))
    a = layers.Conv2D(2, 3, padding=1)(x)
    b = layers.Conv2D(3, 3, padding=1)(x)
    with pytest.raises(mpscy.ShapeError, match="Add input 1"):
        layers.Add()([a, b])
    with pytest.raises(mpscy.InvalidArgumentError, match="at least 2"):
        layers.Add()([a])
    with pytest.raises(mpscy.ShapeError, match="off the concatenation axis"):
        layers.Concatenate(axis=2)([a, b])
    with pytest.raises(mpscy.ShapeError, match="axis 0 is the batch"):
        layers.Concatenate(axis=0)([a, b])
    conv = layers.Conv2D(2, 3)
    conv(x)
    with pytest.raises(mpscy.InvalidArgumentError, match="already called"):
        conv(x)
    with pytest.raises(mpscy.InvalidArgumentError, match="mpscy tensors"):
        layers.ReLU()(np.zeros(3))
    with pytest.raises(mpscy.InvalidArgumentError, match="functional API"):
        mpscy.Sequential([layers.Add()], input_shape=(3,))
    other = mpscy.Input((3, 4, 4))
    with pytest.raises(mpscy.InvalidArgumentError, match="not in the model's inputs"):
        mpscy.Model(x, layers.Add()([a, layers.Conv2D(2, 3, padding=1)(other)]))
    with pytest.raises(mpscy.InvalidArgumentError, match="does not reach the output"):
        mpscy.Model([x, other], a)
    with pytest.raises(mpscy.InvalidArgumentError, match="named"):
        mpscy.Model(x, layers.Add()([layers.ReLU(name="r")(a), layers.ReLU(name="r")(a)]))


def _nan_refused(engine, x, t):
    """The output is NaN in every row, and a step fails with every parameter as it was."""
    assert np.isnan(engine.predict(x)).all()
    before = engine.get_parameters()
    with pytest.raises(mpscy.NonFiniteError):
        engine.step(x, t)
    after = engine.get_parameters()
    assert all(np.array_equal(after[k], v) for k, v in before.items())


def _inf_times_zero(engine, n_in, n):
    """Dense "a" (n_in -> n) overflows to inf in unit 0 on inputs of 2 (weights 3e38: inf in any
    order of the sum, with or without FMA); Dense "b" (n -> n) multiplies unit 0 by 0, so every
    pre-activation of b is NaN."""
    wa = np.zeros((n, n_in), np.float32)
    wa[0, :2] = 3e38
    engine.set_parameters({"a.weight": wa, "b.weight": np.full((n, n), 0.01, np.float32) * (np.arange(n) > 0)},
                          strict=False)


def test_relu_propagates_nan_as_torch(device):
    """torch.relu(nan) is nan (clamp_min keeps it). Two finite branches that overflow to +inf and
    -inf add to NaN; a ReLU that zeroes it hides the NaN: predict gave a finite number and a step
    was applied where torch's loss is NaN. The step must fail with nothing updated."""
    x_in = mpscy.Input((1,))
    a = layers.Dense(1, bias=False, name="a")(x_in)
    b = layers.Dense(1, bias=False, name="b")(x_in)
    out = layers.Dense(1, name="o")(layers.ReLU()(layers.Add()([a, b])))
    engine = mpscy.Engine(mpscy.Model(x_in, out), loss="mse", optimizer=optim.SGD(lr=0.1), batch_size=1,
                          device=device)
    engine.set_parameters({"a.weight": np.array([[3e38]], np.float32), "b.weight": np.array([[-3e38]], np.float32)},
                          strict=False)
    _nan_refused(engine, np.full((1, 1), 2.0, np.float32), np.zeros((1, 1), np.float32))


def test_relu_fused_into_conv_propagates_nan(device):
    """The same for a ReLU computed inside its convolution (the conv's only consumer)."""
    x_in = mpscy.Input((1, 1, 1))
    a = layers.Conv2D(1, 1, bias=False, name="a")(x_in)
    b = layers.Conv2D(1, 1, bias=False, name="b")(x_in)
    c = layers.Conv2D(1, 1, name="c")(layers.Add()([a, b]))
    out = layers.Dense(1, name="o")(layers.Flatten()(layers.ReLU()(c)))
    engine = mpscy.Engine(mpscy.Model(x_in, out), loss="mse", batch_size=1, device=device)
    engine.set_parameters({"a.weight": np.full((1, 1, 1, 1), 3e38, np.float32),
                           "b.weight": np.full((1, 1, 1, 1), -3e38, np.float32)}, strict=False)
    _nan_refused(engine, np.full((1, 1, 1, 1), 2.0, np.float32), np.zeros((1, 1), np.float32))


@pytest.mark.parametrize("batch", [4, 512])
def test_relu_fused_into_dense_propagates_nan(device, batch):
    """A Dense whose ReLU is fused into its product, 256 -> 256 at batch 4 (on cuda the small
    products' kernel) and 512 (cuBLASLt with its bias-and-ReLU epilogue), every pre-activation
    NaN (_inf_times_zero). The ReLU keeps it, as torch's does (a ReLU that zeroes NaN left the
    output its bias and applied the step)."""
    model = mpscy.Sequential([layers.Dense(256, name="a"), layers.Dense(256, name="b"), layers.ReLU(),
                              layers.Dense(1, name="o")], input_shape=(256,))
    engine = mpscy.Engine(model, loss="mse", optimizer=optim.SGD(lr=0.1), batch_size=batch, device=device)
    _inf_times_zero(engine, 256, 256)
    _nan_refused(engine, np.full((batch, 256), 2.0, np.float32), np.zeros((batch, 1), np.float32))


def test_relu_in_a_dense_chain_under_cross_entropy_propagates_nan(device):
    """The same in a Dense/ReLU chain under sparse cross-entropy at a small batch (on cuda the
    one-kernel MLP step, its first layer's products added in the copy phase): the NaN reaches
    the logits, the step fails with nothing updated, the optimizer's step count included."""
    model = mpscy.Sequential([layers.Dense(16, name="a"), layers.Dense(16, name="b"), layers.ReLU(),
                              layers.Dense(3, name="o")], input_shape=(4,))
    engine = mpscy.Engine(model, optimizer=optim.Adam(1e-3), batch_size=8, device=device)
    _inf_times_zero(engine, 4, 16)
    _nan_refused(engine, np.full((8, 4), 2.0, np.float32), np.zeros(8, np.int32))
    assert engine.get_optimizer_state()["step"] == 0


def test_a_failed_build_uses_up_no_layers_and_inputs_are_checked():
    """A Sequential that fails to build leaves its layers free for the next model (it used to
    mark the ones before the failing layer as called); the same Input twice and Input names
    that are not node names are refused when they are given."""
    ls = [layers.Dense(16), layers.Conv2D(4, 3)]
    with pytest.raises(mpscy.ShapeError, match=r"^layer 1 \(Conv2D\)"):
        mpscy.Sequential(ls, input_shape=(64,))
    assert mpscy.Sequential([ls[0], layers.ReLU()], (64,)).output_shape == (16,)
    with pytest.raises(mpscy.InvalidArgumentError, match="already called"):  # now in a model: used
        mpscy.Sequential([ls[0]], (64,))
    named = [layers.Dense(4, name="a"), layers.Dense(4, name="a")]
    with pytest.raises(mpscy.InvalidArgumentError, match="two layers are named 'a'"):
        mpscy.Sequential(named, (3,))
    assert mpscy.Sequential(named[:1], (3,)).nodes[1].name == "a"
    a = mpscy.Input(4)
    with pytest.raises(mpscy.InvalidArgumentError, match=r"^Model input 1 is the same Input as an earlier one"):
        mpscy.Model([a, a], layers.Dense(2)(a))
    for bad in ("", "x" * 41, "dense_0.weight"):
        with pytest.raises(mpscy.InvalidArgumentError, match=r"^Input name must be a non-empty string of at most 40"):
            mpscy.Input(4, name=bad)
    with pytest.raises(mpscy.InvalidArgumentError, match=r"^Input name must be a string, got 5: a PyTorch argument"):
        mpscy.Input(4, name=5)
    x = mpscy.Input(4, name="pixels")
    assert mpscy.Model(x, layers.Dense(2)(x)).nodes[0].name == "pixels"


# ------------------------------------------------------------------ gradients added into a fan-out
# (a mutation run found that a Dense, Softmax or Flatten whose input also feeds a layer that runs
# backward first could overwrite that gradient instead of adding to it, and no test saw it)

def _fanout_params(P, name):
    return {k.split(".", 1)[1]: v.astype(np.float64) for k, v in P.items() if k.split(".", 1)[0] == name}


def _fanout_engine(device, model, batch, loss="mse"):
    return mpscy.Engine(model, loss=loss, batch_size=batch, device=device, seed=2, input_gradients=True)


def _fanout_check(g, loss, grads, dx):
    assert abs(g["loss"] - loss) <= 1e-5 * max(loss, 1.0)
    for k, v in grads.items():
        assert R.rel_err(g[k], v) < 1e-4, k
    assert R.rel_err(g["input"], dx) < 1e-4


def test_dense_accumulates_into_a_fanned_out_input(device, rng):
    """y = h + Dense_b(h), h = Dense_a(x): h feeds Add (last node, runs backward first and writes
    dh) and Dense_b, whose dx = dy W_b must be added to it, not overwrite it."""
    x_in = mpscy.Input((5,))
    h = layers.Dense(4, name="a")(x_in)
    model = mpscy.Model(x_in, layers.Add()([h, layers.Dense(4, name="b")(h)]))
    engine = _fanout_engine(device, model, 3)
    P = engine.get_parameters()
    a, b = _fanout_params(P, "a"), _fanout_params(P, "b")
    x = rng.standard_normal((3, 5)).astype(np.float32)
    h64 = x.astype(np.float64) @ a["weight"].T + a["bias"]
    y = h64 + h64 @ b["weight"].T + b["bias"]
    t = rng.standard_normal(y.shape).astype(np.float32)
    loss, dy = R.loss_ref("mse", y, t)
    dh = dy + dy @ b["weight"]
    grads = {"a.weight": dh.T @ x, "a.bias": dh.sum(0), "b.weight": dy.T @ h64, "b.bias": dy.sum(0)}
    _fanout_check(engine.gradients(x, t), loss, grads, dh @ a["weight"])


def test_softmax_accumulates_into_a_fanned_out_input(device, rng):
    """y = h + softmax(h), h = Dense(x): Softmax's gradient s * (dy - <dy, s>) must be added to
    the dy that Add wrote into dh."""
    x_in = mpscy.Input((6,))
    h = layers.Dense(5, name="d")(x_in)
    model = mpscy.Model(x_in, layers.Add()([h, layers.Softmax()(h)]))
    engine = _fanout_engine(device, model, 4)
    d = _fanout_params(engine.get_parameters(), "d")
    x = rng.standard_normal((4, 6)).astype(np.float32)
    h64 = x.astype(np.float64) @ d["weight"].T + d["bias"]
    e = np.exp(h64 - h64.max(1, keepdims=True))
    s = e / e.sum(1, keepdims=True)
    t = rng.standard_normal(h64.shape).astype(np.float32)
    loss, dy = R.loss_ref("mse", h64 + s, t)
    dh = dy + s * (dy - (dy * s).sum(1, keepdims=True))
    _fanout_check(engine.gradients(x, t), loss, {"d.weight": dh.T @ x, "d.bias": dh.sum(0)}, dh @ d["weight"])


def test_flatten_accumulates_into_a_fanned_out_input(device, rng):
    """y = flatten(a) + flatten(conv_b(a)), a = conv_a(x) (1x1 convolutions): a feeds Flatten and
    conv_b; whichever runs backward second must add its gradient to da."""
    x_in = mpscy.Input((2, 3, 4))
    a = layers.Conv2D(2, 1, name="a")(x_in)
    model = mpscy.Model(x_in, layers.Add()([layers.Flatten()(a), layers.Flatten()(layers.Conv2D(2, 1, name="b")(a))]))
    engine = _fanout_engine(device, model, 3)
    P = engine.get_parameters()
    one = dict(kernel=(1, 1), stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1)
    x = rng.standard_normal((3, 2, 3, 4)).astype(np.float32)
    ya, ca = R.conv2d_forward(x.astype(np.float64), _fanout_params(P, "a"), one)
    yb, cb = R.conv2d_forward(ya, _fanout_params(P, "b"), one)
    y = (ya + yb).reshape(3, -1)
    t = rng.standard_normal(y.shape).astype(np.float32)
    loss, dy = R.loss_ref("mse", y, t)
    dy4 = dy.reshape(ya.shape)
    dab, gb = R.conv2d_backward(dy4, cb)
    dx, ga = R.conv2d_backward(dy4 + dab, ca)
    grads = {f"a.{k}": v for k, v in ga.items()} | {f"b.{k}": v for k, v in gb.items()}
    _fanout_check(engine.gradients(x, t), loss, grads, dx)


def test_concatenate_of_one_tensor_twice(device, rng):
    """y = concat([h, h]) with h = Dense(x): the Concatenate is both writers of h's gradient,
    so its second input's share adds to the first's: dh = dy[:, :4] + dy[:, 4:]."""
    x_in = mpscy.Input((6,))
    h = layers.Dense(4, name="d")(x_in)
    model = mpscy.Model(x_in, layers.Concatenate()([h, h]))
    engine = mpscy.Engine(model, loss="mse", batch_size=3, device=device, seed=2, input_gradients=True)
    P = {k.split(".", 1)[1]: v.astype(np.float64) for k, v in engine.get_parameters().items()}
    x = rng.standard_normal((3, 6)).astype(np.float32)
    h64 = x.astype(np.float64) @ P["weight"].T + P["bias"]
    t = rng.standard_normal((3, 8)).astype(np.float32)
    loss, dy = R.loss_ref("mse", np.concatenate([h64, h64], 1), t)
    dh = dy[:, :4] + dy[:, 4:]
    g = engine.gradients(x, t)
    assert abs(g["loss"] - loss) <= 1e-5 * loss
    assert R.rel_err(g["d.weight"], dh.T @ x) < 1e-4
    assert R.rel_err(g["d.bias"], dh.sum(0)) < 1e-4
    assert R.rel_err(g["input"], dh @ P["weight"]) < 1e-4


def test_model_inputs_keep_the_order_given(device, rng):
    """Model([a, b], ...) whose output reaches b first: input k is still the k-th given (a of
    3 features, then b of 5), for input_shapes, the node list and predict's list of arrays."""
    a_in, b_in = mpscy.Input((3,), name="a"), mpscy.Input((5,), name="b")
    db, da = layers.Dense(2, name="db"), layers.Dense(2, name="da")
    model = mpscy.Model([a_in, b_in], layers.Concatenate()([db(b_in), da(a_in)]))
    assert model.input_shapes == [(3,), (5,)] and [n.name for n in model.nodes[:2]] == ["a", "b"]
    engine = mpscy.Engine(model, loss="mse", batch_size=4, device=device, seed=1)
    P = engine.get_parameters()
    xa, xb = rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal((4, 5)).astype(np.float32)
    ref = np.concatenate([xb @ P["db.weight"].T + P["db.bias"], xa @ P["da.weight"].T + P["da.bias"]], 1)
    np.testing.assert_allclose(engine.predict([xa, xb]), ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ the builder, from a user trial
def _recursive_order(output):
    """The builder's order as it was first written (a recursive post-order walk), for comparison."""
    order, seen = [], set()

    def visit(t):
        if id(t) in seen:
            return
        for src in t.inputs:
            visit(src)
        seen.add(id(t))
        order.append(t)

    visit(output)
    return order


def test_model_order_and_names_are_the_recursive_walks_on_random_dags():
    """The builder walks the graph without recursion; on 30 random DAGs (Add and Concatenate of
    earlier tensors, some reused several times) its order, and so every generated layer name,
    is the recursive walk's: checkpoints and set_parameters names are unchanged by it."""
    from mpscy.model import _post_order
    rng = np.random.default_rng(0)
    for trial in range(30):
        x = mpscy.Input((4,))
        pool = [x]
        for _ in range(int(rng.integers(3, 25))):
            k = int(rng.integers(1, 4))
            picks = [pool[int(i)] for i in rng.integers(0, len(pool), k)]
            if k == 1:
                pool.append(layers.Dense(4)(picks[0]))
            else:
                pool.append(layers.Add()(picks) if rng.random() < 0.5 else
                            layers.Dense(4)(layers.Concatenate()(picks)))
        out = pool[-1]
        assert [id(t) for t in _post_order(out)] == [id(t) for t in _recursive_order(out)], trial


def test_a_model_deeper_than_the_recursion_limit_builds_and_trains():
    """600 residual blocks (1,201 nodes, past Python's default recursion limit of 1000) and a
    Sequential of 1,500 layers build; the residual net takes a step with its loss as a float64
    NumPy forward computes it (to 1e-5 relative)."""
    x = mpscy.Input((4,))
    h = x
    for _ in range(600):
        h = layers.Add()([layers.Dense(4)(h), h])
    model = mpscy.Model(x, h)
    assert len(model.nodes) == 1201 and model.nodes[-1].name == "add_1199"
    assert len(mpscy.Sequential([layers.ReLU() for _ in range(1500)], input_shape=(3,)).nodes) == 1501
    engine = mpscy.Engine(model, loss="mse", optimizer=optim.SGD(1e-3), batch_size=2, device="cpu", seed=0)
    rng = np.random.default_rng(1)  # small weights, so that 600 blocks neither explode nor vanish
    p = {k: (rng.normal(0, 1e-3, v.shape) if k.endswith("weight") else np.zeros(v.shape)).astype(np.float32)
         for k, v in engine.get_parameters().items()}
    engine.set_parameters(p)
    xs = rng.normal(size=(2, 4)).astype(np.float32)
    h64 = xs.astype(np.float64)
    for k in range(600):
        name = f"dense_{2 * k}"
        h64 = h64 @ p[f"{name}.weight"].astype(np.float64).T + p[f"{name}.bias"] + h64
    t = np.zeros((2, 4), np.float32)
    loss = engine.step(xs, t).loss
    assert np.isfinite(loss) and abs(loss - np.mean(h64 ** 2)) <= 1e-5 * np.mean(h64 ** 2)


def test_builder_refuses_a_cycle_and_an_input_as_output():
    x = mpscy.Input((3,))
    a = layers.Dense(3)(x)
    b = layers.Dense(3)(a)
    a.inputs = (b,)  # only by hand: layer calls cannot make one
    with pytest.raises(mpscy.InvalidArgumentError, match="has a cycle"):
        mpscy.Model(x, b)
    with pytest.raises(mpscy.InvalidArgumentError, match="output is one of its Inputs: a model needs at least one"):
        mpscy.Model(x, x)


def test_builder_errors_name_the_layer_and_the_input():
    """A named layer's shape error names it (merge layers of a DAG have no position to say which
    one failed); an unnamed one's is as before; an input that does not reach the output is named
    with its position and shape."""
    x = mpscy.Input((3,), name="features")
    a, b = layers.Dense(4)(x), layers.Dense(5)(x)
    with pytest.raises(mpscy.ShapeError, match=r"^Add 'join': Add input 1 has per-sample shape \(5,\), input 0 has \(4,\)$"):
        layers.Add(name="join")([a, b])
    with pytest.raises(mpscy.ShapeError, match=r"^Add input 1 has per-sample shape \(5,\)"):
        layers.Add()([a, b])
    with pytest.raises(mpscy.ShapeError, match=r"^layer 1: Conv2D 'c': Conv2D needs \(C, H, W\)"):
        mpscy.Sequential([layers.Dense(4), layers.Conv2D(3, 3, name="c")], input_shape=(3,))
    with pytest.raises(mpscy.ShapeError, match=r"^layer 1 \(Conv2D\): Conv2D needs"):
        mpscy.Sequential([layers.Dense(4), layers.Conv2D(3, 3)], input_shape=(3,))
    extra = mpscy.Input((2,), name="extra")
    with pytest.raises(mpscy.InvalidArgumentError, match=r"^model input 1 \('extra'\), of shape \(2,\), does not"):
        mpscy.Model([x, extra], a)


def test_summary_of_a_dag_says_what_feeds_each_layer():
    x = mpscy.Input((3,), name="features")
    a, b = layers.Dense(4, name="left")(x), layers.Dense(4, name="right")(x)
    model = mpscy.Model(x, layers.Add()([a, b]))
    assert repr(model) == "<Model: 3 layers, inputs (features: (3,)) -> output (4,)>"
    lines = mpscy.Engine(model, loss="mse", batch_size=4, device="cpu").summary().splitlines()
    assert lines[1].split() == ["Layer", "Type", "Output", "shape", "Params", "Connected", "to"]
    assert lines[3].split() == ["features", "Input", "(None,", "3)", "0"]
    assert lines[6].split() == ["add_2", "Add", "(None,", "4)", "0", "left,", "right"]
    chain = mpscy.Sequential([layers.Dense(4), layers.ReLU()], input_shape=(3,))
    assert chain.connections() is None
    text = mpscy.Engine(chain, loss="mse", batch_size=4, device="cpu").summary()
    assert "Connected" not in text and all(line == line.rstrip() for line in text.splitlines())


def test_sequential_takes_an_input_first_as_keras_3_does():
    """Sequential([Input(shape), ...]) is Sequential([...], input_shape=shape) with the input's
    name; both at once must agree, and one of them is required."""
    a = mpscy.Sequential([mpscy.Input((1, 8, 8), name="pixels"), layers.Conv2D(2, 3), layers.Flatten()])
    b = mpscy.Sequential([layers.Conv2D(2, 3), layers.Flatten()], input_shape=(1, 8, 8))
    assert [n.name for n in a.nodes] == ["pixels", "conv2d_0", "flatten_1"]
    assert [n.shape for n in a.nodes] == [n.shape for n in b.nodes]
    same = mpscy.Sequential([mpscy.Input((3,)), layers.Dense(2)], input_shape=(3,))
    assert same.output_shape == (2,)
    with pytest.raises(mpscy.ShapeError, match=r"Sequential got input_shape=\(4,\) and an Input of shape \(3,\)"):
        mpscy.Sequential([mpscy.Input((3,)), layers.Dense(2)], input_shape=(4,))
    with pytest.raises(mpscy.InvalidArgumentError, match=r"Sequential needs input_shape= .* or an mpscy.Input"):
        mpscy.Sequential([layers.Dense(2)])
    with pytest.raises(mpscy.InvalidArgumentError, match="Sequential needs at least one layer"):
        mpscy.Sequential([mpscy.Input((3,))])


def test_sequential_and_engine_name_arguments_of_the_wrong_kind():
    """What is no list of layers, and an array where a device or precision name goes, are named
    (they were a TypeError from list() and numpy's ambiguous truth value); a generator of
    layers is still a list of layers."""
    for bad, kind in ((None, "NoneType"), (layers.Dense(2), "Dense"), ("relu", "str")):
        with pytest.raises(mpscy.InvalidArgumentError, match=f"^Sequential takes a list of layers, got {kind}$"):
            mpscy.Sequential(bad, input_shape=(3,))
    assert len(mpscy.Sequential((layer for layer in [layers.Dense(2)]), input_shape=(3,)).nodes) == 2
    model = mpscy.Sequential([layers.Dense(2)], input_shape=(3,))
    with pytest.raises(mpscy.InvalidArgumentError, match=r"^unknown device array\(\['cpu'\]"):
        mpscy.Engine(model, device=np.array(["cpu"]))
    with pytest.raises(mpscy.InvalidArgumentError, match=r"^precision must be 'fp32' or 'tf32', got array"):
        mpscy.Engine(model, device="cpu", precision=np.array(["fp32"]))
