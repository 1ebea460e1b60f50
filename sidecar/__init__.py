"""The token sidecar: a transparent proxy that meters LLM tokens live for Prometheus."""

__version__ = "0.1.0"
