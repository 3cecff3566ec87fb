"""Results: the run record (metrics.json, event scalars), sweep summary, report, figures,
plot style, TensorBoard layout."""
