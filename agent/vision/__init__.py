"""Vision: camera sources, preprocessing, the inference runtimes, post-processing and the classifier that joins them."""
