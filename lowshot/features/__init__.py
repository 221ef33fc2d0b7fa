"""Features: extraction (plan, decode, forward), the feature store that grows by image, ranks of a distributed
run, and export to files other tools read."""
