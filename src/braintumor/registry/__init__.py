"""MLflow: the run that records a pipeline state, the model registry and its champion, the model card."""
