"""Data: listing image folders, Hugging Face datasets and split files; the image transform; the low-shot subsets
and the protocol's image plan (which images a run needs)."""
