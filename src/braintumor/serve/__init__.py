"""Using the shipped model: `braintumor predict` and the web service with its triage page (`web/`)."""
