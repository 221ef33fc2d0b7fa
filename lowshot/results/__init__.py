"""Results: rows of one run, statistics over seeds and images, comparison of runs and the CI gate, model cards and
plots."""
