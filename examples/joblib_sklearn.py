"""scikit-learn's grid search on rpycsvc servers, unchanged but for one ``with`` line.

``import rpycsvc.joblib`` registers a joblib backend named ``"rpycsvc"``; inside
``joblib.parallel_config(backend="rpycsvc", cluster=cluster)`` every ``n_jobs=-1`` of
scikit-learn (and every ``joblib.Parallel``) runs its tasks on the cluster's servers. The
same search then runs with joblib's default backend (loky, two processes on this machine)
to show that the answer is the same.

Run it on two local servers, or on servers already running (``rpycsvc serve``; they need
scikit-learn installed)::

    python examples/joblib_sklearn.py
    python examples/joblib_sklearn.py host1:18812 host2:18812
"""

from __future__ import annotations

import sys
import time

import joblib
from sklearn.datasets import load_iris
from sklearn.model_selection import GridSearchCV
from sklearn.svm import SVC

import rpycsvc
import rpycsvc.joblib  # registers the "rpycsvc" joblib backend

GRID = {"C": [0.1, 1, 10, 100], "kernel": ["linear", "rbf"], "gamma": ["scale", 0.1]}
FOLDS = 5


def tasks_done(cluster: rpycsvc.Cluster) -> dict[str, int]:
    return {a: s["tasks_done"] for a, s in cluster.stats().items()
            if isinstance(s, dict)}


def main(argv: list[str]) -> int:
    X, y = load_iris(return_X_y=True)
    cluster = rpycsvc.Cluster(argv) if argv else rpycsvc.Cluster.local(2)
    with cluster:
        before = tasks_done(cluster)
        start = time.perf_counter()
        with joblib.parallel_config(backend="rpycsvc", cluster=cluster):
            search = GridSearchCV(SVC(), GRID, cv=FOLDS, n_jobs=-1).fit(X, y)
        took = time.perf_counter() - start
        after = tasks_done(cluster)
        fits = len(search.cv_results_["params"]) * FOLDS
        print(f"rpycsvc: {fits} fits on {cluster.total_workers} workers of {len(cluster)} "
              f"servers in {took:.2f} s")
        print(f"rpycsvc best parameters: {search.best_params_}, accuracy "
              f"{search.best_score_:.4f}")
        for address, done in after.items():
            print(f"  {address} ran {done - before.get(address, 0)} tasks")

    start = time.perf_counter()
    local = GridSearchCV(SVC(), GRID, cv=FOLDS, n_jobs=2).fit(X, y)  # joblib's default: loky
    took = time.perf_counter() - start
    print(f"loky: {fits} fits in 2 local processes in {took:.2f} s")
    print(f"loky best parameters: {local.best_params_}, accuracy {local.best_score_:.4f}")
    same = (local.best_params_ == search.best_params_ and
            list(local.cv_results_["mean_test_score"]) ==
            list(search.cv_results_["mean_test_score"]))
    print(f"same answer: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
