"""steerserve: serve language models that each request steers."""

__version__ = "0.1.0"
