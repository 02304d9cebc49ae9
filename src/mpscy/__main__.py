"""Command line: `python -m mpscy demo` trains an MLP on the bundled digits and prints per-epoch
loss and held-out accuracy."""

import argparse
import sys
import time

import numpy as np


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
    return 0 if test["accuracy"] >= 0.95 else 1


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m mpscy", description="mpscy command line")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="train an MLP on the bundled 8x8 digits")
    d.add_argument("--epochs", type=int, default=20)
    d.add_argument("--batch-size", type=int, default=32)
    d.add_argument("--lr", type=float, default=1e-3)
    d.add_argument("--device", default="cpu")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
