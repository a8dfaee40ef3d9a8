"""One evaluation path, one image renderer, and TensorBoard summaries."""
