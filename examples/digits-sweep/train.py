"""Train an SVM on scikit-learn's bundled digits data set and report validation metrics.

A Mercato trial: parameters arrive as ``--name=value`` arguments (W&B's ``${args}``),
metrics leave as JSON lines on stdout. The data ships inside scikit-learn, so nothing
is downloaded (trials run without network).
"""

import argparse
import json
import time

from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--C", type=float, default=1.0)
    parser.add_argument("--gamma", type=float, default=0.001)
    parser.add_argument("--kernel", default="rbf")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    start = time.perf_counter()
    x, y = load_digits(return_X_y=True)
    x_train, x_val, y_train, y_val = train_test_split(
        x, y, test_size=0.25, random_state=args.seed, stratify=y
    )
    scaler = StandardScaler().fit(x_train)
    model = SVC(C=args.C, gamma=args.gamma, kernel=args.kernel)
    model.fit(scaler.transform(x_train), y_train)
    accuracy = float(model.score(scaler.transform(x_val), y_val))
    print(
        json.dumps(
            {
                "val_accuracy": accuracy,
                "val_error": 1.0 - accuracy,
                "train_seconds": round(time.perf_counter() - start, 3),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
