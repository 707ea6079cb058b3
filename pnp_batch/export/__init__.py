"""Export: the rows of an output that pass a filter, as a training set (docs/export.md)."""
