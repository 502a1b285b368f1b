"""nfgen: generate neural fields by predicting their weights with a transformer."""
__version__ = "0.1.0"
