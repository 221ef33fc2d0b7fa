"""Models: loading a backbone (Hugging Face folder or hub id, MSN checkpoint), the engines that run it, the
readouts that turn its output into one feature vector, and the device it runs on."""
