"""Classifiers on frozen features: the logistic probe (a scikit-learn estimator) and its solver, and the
neighbour classifiers (k-NN, nearest class mean)."""
