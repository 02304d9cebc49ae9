"""Command line. `python -m mpscy train` trains an MLP or the README CNN on the bundled digits
(or an image folder), prints held-out metrics, and can write a checkpoint, ONNX and plots;
`predict model.mpscy images/` classifies image files with a checkpoint; `demo` is the quick MLP
demonstration (`<command> --help` lists the options). Arguments and output paths are checked
before training; every user error prints `error: ...` and exits 2 (demo exits 1 below 0.95)."""

import argparse
import math
import os
import sys
import time

import numpy as np

EXIT_USER_ERROR = 2  # argparse's code for usage errors, used for every user error


class UsageError(Exception):
    """A user error the command line finds itself; main prints it and returns EXIT_USER_ERROR."""


# ----------------------------------------------------------------------------- argument types
def _at_least(lo):
    """An argparse type: an integer >= lo."""
    def parse(text):
        value = int(text)
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {value}")
        return value
    parse.__name__ = "int"  # argparse's "invalid int value: 'x'"
    return parse


def _seed(text):
    value = int(text)
    if not 0 <= value < 2 ** 64:  # what numpy's PCG64 and the engine accept
        raise argparse.ArgumentTypeError(f"must be in [0, 2**64), got {value}")
    return value


def _learning_rate(text):
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be finite and >= 0, got {text}")
    return value


def _fraction(text):
    value = float(text)
    if not 0 < value < 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text}")
    return value


_seed.__name__ = "int"
_learning_rate.__name__ = _fraction.__name__ = "float"
_DEVICES = ("auto", "cpu", "cuda", "metal")


