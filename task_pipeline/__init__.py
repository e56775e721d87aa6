"""task-pipeline: a content-addressed task queue for shell-script pipelines."""

__version__ = "0.1.0"