def demo(args):
    import mpscy
    from mpscy import layers, optim

    x, y = mpscy.datasets.load_digits()
    x_train, y_train, x_test, y_test = mpscy.datasets.train_test_split(x, y, 0.2, seed=0)
    model = mpscy.Sequential([layers.Dense(128), layers.ReLU(), layers.Dense(64), layers.ReLU(),
                              layers.Dense(10)], input_shape=(64,))
    engine = mpscy.Engine(model, loss="sparse_cross_entropy", optimizer=optim.Adam(lr=args.lr),
                          batch_size=args.batch_size, device=args.device, seed=args.seed)
    print(f"mpscy {mpscy.__version__} on {engine.device}: {len(x_train)} training and "
          f"{len(x_test)} test digits, MLP 64-128-64-10, Adam lr={args.lr}")
    rng = np.random.Generator(np.random.PCG64(args.seed))
    b = args.batch_size
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        order = rng.permutation(len(x_train))
        xs, ys = x_train[order], y_train[order]
        total = 0.0
        for i in range(0, len(xs), b):
            total += engine.step(xs[i:i + b], ys[i:i + b]).loss * len(xs[i:i + b])
        test = engine.evaluate(x_test, y_test)
        print(f"epoch {epoch:2d}  loss {total / len(xs):.4f}  test loss {test['loss']:.4f}  "
              f"test accuracy {test['accuracy']:.4f}")
    elapsed = time.perf_counter() - start
    stats = engine.stats()
    print(f"trained in {elapsed:.2f} s: {stats['steps']} steps, "
          f"{elapsed / max(stats['steps'], 1) * 1e6:.0f} us per step incl. evaluation")
    engine.close()
    if test["accuracy"] < 0.95:
        print(f"demo: test accuracy {test['accuracy']:.4f} is below 0.95", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------- train
def _optimizers():
    from mpscy import optim
    return {cls.__name__.lower(): cls for cls in vars(optim).values()
            if isinstance(cls, type) and issubclass(cls, optim.Optimizer) and cls is not optim.Optimizer}


def build_model(kind, input_shape, classes):
    """The CLI's models: "mlp" (Dense 128-64 with ReLU) or "cnn" (the README CNN)."""
    import mpscy
    from mpscy import layers
    if kind == "mlp":
        stack = [layers.Dense(128), layers.ReLU(), layers.Dense(64), layers.ReLU(), layers.Dense(classes)]
    else:
        for name in ("Conv2D", "Dropout"):
            if not hasattr(layers, name):
                raise UsageError(f"--model cnn needs mpscy.layers.{name}, which this build lacks")
        stack = [layers.Conv2D(32, 3, stride=1, padding=1), layers.ReLU(),
                 layers.Conv2D(32, 3, stride=2, padding=1), layers.ReLU(),
                 layers.Conv2D(64, 3, stride=1, padding=1), layers.ReLU(),
                 layers.Conv2D(64, 3, stride=2, padding=1), layers.ReLU(),
                 layers.Dense(128), layers.ReLU(), layers.Dropout(0.5), layers.Dense(classes)]
    return mpscy.Sequential(stack, input_shape=input_shape)


def _split(n, fraction, seed):
    order = np.random.Generator(np.random.PCG64(seed)).permutation(n)
    n_test = int(round(n * fraction))
    if not 0 < n_test < n:
        raise UsageError(f"--test-fraction {fraction} leaves an empty split of {n} samples")
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def _load_data(args):
    """(train source, test (x, y), input shape, class names, preprocessing for predict)."""
    import mpscy
    from mpscy import data
    if args.data == "digits":
        x, y = mpscy.datasets.load_digits(images=True)
        tr, te = _split(len(x), args.test_fraction, args.seed)
        pre = {"image_size": [8, 8], "channels": 1, "mean": None, "std": None, "invert": False}
        return (x[tr], y[tr]), (x[te], y[te]), (1, 8, 8), [str(d) for d in range(10)], pre
    channels = 3 if args.channels is None else args.channels
    size = 32 if args.image_size is None else args.image_size
    ds = data.ImageFolder(args.data, image_size=size, channels=channels, seed=args.seed, invert=args.invert)
    if len(ds.classes) < 2:
        raise UsageError(f"--data {args.data!r} has one class sub-folder; a classifier needs at least 2")
    tr, te = _split(len(ds), args.test_fraction, args.seed)
    loader = data.DataLoader(data.Subset(ds, tr), batch_size=args.batch_size, shuffle=True, seed=args.seed)
    x_test, y_test = data.Subset(ds, te).get_batch(np.arange(len(te)))
    pre = ds.preprocessing()
    classes = pre.pop("classes")
    return loader, (x_test, y_test), (channels, *ds.image_size), classes, pre


def _check_output(option, path, folder=False):
    """Refuses now, not after training, an output that could not be written: a file path naming
    a folder, a folder path naming a file, or a place where nothing can be created. Missing
    folders are fine: they are made when the output is written."""
    from mpscy._checks import can_write_file, can_write_in
    if not folder and (path.endswith(("/", os.sep)) or os.path.isdir(path)):
        raise UsageError(f"{option} {path!r} is a folder; give a file name")
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{option} {path!r} exists and is not a folder")
    if not folder and os.path.exists(path) and not can_write_file(path):
        raise UsageError(f"{option} {path!r} exists and is not writable")
    above = os.path.abspath(path if folder else os.path.dirname(path) or os.curdir)
    while not os.path.exists(above):
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        raise UsageError(f"{option} {path!r}: {above!r} is a file, not a folder")
    if not can_write_in(above):
        raise UsageError(f"{option} {path!r}: no permission to write in {above!r}")


def _check_train_args(args):
    """What train can check before loading data or building the engine."""
    if args.data == "digits":
        given = [o for o, v in (("--image-size", args.image_size), ("--channels", args.channels),
                                ("--invert", args.invert)) if v not in (None, False)]
        if given:
            raise UsageError(f"{', '.join(given)}: for image folders only; --data digits are 8x8 gray images")
    elif not os.path.isdir(args.data):
        raise UsageError(f"--data must be 'digits' or an image folder; {args.data!r} is neither")
    outputs = [(o, p) for o, p in (("--save", args.save), ("--onnx", args.onnx), ("--plots", args.plots)) if p]
    for option, path in outputs:
        _check_output(option, path, folder=option == "--plots")
    for k, (a, pa) in enumerate(outputs):
        for b, pb in outputs[k + 1:]:
            if os.path.abspath(pa) == os.path.abspath(pb):
                raise UsageError(f"{a} and {b} name the same path {pa!r}")
    if args.onnx:
        try:
            import onnx  # noqa: F401
        except ImportError:
            raise UsageError("--onnx needs the onnx package: pip install 'mpscy[onnx]'") from None
    if args.plots:
        try:
            import matplotlib.backends.backend_agg  # noqa: F401
        except ImportError:
            raise UsageError("--plots needs matplotlib: pip install 'mpscy[plot]'") from None


def _write_outputs(args, engine, history, y_test, outputs, classes, pre):
    """Writes the checkpoint, the ONNX file and the plots, each even when another failed (a
    full disk, say); returns True when all were written."""
    import mpscy
    from mpscy import plot
    writers = [("--save", args.save, "saved", lambda: engine.save(
                    args.save, meta={"preprocess": pre, "classes": classes, "data": args.data})),
               ("--onnx", args.onnx, "wrote", lambda: mpscy.onnx.export(engine, args.onnx)),
               ("--plots", args.plots, "plots in", lambda: plot.fit_report(
                    args.plots, history, y_test, outputs, engine.loss, labels=classes))]
    ok = True
    for option, path, done, write in writers:
        if not path:
            continue
        try:
            folder = path if option == "--plots" else os.path.dirname(path)
            if folder:
                os.makedirs(folder, exist_ok=True)
            write()
        except (OSError, ImportError, mpscy.Error) as e:
            print(f"error: {option}: {e}", file=sys.stderr)
            ok = False
        else:
            print(f"{done} {path}")
    return ok


def train(args):
    import mpscy
    optimizers = _optimizers()
    if args.optimizer.lower() not in optimizers:
        raise UsageError(f"unknown --optimizer {args.optimizer!r}; choose one of {sorted(optimizers)}")
    _check_train_args(args)
    source, (x_test, y_test), shape, classes, pre = _load_data(args)
    model = build_model(args.model, shape, len(classes))
    cls = optimizers[args.optimizer.lower()]
    # without --lr, the optimizer's own default rate (torch's); L-BFGS with its strong-Wolfe line
    # search, without which its full steps on mini-batches diverge (NaN within an epoch on digits)
    kwargs = {} if args.lr is None else {"lr": args.lr}
    if cls.kind == "lbfgs":
        kwargs["line_search_fn"] = "strong_wolfe"
    opt = cls(**kwargs)
    engine = mpscy.Engine(model, loss="sparse_cross_entropy", optimizer=opt, batch_size=args.batch_size,
                          device=args.device, seed=args.seed)
    try:
        return _fit_and_report(args, engine, opt, source, x_test, y_test, classes, pre)
    finally:
        engine.close()


def _step_counter():
    from mpscy.callbacks import Callback

    class StepCounter(Callback):
        def __init__(self):
            super().__init__()
            self.steps = 0

        def on_train_batch_end(self, batch, logs=None):
            self.steps += 1
    return StepCounter()


def _fit_and_report(args, engine, opt, source, x_test, y_test, classes, pre):
    """Trains, prints the held-out metrics, writes the outputs; returns the exit code."""
    import mpscy
    from mpscy import metrics
    n_train = len(source[0]) if isinstance(source, tuple) else len(source.dataset)
    print(f"mpscy {mpscy.__version__} on {engine.device}: {args.model} on {args.data} "
          f"({n_train} training, {len(x_test)} held-out samples, {len(classes)} classes), "
          f"{type(opt).__name__} lr={opt.lr:g}" + (" (strong-Wolfe line search)" if opt.kind == "lbfgs" else ""))
    fit_args = (source,) if not isinstance(source, tuple) else source
    counter = _step_counter()  # batches trained (engine.iterations counts L-BFGS's loss evaluations)
    start = time.perf_counter()
    history = engine.fit(*fit_args, epochs=args.epochs, validation_data=(x_test, y_test),
                         verbose=0 if args.quiet else 1, callbacks=[counter])
    elapsed = time.perf_counter() - start
    outputs = engine.predict(x_test)
    _, pred, probs = metrics.classify_outputs(y_test, outputs, engine.loss)
    ev = engine.evaluate(x_test, y_test)
    p, r, f = metrics.precision_recall_f1(y_test, pred, average="macro")
    line = (f"held-out: loss {ev['loss']:.4f}  accuracy {ev['accuracy']:.4f}  precision {p:.4f}  "
            f"recall {r:.4f}  f1 {f:.4f}")
    if len(np.unique(y_test)) == len(classes):  # binary for 2 classes, else macro one-vs-rest
        line += f"  roc_auc {metrics.roc_auc(y_test, probs[:, 1] if len(classes) == 2 else probs):.4f}"
    else:
        line += "  roc_auc n/a (a class is missing from the held-out set)"
    print(line)
    print(f"trained {counter.steps} steps in {elapsed:.2f} s")
    return 0 if _write_outputs(args, engine, history, y_test, outputs, classes, pre) else EXIT_USER_ERROR


# ----------------------------------------------------------------------------- predict
# How predict turns each loss's outputs into probabilities; the regression losses (mse, mae,
# huber) are not here: their outputs are not class scores, and predict refuses them.
_SQUASH = {"sparse_cross_entropy": "softmax", "cross_entropy": "softmax", "categorical_cross_entropy": None,
           "bce_with_logits": "sigmoid", "binary_cross_entropy": None}


def _classifier(engine, path):
    """The squashing ("softmax", "sigmoid" or None) that gives this checkpoint's class
    probabilities; raises UsageError for a model predict cannot read as an image classifier."""
    from mpscy import losses
    model, kind = engine.model, engine.loss.kind
    api = f"; use the Python API for it: mpscy.load({path!r}).predict(x)"
    if len(model.input_shapes) != 1:
        raise UsageError(f"predict takes models with one image input, and this one has "
                         f"{len(model.input_shapes)} inputs{api}")
    shape = tuple(model.input_shapes[0])
    if len(shape) != 3:
        raise UsageError(f"this model takes inputs shaped {shape}, not images (C, H, W)")
    if kind not in _SQUASH:
        raise UsageError(f"predict classifies images, and this model was trained with loss {kind!r}, whose "
                         f"outputs are not class scores{api}")
    if len(model.output_shape) != 1:  # per-position outputs (a segmentation's)
        raise UsageError(f"predict classifies whole images, and this model's output per image has shape "
                         f"{tuple(model.output_shape)}, not (classes,){api}")
    squash = _SQUASH[kind]
    if losses.output_mismatch(engine.loss, model):  # the engine warned when it was built
        if squash is None:
            raise UsageError(f"this model was trained with loss {kind!r} on an output that is not squashed into "
                             f"[0, 1] (no Sigmoid or Softmax at its end), so its outputs are not probabilities{api}")
        squash = None  # the model ends in its own Softmax or Sigmoid: not applied twice
    return squash


def _probabilities(out, squash):
    """(n, classes) probabilities from outputs (n, k). A single output is the probability of
    class 1, returned as the two columns (1 - p, p), so class 1 wins where p > 0.5 (as the
    engine's accuracy thresholds it); several sigmoid outputs are independent labels."""
    out = np.asarray(out, dtype=np.float64)
    if squash == "softmax":
        out = np.exp(out - out.max(1, keepdims=True))
        out /= out.sum(1, keepdims=True)
    elif squash == "sigmoid":
        out = np.exp(-np.logaddexp(0.0, -out))  # 1 / (1 + exp(-x)) without overflow
    return np.concatenate([1.0 - out, out], axis=1) if out.shape[1] == 1 else out


def predict(args):
    import mpscy
    if not os.path.exists(args.images):
        raise UsageError(f"{args.images!r} is neither an image file nor a folder")
    with mpscy.load(args.model, device=args.device, batch_size=args.batch_size) as engine:
        squash = _classifier(engine, args.model)
        meta = getattr(engine, "checkpoint_meta", None)
        meta = meta if isinstance(meta, dict) else {}  # Engine.save takes any JSON value as meta
        outputs = engine.model.output_shape[0]
        n_classes = 2 if outputs == 1 else outputs
        classes = meta.get("classes")
        classes = classes if isinstance(classes, list) and classes else [str(k) for k in range(n_classes)]
        if len(classes) != n_classes:
            raise UsageError(f"the checkpoint's meta has {len(classes)} class names for a model of {outputs} "
                             + ("output (a binary head takes 2: class 0's and class 1's)" if outputs == 1
                                else "outputs"))
        files, x = _read_images(args, engine.model.input_shapes[0], meta)
        probs = _probabilities(engine.predict(x), squash)
    top = min(args.top, probs.shape[1])
    for f, row in zip(files, probs):
        best = np.argsort(-row, kind="stable")[:top]  # ties: the lower class first
        guesses = "  ".join(f"{classes[k]} ({row[k]:.3f})" for k in best)
        print(f"{os.path.basename(f)}\t{guesses}")
    return 0


def _read_images(args, shape, meta):
    """(file paths, images (n, C, H, W)) prepared as the checkpoint's training data was, else
    resized to the model's input with its channels."""
    from mpscy import data
    given = meta.get("preprocess")
    pre = {"image_size": list(shape[1:]), "channels": shape[0], **(given if isinstance(given, dict) else {})}
    pre["image_size"] = pre["image_size"] or list(shape[1:])  # an ImageFolder without image_size
    if pre["channels"] not in (1, 3):
        raise UsageError(f"this model takes images of {pre['channels']} channels; predict reads gray (1) "
                         "or RGB (3) images")
    if args.invert:
        pre["invert"] = True
    if os.path.isdir(args.images):
        files = sorted(os.path.join(args.images, f) for f in os.listdir(args.images)
                       if f.lower().endswith(data.IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(args.images, f)))
    else:
        files = [args.images]
    if not files:
        raise UsageError(f"no {'/'.join(data.IMAGE_EXTENSIONS)} images in {args.images!r}")
    x = np.stack([data.load_image(f, pre["image_size"], pre["channels"], pre.get("mean"), pre.get("std"),
                                  pre.get("invert", False)) for f in files])
    return files, x


# ----------------------------------------------------------------------------- parser
def parser():
    p = argparse.ArgumentParser(
        prog="python -m mpscy",
        description="mpscy: neural network training with the whole step as one native call.",
        epilog="examples:\n"
               "  python -m mpscy train --data digits --model mlp --epochs 20 --save model.mpscy\n"
               "  python -m mpscy train --data digits --model cnn --epochs 15 --onnx cnn.onnx --plots plots/\n"
               "  python -m mpscy predict model.mpscy images/\n"
               "  python -m mpscy demo",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{train,predict,demo}")

    t = sub.add_parser("train", help="train a classifier and report held-out metrics",
                       description="Trains an MLP or the README CNN with a progress bar, prints held-out "
                                   "metrics, and optionally saves a checkpoint, an ONNX file and plots.")
    t.add_argument("--data", default="digits",
                   help="'digits' (bundled 8x8 digits) or a folder with one sub-folder of images per class")
    t.add_argument("--model", choices=("mlp", "cnn"), default="mlp",
                   help="mlp: Dense 128-64; cnn: the README CNN (4 conv layers, Dropout 0.5)")
    t.add_argument("--epochs", type=_at_least(1), default=20)
    t.add_argument("--batch-size", type=_at_least(1), default=32)
    t.add_argument("--optimizer", default="adam", help="an mpscy.optim class name, lower case (default adam)")
    t.add_argument("--lr", type=_learning_rate,
                   help="learning rate (default: the optimizer's own, as in torch.optim: 1e-3 for adam and sgd, "
                        "1e-2 for rmsprop and adagrad, 1.0 for adadelta and lbfgs; lbfgs runs with its "
                        "strong-Wolfe line search)")
    t.add_argument("--device", choices=_DEVICES, default="auto", help="(default auto)")
    t.add_argument("--seed", type=_seed, default=0)
    t.add_argument("--test-fraction", type=_fraction, default=0.2, help="held-out fraction (default 0.2)")
    t.add_argument("--image-size", type=_at_least(1), help="image folders: resize to this square size (default 32)")
    t.add_argument("--channels", type=int, choices=(1, 3), help="image folders: 1 gray, 3 RGB (default 3)")
    t.add_argument("--invert", action="store_true", help="image folders: use 1 - pixel (dark ink on white)")
    t.add_argument("--save", metavar="PATH", help="write a checkpoint (for predict and mpscy.load); "
                                                  "missing folders are created")
    t.add_argument("--onnx", metavar="PATH", help="also export the trained model as ONNX; missing folders are created")
    t.add_argument("--plots", metavar="DIR", help="write training curves, confusion matrix, ROC and PR plots "
                                                  "into this folder (created if missing)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=train)

    r = sub.add_parser("predict", help="classify image files with a saved checkpoint",
                       description="Classifies every JPEG/PNG/BMP image in a folder (or one file) with a "
                                   "checkpoint written by `train --save`, preprocessing the images the way "
                                   "the training data was. The model takes one image input and gives one "
                                   "score per class (cross-entropy losses) or one probability per label "
                                   "(binary cross-entropy; a single output is class 1's).")
    r.add_argument("model", help="checkpoint written by train --save or Engine.save")
    r.add_argument("images", help="a folder of images, or one image file")
    r.add_argument("--device", choices=_DEVICES, default="auto")
    r.add_argument("--batch-size", type=_at_least(1), default=64)
    r.add_argument("--top", type=_at_least(1), default=1, help="how many classes to list per image")
    r.add_argument("--invert", action="store_true", help="use 1 - pixel (dark ink on a light background)")
    r.set_defaults(func=predict)

    d = sub.add_parser("demo", help="train an MLP on the bundled 8x8 digits (a quick check)")
    d.add_argument("--epochs", type=_at_least(1), default=20)
    d.add_argument("--batch-size", type=_at_least(1), default=32)
    d.add_argument("--lr", type=_learning_rate, default=1e-3)
    d.add_argument("--device", choices=_DEVICES, default="cpu")
    d.add_argument("--seed", type=_seed, default=0)
    d.set_defaults(func=demo)
    return p


def main(argv=None):
    """Runs one command; returns its exit code. A user error (a bad value or path, a missing
    optional package, an mpscy.Error, an OSError such as a full disk) prints `error: ...` and
    gives EXIT_USER_ERROR: argparse's own errors raise SystemExit(2), the others are returned.
    Any other exception is a bug and keeps its traceback."""
    args = parser().parse_args(argv)
    import mpscy
    try:
        return args.func(args)
    except (UsageError, mpscy.Error, ImportError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
